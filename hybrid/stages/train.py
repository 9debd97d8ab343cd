"""The train stage: pick the normal training images from the shards and train, resumably.

Periodic checkpoints go to ``work_root/<key>/``, where the key hashes everything that decides the
run (model, train and augment settings, the shards' fingerprints, the selected samples). A job
killed at a time limit resumes from its folder; a changed hyper-parameter starts a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import h5py
import pandas as pd
import torch

from hybrid.checkpoint import keeps_published, published
from hybrid.data.manifest import matches, read_manifest
from hybrid.data.shards import ShardDataset, read_attrs
from hybrid.models.generator import DEFAULT_CONDITIONS
from hybrid.train import train

log = logging.getLogger(__name__)
DEFAULT_SELECT = {"split": "train", "label": 0}  # learn from normal training images alone


def run(index: str | Path, manifest: str | Path, checkpoint: str | Path, losses: str | Path,
        samples: str | Path, work_root: str | Path, model_cfg: dict, train_cfg: dict,
        augment_cfg: dict, select: dict | None = None, paths: dict | None = None,
        threads: int = 1, init_from: str | Path | None = None) -> Path:
    """Train on the selected preprocessed samples, resuming from this settings' work folder, and
    publish ``checkpoint`` (plus ``losses`` and ``samples``); see the module doc."""
    torch.set_num_threads(max(1, threads))
    index, work_root = Path(index), Path(work_root)
    select = DEFAULT_SELECT if select is None else select
    train_cfg = dict(train_cfg)
    if train_cfg.get("perceptual", "vgg19") == "vgg19" and not train_cfg.get("vgg_path") and paths:
        train_cfg["vgg_path"] = paths.get("vgg19")

    rows = read_manifest(manifest)
    chosen = set(rows.loc[matches(rows, select, "train.select"), "sample_id"])
    idx = pd.read_parquet(index)
    idx = idx[idx["sample_id"].isin(chosen)].reset_index(drop=True)
    if idx.empty:
        raise ValueError(f"train.select {select} matches no preprocessed sample in {index}; "
                         "check the manifest's split and label columns")
    shards = sorted(set(idx["shard"]))
    attrs = [read_attrs(index.parent / s) for s in shards]
    data = {k: _plain(attrs[0].get(k)) for k in ("resolution", "fit", "edge_model", "edge_weights",
                                                  "depth_source", "depth_weights")}
    conditions = model_cfg.get("conditions") or DEFAULT_CONDITIONS[model_cfg.get("level", "rgb")]
    modalities = ["image"] + [m for m in ("edge", "depth") if any(c.endswith("_" + m) for c in conditions)]
    depth_field = choose_depth(train_cfg.get("depth", "depth"), index.parent / shards[0], "depth" in modalities)
    if depth_field == "depth_sensor":
        data["depth_source"] = _plain(attrs[0].get("depth_sensor_source", "sensor"))
        data["depth_weights"] = None
    data["depth_field"] = depth_field
    data["select"] = select
    data["n_samples"] = len(idx)
    key = hashlib.sha256(json.dumps({
        "model": model_cfg, "train": train_cfg, "augment": augment_cfg, "data": data,
        "shards": [a.get("fingerprint") for a in attrs], "ids": sorted(idx["sample_id"]),
        "init_from": str(init_from) if init_from else None,
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    work_dir = work_root / key
    log.info("train: %d samples (%s) from %d shards; work folder %s", len(idx), select, len(shards), work_dir)
    log.info("train: depth maps from the shards' %r array (%s)", depth_field, data["depth_source"])
    fields = [depth_field if m == "depth" else m for m in modalities]
    dataset = Renamed(ShardDataset(idx, fields=fields, shard_dir=index.parent), {depth_field: "depth"})
    with keeps_published("train", checkpoint, work_root, work_dir):
        out = train(dataset, checkpoint, work_dir, model_cfg, train_cfg, augment_cfg, losses_csv=losses,
                    samples_dir=samples, init_from=init_from, data=data)
    published("train", Path(out), work_root, work_dir)
    return out


def choose_depth(wanted: str, shard: Path, needed: bool) -> str:
    """The shard array that feeds the model's depth maps: ``depth`` (the preprocess depth source,
    e.g. Depth Anything: AnomalyHybrid), ``depth_sensor`` (the dataset's sensor depth: AH* on
    MVTec 3D-AD, paper 003 Sec. 3.3) or ``auto`` (depth_sensor when the shards hold it)."""
    with h5py.File(shard, "r") as f:
        have = [k for k in ("depth", "depth_sensor") if k in f]
    if wanted == "auto":
        wanted = "depth_sensor" if "depth_sensor" in have else "depth"
    if needed and wanted not in have:
        raise ValueError(f"the model's conditions need depth, and the train config's depth: {wanted} asks for "
                         f"the shards' {wanted!r} array, but {shard} holds only {have or 'no depth'}; choose "
                         "one it has, or preprocess with a depth_source (depth) / sensor_depth (depth_sensor)")
    return wanted


class Renamed(torch.utils.data.Dataset):
    """Items of ``base`` with keys renamed (``depth_sensor`` -> ``depth`` for the model)."""

    def __init__(self, base: torch.utils.data.Dataset, names: dict[str, str]) -> None:
        self.base, self.names = base, names

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {self.names.get(k, k): v for k, v in self.base[i].items()}


def _plain(v: object) -> object:
    """HDF5 attributes come back as numpy scalars; config.json wants plain values."""
    return v.item() if hasattr(v, "item") else v
