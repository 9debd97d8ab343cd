"""The preprocess stage: manifest -> resized images, edge maps and depth maps in HDF5 shards.

Decoding runs in DataLoader workers; edges (PiDiNet or Canny) and depth (Depth Anything V2, or
the dataset's own sensor depth) are computed in batches on the chosen device. Each shard is
written whole under a temporary name, and carries a fingerprint of its inputs and settings, so an
interrupted run resumes at the first shard that is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hybrid.config import check_keys, resolve_device
from hybrid.data.images import ImageError, read_image, read_mask
from hybrid.data.shards import build_index, shard_is_current, shard_name, write_shard
from hybrid.io import write_parquet_atomic
from hybrid.models.depth import sensor_nearness, to_uint16

log = logging.getLogger(__name__)

EDGE_MODELS = ("pidinet", "pidinet_small", "pidinet_tiny", "canny", "none")
DEPTH_SOURCES = ("depth_anything_small", "depth_anything_base", "depth_anything_large", "sensor", "dataset", "none")


@dataclass
class PreprocessConfig:
    resolution: int = 256
    fit: str = "stretch"  # stretch | crop | pad (see hybrid.data.images.fit)
    shard_size: int = 1024
    bad_images: str = "error"  # error | skip (skipped files are listed in skipped.csv and the log)
    max_pixels: int = 200_000_000
    edge_model: str = "pidinet"
    depth_source: str = "depth_anything_small"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 depth on cuda, fp32 elsewhere) | fp32 | bf16 | fp16
    batch_size: int = 16
    workers: int = 2
    weights: dict[str, str] = field(default_factory=dict)  # store name -> explicit path

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        cfg = cls(**check_keys(d, cls, "preprocess"))
        for key, value, choices in (("edge_model", cfg.edge_model, EDGE_MODELS),
                                    ("depth_source", cfg.depth_source, DEPTH_SOURCES),
                                    ("bad_images", cfg.bad_images, ("error", "skip")),
                                    ("device", cfg.device, ("auto", "cpu", "cuda")),
                                    ("precision", cfg.precision, ("auto", "fp32", "bf16", "fp16"))):
            if value not in choices:
                raise ValueError(f"preprocess.{key}: {value!r} is not one of {list(choices)}")
        return cfg


class _Decoded(Dataset):
    """Decodes one manifest row: fitted RGB, mask and sensor depth. Errors come back as data so
    the main process decides between failing and skipping (exceptions from workers lose type)."""

    def __init__(self, rows: pd.DataFrame, cfg: PreprocessConfig, sensor_depth: bool) -> None:
        self.rows = rows.reset_index(drop=True)
        self.cfg = cfg
        self.sensor_depth = sensor_depth

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows.iloc[i]
        c = self.cfg
        out: dict = {"sample_id": r["sample_id"], "error": None, "path": r["image_path"]}
        try:
            out["image"] = read_image(r["image_path"], c.resolution, c.fit, c.max_pixels)
            if pd.notna(r["mask_path"]):
                out["mask"] = read_mask(r["mask_path"], c.resolution, c.fit)
            if self.sensor_depth:
                if pd.isna(r["depth_path"]):
                    raise ImageError(r["image_path"], "no depth_path for this sample; the depth source "
                                     "'sensor'/'dataset' needs one per image (or choose depth_anything_*)")
                out["depth"] = to_uint16(sensor_nearness(r["depth_path"], (c.resolution, c.resolution)))
        except (ImageError, OSError, ValueError) as e:
            out["error"] = str(e)
        return out


def _collate(items: list[dict]) -> list[dict]:
    return items


def fingerprint(rows: pd.DataFrame, cfg: PreprocessConfig) -> str:
    """Hash of the settings and of every input file's identity (path, size, mtime)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(cfg).items()
                                   if k not in ("device", "batch_size", "workers")}, sort_keys=True).encode())
    for r in rows.itertuples(index=False):
        for p in (r.image_path, r.mask_path, r.depth_path):
            if isinstance(p, str):
                try:
                    st = Path(p).stat()
                    h.update(f"{r.sample_id}|{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{r.sample_id}|{p}|missing\n".encode())
    return h.hexdigest()


