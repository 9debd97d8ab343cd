"""Tiny preprocess results and AnomalyFactory checkpoints for the Flare, Blaze and localize tests.

Two datasets (``toy_a``, ``toy_b``) of industrial-like 32 px images: a bright disc on a grey
background, its Canny edges as the shard's ``edge``; test anomalies carry a dark scratch on the disc
(the ``mask``), except one anomaly of ``toy_b`` whose mask is missing (``has_mask`` "0").
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from hybrid.checkpoint import save_checkpoint
from hybrid.data.manifest import make_manifest
from hybrid.data.shards import build_index, shard_name, write_shard
from hybrid.io import write_parquet_atomic
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator
from hybrid.stages.boot import BLAZE_MODEL, BOOT_MODEL

SIZE = 32
TINY = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}
# (dataset, category, split, label, count)
GROUPS = [("toy_a", "disc", "train", 0, 8), ("toy_b", "ring", "train", 0, 6),
          ("toy_a", "disc", "test", 0, 3), ("toy_a", "disc", "test", 1, 3),
          ("toy_b", "ring", "test", 0, 2), ("toy_b", "ring", "test", 1, 2)]


def picture(rng: np.random.Generator, category: str, anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
    img = np.full((SIZE, SIZE, 3), 90, np.uint8)
    c = rng.integers(12, 20, 2)
    r = int(rng.integers(7, 10))
    colour = (220, 180, 60) if category == "disc" else (60, 160, 220)
    cv2.circle(img, (int(c[0]), int(c[1])), r, colour, -1 if category == "disc" else 3)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if anomalous:
        cv2.line(mask, (int(c[0]) - r + 2, int(c[1])), (int(c[0]) + r - 2, int(c[1]) + 2), 255, 2)
        img[mask > 0] = (20, 20, 20)
    img = np.clip(img.astype(np.int16) + rng.integers(-6, 6, img.shape), 0, 255).astype(np.uint8)
    return img, mask


def make_results(root: Path, seed: int = 0) -> dict[str, Path]:
    """results/manifest.parquet and results/shards/ (image, edge, mask, has_mask) for GROUPS."""
    rng = np.random.default_rng(seed)
    rows, images, edges, masks, has = [], [], [], [], []
    for dataset, category, split, label, count in GROUPS:
        for i in range(count):
            sid = f"{dataset}/{category}/{split}/{label}/{i:02d}"
            rows.append({"sample_id": sid, "dataset": dataset, "category": category, "split": split, "label": label,
                         "defect": "scratch" if label else "good", "image_path": f"/data/{sid}.png"})
            img, mask = picture(rng, category, bool(label))
            images.append(img)
            edges.append(cv2.Canny(img, 50, 150))
            masks.append(mask)
            has.append("0" if (dataset == "toy_b" and label and i == 0) else "1" if label else "0")
    manifest = make_manifest(rows, "af_data")
    results = root / "results"
    (results / "shards").mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(manifest, results / "manifest.parquet")
    paths = []
    for k, lo in enumerate(range(0, len(images), 16)):
        sl = slice(lo, lo + 16)
        p = results / "shards" / shard_name(k)
        write_shard(p, {"image": np.stack(images[sl]), "edge": np.stack(edges[sl]), "mask": np.stack(masks[sl])},
                    {"sample_id": manifest["sample_id"].tolist()[sl], "has_mask": has[sl]},
                    {"resolution": SIZE, "edge_model": "canny", "fingerprint": f"af-{seed}-{k}"})
        paths.append(p)
    write_parquet_atomic(build_index(paths), results / "shards" / "index.parquet")
    return {"manifest": results / "manifest.parquet", "index": results / "shards" / "index.parquet"}


def save_af_checkpoint(path: Path, stage: str, model: dict | None = None, seed: int = 0) -> Path:
    """A random-weight checkpoint in the project's format for ``stage`` (boot, flare, blaze), or of
    ``model`` (e.g. an AnomalyHybrid one) when given."""
    torch.manual_seed(seed)
    cfg = model or {**TINY, **(BLAZE_MODEL if stage == "blaze" else BOOT_MODEL)}
    G = Generator(**cfg)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, 4, 3, 2)
    opts = [torch.optim.Adam(m.parameters()) for m in (G, D)]
    config = {"model": G.config, "discriminator": D.config, "data": {"resolution": SIZE}}
    if stage in ("flare", "blaze") and model is None:
        config["anomalyfactory"] = {"stage": stage}
    save_checkpoint(path, G, D, *opts, config, {"step": 0, "epoch": 0, "lr": 0.0, "seed": seed})
    return path


TRAIN = {"epochs": 0, "epochs_decay": 1, "batch_size": 4, "perceptual": "none", "lambda_l1": 10.0, "ndf": 4,
         "checkpoint_every": 2, "sample_every": 2, "log_every": 1, "seed": 3, "device": "cpu"}
AUGMENT = {"tps_prob": 0.0, "rtp_prob": 0.5, "flip_tb": 0.5}
MANIPULATE = {"area": [0.02, 0.08], "regions": [1, 2]}
