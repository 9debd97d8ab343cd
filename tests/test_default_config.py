"""Your data, first try: the default config with only `dataset` changed runs on every layout,
offline and without weights (the auto settings follow the data), as the README's examples say."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from hybrid.data.xyz import write_xyz
from tests.workflow_helpers import snakemake, write_config

SIZE = 40
# Tiny sizes for the stages that industrial layouts add; everything else is the default config.
INDUSTRIAL_TINY = {
    "preprocess": {"edge_model": "auto", "depth_source": "auto"},  # the defaults, not TINY's demo choices
    "generate": {"global": {"count": 1}, "local": {"count": 4}, "normal": {"count": 2}},
    "evaluate": {"n_centres": 2, "kid_subsets": 2},
    "baselines": {"count": 2},
    "fewshot": {"shots": [1, "all"], "weights": "random", "device": "cpu", "max_generated": 4},
    "classify_defects": {"weights": "random", "arch": "resnet18", "epochs": 1, "input_size": 32, "device": "cpu"},
    "segment": {"base_width": 4, "epochs": 1, "epoch_length": 8, "batch_size": 4, "variants": ["both"],
                "plus_normals": [False], "device": "cpu", "strip_images": 2},
}


def picture(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A grey part on a dark background; a defect is a bright scratch, returned as its mask too."""
    img = np.full((SIZE, SIZE, 3), 30, np.uint8)
    cv2.circle(img, (SIZE // 2 + int(rng.integers(-3, 4)), SIZE // 2), 13, (150, 150, 160), -1)
    img = np.clip(img.astype(int) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if defect:
        x, y = rng.integers(12, 24, 2)
        cv2.line(mask, (int(x), int(y)), (int(x) + 8, int(y) + 5), 255, 2)
        img[mask > 0] = 250
    return img, mask


def save(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(a, cv2.COLOR_RGB2BGR) if a.ndim == 3 else a)
    return path


SPLIT = [("train", "good", 6), ("test", "good", 2), ("test", "crack", 3), ("test", "dent", 3)]


def mvtec_ad(root: Path, rng) -> dict:
    for split, defect, n in SPLIT:
        for i in range(n):
            im, m = picture(rng, defect != "good")
            save(root / "part" / split / defect / f"{i:03d}.png", im)
            if defect != "good":
                save(root / "part" / "ground_truth" / defect / f"{i:03d}_mask.png", m)
    return {"root": str(root)}


def mvtec_3d(root: Path, rng) -> dict:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    for split, defect, n in SPLIT:
        for i in range(n):
            im, m = picture(rng, defect != "good")
            d = root / "part" / split / defect
            save(d / "rgb" / f"{i:03d}.png", im)
            z = 1.0 - 0.2 * (((xx - SIZE / 2) ** 2 + (yy - SIZE / 2) ** 2) < 169)
            write_xyz(d / "xyz" / f"{i:03d}.tiff", np.stack([xx, yy, z], -1).astype(np.float32))
            if defect != "good":
                save(d / "gt" / f"{i:03d}.png", m)
    return {"root": str(root)}


def mvtec_loco(root: Path, rng) -> dict:
    for split, defect, n in SPLIT:
        for i in range(n):
            im, m = picture(rng, defect != "good")
            save(root / "part" / split / defect / f"{i:03d}.png", im)
            if defect != "good":
                save(root / "part" / "ground_truth" / defect / f"{i:03d}" / "000.png", m)
    return {"root": str(root)}


def visa(root: Path, rng) -> dict:
    rows = []
    for split, defect, n in SPLIT:
        for i in range(n):
            im, m = picture(rng, defect != "good")
            kind = "Normal" if defect == "good" else "Anomaly"
            rel = f"part/Data/Images/{kind}/{split}{defect}{i:03d}.JPG"
            save(root / rel, im)
            mask = None
            if defect != "good":
                mask = f"part/Data/Masks/Anomaly/{split}{defect}{i:03d}.png"
                save(root / mask, m)
            rows.append(["part", split, "normal" if defect == "good" else "anomaly", rel, mask])
    (root / "split_csv").mkdir(parents=True)
    pd.DataFrame(rows, columns=["object", "split", "label", "image", "mask"]).to_csv(root / "split_csv/1cls.csv",
                                                                                    index=False)
    return {"root": str(root)}


def folder(root: Path, rng) -> dict:
    for split, defect, n in SPLIT:
        for i in range(n):
            im, m = picture(rng, defect != "good")
            if split == "train":
                save(root / "good" / f"{i:03d}.png", im)
            elif defect != "good":
                save(root / "bad" / defect / f"{i:03d}.png", im)
                save(root / "masks" / defect / f"{i:03d}.png", m)
    return {"normal_dir": str(root / "good"), "abnormal_dir": str(root / "bad"), "mask_dir": str(root / "masks"),
            "category": "part"}


TREES = {"mvtec_ad": mvtec_ad, "mvtec_3d": mvtec_3d, "mvtec_loco": mvtec_loco, "visa": visa, "folder": folder}
# The README's examples run whole; the other layouts up to generation, where they used to fail.
WHOLE = ("mvtec_ad", "folder")


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TREES))
def test_default_config_runs_on_every_layout_offline(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_MODEL_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path / "cache"))
    options = TREES[layout](tmp_path / "data", np.random.default_rng(0))
    write_config(tmp_path, INDUSTRIAL_TINY)
    target = [] if layout in WHOLE else ["results/generated/manifest.parquet"]
    # only `dataset` changed, as the README's examples do it
    snakemake(tmp_path, "--cores", "2", *target, "--config", "dataset=" + json.dumps({"layout": layout,
                                                                                     "options": options}))
    r = tmp_path / "results"
    shard = sorted((r / "shards").glob("shard-*.h5"))[0]
    with h5py.File(shard) as f:
        auto = f.attrs["auto"]
        assert "preprocess.edge_model: auto -> canny" in auto
        assert ("depth_source: auto -> sensor" in auto) == (layout == "mvtec_3d")
    cfg = json.loads((r / "train/checkpoint/config.json").read_text())
    assert cfg["model"]["decoders"] == (["AHD", "AHE"] if layout == "mvtec_3d" else ["AHE"])
    gen = pd.read_parquet(r / "generated/manifest.parquet")
    local = gen[gen["kind"] == "local"]
    assert len(local) and set(local["defect"]) <= ({"anomaly"} if layout == "visa" else {"crack", "dent"})
    if layout in WHOLE:
        html = (r / "report/index.html").read_text()
        assert "What the auto settings chose" in html and "auto -&gt; canny" in html
        for name in ("classify_defects", "segment", "fewshot", "evaluate"):
            assert (r / "metrics" / f"{name}.json").exists(), name