class _Maps:
    """Edge and depth networks, loaded once, applied to a batch of uint8 images."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device) -> None:
        from hybrid.models.edges import make_edge_detector

        self.cfg = cfg
        self.device = device
        cuda = device.type == "cuda"
        p = cfg.precision
        self.edge_precision = "fp32" if p == "auto" else p
        self.depth_precision = ("bf16" if cuda else "fp32") if p == "auto" else p
        self.edge = None
        if cfg.edge_model != "none":
            self.edge = make_edge_detector(cfg.edge_model, device, cfg.weights.get(cfg.edge_model),
                                           precision=self.edge_precision)
        self.depth = None
        if cfg.depth_source.startswith("depth_anything"):
            from hybrid.models.depth import load_depth_anything

            self.depth = load_depth_anything(cfg.weights.get(cfg.depth_source, cfg.depth_source), device)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        batch = torch.from_numpy(images).to(self.device)
        if self.edge is not None:
            e = self.edge(batch).float().clamp(0, 1)
            out["edge"] = (e * 255).round().to(torch.uint8).cpu().numpy()
        if self.depth is not None:
            from hybrid.models.depth import predict_depth

            d = predict_depth(self.depth, batch, precision=self.depth_precision)
            out["depth"] = to_uint16(d.cpu().numpy())
        return out

    def attrs(self) -> dict[str, str]:
        from hybrid.models.store import REGISTRY

        def source(name: str) -> str:
            if name in self.cfg.weights:
                return str(self.cfg.weights[name])
            spec = REGISTRY.get(name)
            return (spec.hub_id or spec.filename) if spec else name

        return {
            "edge_model": self.cfg.edge_model,
            "edge_weights": source(self.cfg.edge_model) if self.cfg.edge_model.startswith("pidinet") else "",
            "depth_source": self.cfg.depth_source,
            "depth_weights": source(self.cfg.depth_source) if self.depth is not None else "",
        }


def preprocess(manifest: pd.DataFrame, out_dir: str | Path, cfg: PreprocessConfig) -> pd.DataFrame:
    """Write ``out_dir/shard-*.h5``, ``out_dir/index.parquet`` and ``out_dir/skipped.csv``.

    Returns the index (sample_id, shard, index). Shards whose fingerprint matches are kept.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    sensor = cfg.depth_source in ("sensor", "dataset")
    n_shards = (len(manifest) + cfg.shard_size - 1) // cfg.shard_size
    chunks = [manifest.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size] for i in range(n_shards)]
    prints = [fingerprint(c, cfg) for c in chunks]
    todo = [i for i in range(n_shards) if not shard_is_current(out_dir / shard_name(i), prints[i])]
    log.info("preprocess: %d images in %d shards (%d to write, %d kept) on %s",
             len(manifest), n_shards, len(todo), n_shards - len(todo), device)

    skipped: list[dict] = _previous_skips(out_dir, {i for i in range(n_shards) if i not in todo})
    if todo:
        maps = _Maps(cfg, device)
        attrs_common = {"resolution": cfg.resolution, "fit": cfg.fit, **maps.attrs()}
        rows = pd.concat([chunks[i] for i in todo])
        loader = DataLoader(_Decoded(rows, cfg, sensor), batch_size=cfg.batch_size, num_workers=cfg.workers,
                            collate_fn=_collate)
        owners = [i for i in todo for _ in range(len(chunks[i]))]  # the shard of each decoded row
        done, acc = 0, []
        bar = tqdm(total=len(rows), desc="preprocess", unit="img")
        for batch in loader:
            good = [it for it in batch if it["error"] is None]
            for it in batch:
                if it["error"] is not None:
                    if cfg.bad_images == "error":
                        raise ImageError(it["path"], it["error"].split(": ", 1)[-1] +
                                         " (or set preprocess.bad_images: skip to leave it out)")
                    log.warning("skipped %s: %s", it["path"], it["error"])
            maps_out = maps(np.stack([it["image"] for it in good])) if good else {}
            k = 0
            for it in batch:
                if it["error"] is None:
                    for name, arr in maps_out.items():
                        it.setdefault(name, arr[k])
                    k += 1
                acc.append(it)
                done += 1
                shard = owners[done - 1]
                if done == len(owners) or owners[done] != shard:  # the shard's last row: write it
                    skipped += _flush(out_dir, shard, acc, prints[shard], attrs_common)
                    acc = []
            bar.update(len(batch))
        bar.close()

    for stale in out_dir.glob("shard-*.h5"):
        if int(stale.stem.split("-")[1]) >= n_shards:
            stale.unlink()
    index = build_index([out_dir / shard_name(i) for i in range(n_shards)])
    write_parquet_atomic(pd.DataFrame(skipped, columns=["shard", "sample_id", "path", "reason"]),
                         out_dir / "skipped.parquet")
    write_parquet_atomic(index, out_dir / "index.parquet")
    log.info("preprocess: wrote %d samples; %d skipped", len(index), len(skipped))
    return index



def _previous_skips(out_dir: Path, kept: set[int]) -> list[dict]:
    p = out_dir / "skipped.parquet"
    if not p.exists() or not kept:
        return []
    df = pd.read_parquet(p)
    return df[df["shard"].isin([shard_name(i) for i in kept])].to_dict("records")


def _flush(out_dir: Path, i: int, items: list[dict], fp: str, attrs: dict) -> list[dict]:
    good = [it for it in items if it["error"] is None]
    skipped = [{"shard": shard_name(i), "sample_id": it["sample_id"], "path": it["path"], "reason": it["error"]}
               for it in items if it["error"] is not None]
    arrays = {"image": np.stack([it["image"] for it in good])} if good else {
        "image": np.zeros((0, 1, 1, 3), np.uint8)}
    for name in ("edge", "depth", "mask"):
        have = [name in it for it in good]
        if good and all(have):
            arrays[name] = np.stack([it[name] for it in good])
        elif name == "mask" and any(have):
            # some samples have masks: store zeros for the rest and say which are real
            arrays[name] = np.stack([it.get(name, np.zeros(it["image"].shape[:2], np.uint8)) for it in good])
    strings = {"sample_id": [it["sample_id"] for it in good]}
    if "mask" in arrays:
        strings["has_mask"] = ["1" if "mask" in it else "0" for it in good]
    write_shard(out_dir / shard_name(i), arrays, strings, {**attrs, "fingerprint": fp, "n_skipped": len(skipped)})
    return skipped
