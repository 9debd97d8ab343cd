"""AnomalyFactory's BootGenerator (paper 002, Sec. 3.2) and what its three stages share.

Boot is the train stage (:func:`hybrid.stages.train.run`) with the AnomalyFactory model
forced: one decoder group (texture + heatmap, fused per Eq. 1 onto the reference image), conditions
reference RGB + target edge (:data:`BOOT_MODEL`), pix2pixHD losses and the augment section's local
TPS, resize-translate-pad and flips, each condition under its own draw and the target image under
the edge's (Eq. 2-4). The paper's schedule is 30 epochs at batch 32 (``config/paper.yaml``).

Also here: the balanced per-dataset subsampling of the training images (Sec. 4.2: "we randomly
sample 200x12 images from VisA and 400x30 images from RealIAD", i.e. 200 of each of VisA's 12
categories), ``anomalyfactory.per_dataset`` (dataset -> images per category), which Boot, Flare and
Blaze share; and the checks that name the expected checkpoint when a stage is given
the wrong one (:func:`load_af_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid.checkpoint import load_checkpoint
from hybrid.data.manifest import matches, read_manifest
from hybrid.io import write_parquet_atomic
from hybrid.models.generator import Generator
from hybrid.stages.train import DEFAULT_SELECT
from hybrid.stages.train import run as run_train_stage

log = logging.getLogger(__name__)

BOOT_MODEL = {"level": "rgb", "decoders": ["AHE"], "conditions": ["reference_image", "target_edge"]}
BLAZE_MODEL = {"level": "blaze", "decoders": ["AHE"], "conditions": ["target_image", "target_edge"]}
DECODER = "AHE"  # the one decoder group of every AnomalyFactory model
STAGE_OUTPUTS = {"boot": "results/anomalyfactory/boot/checkpoint",
                 "flare": "results/anomalyfactory/flare/checkpoint",
                 "blaze": "results/anomalyfactory/blaze/checkpoint"}
MAKES = {"boot": "the boot rule (`snakemake results/anomalyfactory/boot/checkpoint` with anomalyfactory.enabled: true; "
                 "it trains the AnomalyFactory model of the train stage: decoders [AHE], conditions "
                 "[reference_image, target_edge])",
         "flare": "the flare rule (`snakemake results/anomalyfactory/flare/checkpoint` with anomalyfactory.enabled: "
                  "true), which starts from the Boot checkpoint",
         "blaze": "the blaze rule (`snakemake results/anomalyfactory/blaze/checkpoint` with anomalyfactory.enabled: "
                  "true), which learns from Flare's anomalies"}


def boot_model_config(model_cfg: Mapping) -> dict:
    """The model section with the AnomalyFactory decoders and conditions forced (sizes kept)."""
    return {**{k: v for k, v in model_cfg.items() if k in ("ngf", "n_downsample", "n_blocks")}, **BOOT_MODEL}


def blaze_model_config(model_cfg: Mapping) -> dict:
    return {**{k: v for k, v in model_cfg.items() if k in ("ngf", "n_downsample", "n_blocks")}, **BLAZE_MODEL}


def load_af_checkpoint(path: str | Path, stage: str, purpose: str) -> tuple[Generator, dict]:
    """The generator and config.json of the ``stage`` ("boot", "flare", "blaze") checkpoint at ``path``.

    A missing directory, or one holding another model (an AnomalyHybrid checkpoint with depth
    conditions, a Flare checkpoint where Boot is wanted, ...), fails naming the expected checkpoint
    and the rule that makes it.
    """
    path = Path(path)
    expect = BLAZE_MODEL if stage == "blaze" else BOOT_MODEL
    want = (f"an AnomalyFactory {stage.capitalize()} checkpoint (model level {expect['level']}, decoders "
            f"{expect['decoders']}, conditions {expect['conditions']}), e.g. {STAGE_OUTPUTS[stage]}, made by "
            f"{MAKES[stage]}")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{purpose} needs {want}; {path} is not a checkpoint directory (no config.json / "
                                "model.safetensors there)")
    config = json.loads((path / "config.json").read_text())
    model = config.get("model", {})
    got = {k: model.get(k) for k in expect}
    made_by = (config.get("anomalyfactory") or {}).get("stage", "boot" if got == BOOT_MODEL else None)
    if got != expect or (stage != "boot" and made_by != stage) or (stage == "boot" and made_by not in ("boot", None)):
        what = (f"a {made_by.capitalize()} checkpoint" if made_by in STAGE_OUTPUTS else
                f"a generator with level {got['level']}, decoders {got['decoders']}, conditions {got['conditions']}"
                + (" (an AnomalyHybrid model, not AnomalyFactory)" if got != expect else ""))
        raise ValueError(f"{purpose} needs {want}; {path} holds {what}")
    return load_checkpoint(path), config


# ----------------------------------------------------------------------------- per-dataset subsampling


def _key(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def subsample_per_dataset(rows: pd.DataFrame, per_dataset: Mapping[str, int] | None, seed: int) -> pd.DataFrame:
    """At most ``per_dataset[name]`` rows of *each category* of each named ``dataset`` (the paper's
    "200x12 images from VisA": 200 of each of its 12 categories), drawn seeded per (dataset, category)
    without replacement; a category with fewer keeps all of them (logged). Datasets not named keep
    all their rows; an empty ``per_dataset`` returns ``rows`` unchanged."""
    if not per_dataset:
        return rows
    if "dataset" not in rows.columns or "category" not in rows.columns:
        raise ValueError("anomalyfactory.per_dataset needs the manifest's 'dataset' and 'category' columns")
    have = set(rows["dataset"].astype(str))
    unknown = sorted(set(per_dataset) - have)
    if unknown:
        raise ValueError(f"anomalyfactory.per_dataset names dataset(s) {unknown} that the selected training rows do "
                         f"not have; they have {sorted(have)}")
    parts = []
    for (name, category), g in rows.groupby([rows["dataset"].astype(str), rows["category"].astype(str)], sort=True):
        n = per_dataset.get(name)
        if n is not None and int(n) < len(g):
            rng = np.random.default_rng([seed, _key(name), _key(category)])
            g = g.iloc[np.sort(rng.choice(len(g), size=int(n), replace=False))]
        elif n is not None and int(n) > len(g):
            log.info("per_dataset: %s / %s has %d images, fewer than %d: all of them", name, category, len(g), int(n))
        parts.append(g)
    out = pd.concat(parts).sort_index()
    for name in sorted(set(per_dataset)):
        sub = out[out["dataset"].astype(str) == name]
        log.info("per_dataset: %s: %d images per category -> %d of %d images over %d categories", name,
                 int(per_dataset[name]), len(sub), int((rows["dataset"].astype(str) == name).sum()),
                 sub["category"].nunique())
    return out


def training_rows(manifest: str | Path, select: Mapping | None, per_dataset: Mapping[str, int] | None,
                  seed: int, where: str) -> pd.DataFrame:
    """The manifest rows an AnomalyFactory stage learns from: ``select``, then the per-dataset draw."""
    rows = read_manifest(manifest)
    rows = rows[matches(rows, dict(select or DEFAULT_SELECT), where)]
    return subsample_per_dataset(rows, per_dataset, seed)


# ----------------------------------------------------------------------------- the stage


def run(index: str | Path, manifest: str | Path, checkpoint: str | Path, losses: str | Path,
        samples: str | Path, work_root: str | Path, model_cfg: Mapping, train_cfg: Mapping,
        boot_cfg: Mapping, augment_cfg: Mapping, select: Mapping | None = None,
        per_dataset: Mapping[str, int] | None = None, seed: int = 0, paths: Mapping | None = None,
        threads: int = 1) -> Path:
    """Train Boot: the train stage with :data:`BOOT_MODEL` and ``boot_cfg`` (epochs, epochs_decay,
    batch_size) over the train section; with ``per_dataset`` on a seeded per-dataset draw of the
    selected rows (written as a manifest beside the work folders, so the work key follows it)."""
    unknown = sorted(set(boot_cfg) - {"epochs", "epochs_decay", "batch_size"})
    if unknown:
        raise ValueError(f"unknown anomalyfactory.boot config key(s) {unknown}; valid keys are "
                         "['batch_size', 'epochs', 'epochs_decay']")
    work_root = Path(work_root)
    train = {**{k: v for k, v in train_cfg.items() if k != "select"}, **boot_cfg}
    if per_dataset:
        rows = training_rows(manifest, select, per_dataset, seed, "train.select")
        work_root.mkdir(parents=True, exist_ok=True)
        manifest = work_root / "per_dataset_manifest.parquet"  # a file: the train stage keeps it
        write_parquet_atomic(rows, manifest)
    log.info("boot: AnomalyFactory BootGenerator (%s), %s epochs + %s decay, batch %s", BOOT_MODEL, train.get("epochs"),
             train.get("epochs_decay"), train.get("batch_size"))
    return run_train_stage(index, manifest, checkpoint, losses, samples, work_root, boot_model_config(model_cfg), train,
                           dict(augment_cfg), select=dict(select) if select else None, paths=dict(paths or {}),
                           threads=threads)
