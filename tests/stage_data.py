"""Tiny results folders for the evaluate, classify and report tests: real shards, generated shards.

Butterfly-like: category erato (signal parents "major", others "minor") and melpomene ("mimic");
hybrids are redder than non-hybrids, so a classifier can learn them from a few 32 px images.
Everything is written with the project's own writers, in the layout the stages read.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hybrid.data.manifest import make_manifest
from hybrid.data.shards import build_index, shard_name, write_shard
from hybrid.io import write_parquet_atomic
from hybrid.viz import contact_sheet

SIZE = 32
HYBRID_TYPES = {"major": "signal", "minor": "non-signal", "mimic": "mimic"}
REPO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"

# (split, category, ssp_indicator, label, count)
GROUPS = [
    ("train", "erato", "major", 0, 10),
    ("train", "erato", "major", 1, 6),
    ("test", "erato", "major", 0, 6),
    ("test", "erato", "major", 1, 3),
    ("test", "erato", "minor", 0, 6),
    ("test", "erato", "minor", 1, 2),
    ("test", "melpomene", "mimic", 0, 6),
    ("test", "melpomene", "mimic", 1, 1),  # one real anomaly: too few cluster-LPIPS centres
]


def image(rng: np.random.Generator, label: int, category: str, size: int = SIZE) -> np.ndarray:
    """A noisy wing-ish picture: a red band for hybrids, a yellow one otherwise."""
    img = rng.integers(10, 60, (size, size, 3)).astype(np.int16)
    band = (200, 40, 30) if label else (220, 200, 40)
    lo = size // 3 if category == "erato" else size // 2
    img[lo : lo + size // 4] += np.array(band, np.int16) - 30
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def write_shards(out_dir: Path, images: np.ndarray, strings: dict[str, list[str]], per_shard: int) -> pd.DataFrame:
    """Shards of ``per_shard`` samples and their index (sample_id, shard, index)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, len(images), per_shard)):
        p = out_dir / shard_name(k)
        write_shard(p, {"image": images[lo : lo + per_shard]},
                    {name: v[lo : lo + per_shard] for name, v in strings.items()}, {"resolution": SIZE})
        paths.append(p)
    return build_index(paths)


def make_real(root: Path, seed: int = 0) -> dict[str, Path]:
    """results/manifest.parquet, results/shards/ (index, skipped.parquet), a reference CSV and
    results/ingest_skipped.csv, for the groups above."""
    rng = np.random.default_rng(seed)
    rows, ref, images = [], [], []
    for split, category, ssp, label, count in GROUPS:
        for i in range(count):
            stem = f"{split}_{ssp}_{label}_{i:02d}"
            rows.append({"sample_id": f"heliconius/{split}/{stem}", "dataset": "heliconius", "category": category,
                         "split": split, "label": label, "subspecies": ssp,
                         "hybrid_type": HYBRID_TYPES[ssp] if label else None,
                         "image_path": f"/data/images/{stem}.jpg"})
            if split == "test":  # the reference spells the extension in capitals, as the real CSVs do
                ref.append({"filename": f"{stem}.JPG", "hybrid_stat": label, "subspecies_ref": ssp,
                            "ssp_indicator": ssp})
            images.append(image(rng, label, category))
    manifest = make_manifest(rows, "stage_data")
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(manifest, results / "manifest.parquet")
    index = write_shards(results / "shards", np.stack(images), {"sample_id": manifest["sample_id"].tolist()}, 16)
    write_parquet_atomic(index, results / "shards" / "index.parquet")
    write_parquet_atomic(pd.DataFrame([{"shard": "shard-00001.h5", "sample_id": "heliconius/train/broken",
                                        "path": "/data/images/broken.jpg", "reason": "truncated JPEG"}]),
                         results / "shards" / "skipped.parquet")
    pd.DataFrame([{"path": "/data/images/absent.jpg", "source": "train.csv", "reason": "missing"}]).to_csv(
        results / "ingest_skipped.csv", index=False)
    ref_csv = root / "ref_test.csv"
    pd.DataFrame(ref).to_csv(ref_csv, index=False)
    return {"manifest": results / "manifest.parquet", "index": results / "shards" / "index.parquet",
            "reference": ref_csv, "ingest_skipped": results / "ingest_skipped.csv"}


def make_generated(root: Path, seed: int = 1, per_decoder: dict[str, int] | None = None) -> Path:
    """results/generated/: shards, manifest.parquet and sheets/<category>.png.

    ``per_decoder``: category -> global images per decoder (default erato 4, melpomene 3); each
    category also gets one generated normal image per decoder.
    """
    rng = np.random.default_rng(seed)
    out = root / "results" / "generated"
    rows, images = [], []
    for category, n in (per_decoder or {"erato": 4, "melpomene": 3}).items():
        for kind, count in (("global", n), ("normal", 1)):
            for i in range(count):
                for decoder in ("AHD", "AHE"):
                    pair = f"{kind}-{category}-{i:05d}"
                    rows.append({"sample_id": f"{pair}-{decoder}", "pair_id": pair,
                                 "reference_id": f"heliconius/train/ref{i}", "target_id": f"heliconius/train/tgt{i}",
                                 "decoder": decoder, "manipulation": "none", "category": category, "kind": kind,
                                 "label": int(kind != "normal")})
                    images.append(image(rng, int(kind != "normal"), category))
    gen = pd.DataFrame(rows)
    strings = {c: gen[c].astype(str).tolist() for c in ("sample_id", "pair_id", "reference_id", "target_id",
                                                         "decoder", "manipulation", "category", "kind")}
    index = write_shards(out, np.stack(images), strings, 8)
    gen = index.merge(gen, on="sample_id")
    write_parquet_atomic(gen, out / "manifest.parquet")
    sheets = out / "sheets"
    sheets.mkdir(parents=True, exist_ok=True)
    for category in gen["category"].unique():
        sel = (gen["category"] == category).to_numpy()
        sheet = contact_sheet(list(np.stack(images)[sel]), gen.loc[sel, "decoder"].tolist(), cols=4, cell=64)
        cv2.imwrite(str(sheets / f"{category}.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out / "manifest.parquet"


def make_losses(root: Path, steps: int = 30) -> Path:
    """results/train/losses.csv in the train stage's columns."""
    rng = np.random.default_rng(2)
    step = np.arange(1, steps + 1)
    df = pd.DataFrame({"step": step, "epoch": step // 10, "lr": 2e-4,
                       "G_total": 5 * np.exp(-step / 20) + rng.random(steps), "G_gan": 1 + rng.random(steps),
                       "G_feat": 2 * np.exp(-step / 20), "G_vgg": 0.0, "G_mask": 0.0,
                       "D_total": 0.5 + 0.1 * rng.random(steps), "D_real": 0.25, "D_fake": 0.25})
    path = root / "results" / "train" / "losses.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path
