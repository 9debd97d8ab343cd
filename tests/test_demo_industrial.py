"""The industrial demo: an MVTec AD tree the mvtec_ad reader takes, with masks where the defects are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
import yaml

from hybrid.data.demo_industrial import DEFECTS, OBJECTS, IndustrialDemoConfig, draw, make_demo_industrial, plan
from hybrid.data.protocol import ProtocolConfig
from hybrid.data.readers import read_dataset
from hybrid.data.xyz import read_xyz
from hybrid.models.depth import sensor_nearness
from hybrid.stages.ingest import ingest

REPO = Path(__file__).resolve().parents[1]
TINY = IndustrialDemoConfig(seed=5, size=48, train_per_category=2, test_good_per_category=1, test_per_defect=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("industrial") / "demo_industrial"
    return out, make_demo_industrial(out, TINY, workers=2)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the tree and the readers


def test_mvtec_ad_reader_takes_the_tree_unchanged(tiny):
    out, summary = tiny
    df = read_dataset("mvtec_ad", {"root": str(out)})
    assert set(df["category"]) == set(DEFECTS) and len(df) == summary["images"] == 45
    for cat, defects in DEFECTS.items():
        rows = df[df["category"] == cat]
        assert set(rows.loc[rows["label"] == 1, "defect"]) == set(defects)
        assert (rows["split"] == "train").sum() == 2 and ((rows["split"] == "test") & (rows["label"] == 0)).sum() == 1
        # the k-th defect type has test_per_defect + k anomalies
        assert [int((rows["defect"] == d).sum()) for d in defects] == [3, 4, 5]
    assert df["depth_path"].isna().all()  # plain MVTec AD: no depth
    for r in df[df["label"] == 1].itertuples():
        image, mask = cv2.imread(r.image_path), cv2.imread(r.mask_path, cv2.IMREAD_UNCHANGED)
        assert image.shape == (48, 48, 3) and mask.shape == (48, 48) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}, r.sample_id  # a binary mask, never empty
    meta = json.loads((out / "demo.json").read_text())
    assert meta["config"]["size"] == 48 and meta["summary"] == summary


def test_demo_industrial_layout_adds_height_maps(tiny):
    out, _ = tiny
    df = read_dataset("demo_industrial", {"root": str(out)})
    assert set(df["dataset"]) == {"demo_industrial"} and df["depth_path"].notna().all()
    assert all(Path(p).is_file() for p in df["depth_path"])
    for r in df[df["category"].isin(OBJECTS)].itertuples():
        near = sensor_nearness(r.depth_path, None)  # the path preprocess takes (depth_source: dataset)
        assert near[24, 24] > near[1, 1] + 1e-3, r.sample_id  # the object is nearer than the table

    (out / "pill/xyz/train/good/000.tiff").rename(out / "moved.tiff")
    try:
        with pytest.raises(ValueError, match="no height map"):
            read_dataset("demo_industrial", {"root": str(out)})
        df = read_dataset("demo_industrial", {"root": str(out), "missing": "skip"})
        assert len(df) == 44 and df.attrs["skipped"][0]["reason"] == "no depth"
    finally:
        (out / "moved.tiff").rename(out / "pill/xyz/train/good/000.tiff")


def test_masks_inside_the_object(tiny):
    """Every anomaly's mask lies on the object: where the written height map is above the table."""
    out, _ = tiny
    df = read_dataset("demo_industrial", {"root": str(out)})
    for r in df[(df["label"] == 1) & df["category"].isin(OBJECTS)].itertuples():
        mask = cv2.imread(r.mask_path, cv2.IMREAD_UNCHANGED) > 0
        z = read_xyz(r.depth_path)[..., 2]
        table = np.median(np.concatenate([z[0], z[-1], z[:, 0], z[:, -1]]))
        assert mask.any() and (z[mask] < table - 1e-4).all(), r.sample_id


def test_ingest_marks_the_protocol(tiny, tmp_path):
    out, _ = tiny
    df = ingest("demo_industrial", {"root": str(out)}, "error", tmp_path / "m.parquet", tmp_path / "s.csv")
    counts = df[df["protocol"].notna()].groupby(["category", "defect", "protocol"]).size().unstack()
    for cat, defects in DEFECTS.items():  # 3, 4 and 5 anomalies: ceil(n/3) = 1, 2, 2 base
        assert [tuple(counts.loc[(cat, d)]) for d in defects] == [(1, 2), (2, 2), (2, 3)]
    base = df[(df["protocol"] == "base") & (df["defect"] == "broken_small")]
    assert sorted(Path(p).name for p in base["image_path"]) == ["000.png", "001.png"]  # first by name
    assert df.loc[df["label"] == 0, "protocol"].isna().all()


# --------------------------------------------------------------------------- drawing


@pytest.mark.parametrize("category", list(DEFECTS))
def test_defects_change_only_the_masked_pixels(category):
    """Drawn with and without the defect from the same generator state, the images differ only
    inside the (slightly widened) mask, and clearly inside it; object masks stay on the object."""
    for defect in DEFECTS[category]:
        for k in range(4):
            clean = draw(category, np.random.default_rng([k, 1]), 64)
            bad = draw(category, np.random.default_rng([k, 1]), 64, defect, np.random.default_rng([k, 2]))
            assert np.array_equal(clean.footprint, bad.footprint) and not clean.mask.any()
            mask = bad.mask > 0
            assert 0.001 < mask.mean() < 0.3, (defect, k, mask.mean())
            assert not (mask & ~bad.footprint).any()
            if category in OBJECTS:
                assert bad.footprint.mean() < 0.6  # an object on a table, not the whole frame
            diff = np.abs(bad.rgb.astype(int) - clean.rgb.astype(int)).max(-1)
            near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            assert (diff[~near] <= 2).all(), (defect, k)  # rounding of soft edges at most
            assert diff[mask].mean() > 12, (defect, k, diff[mask].mean())


def test_normal_images_vary():
    a, b = (draw("bottle", np.random.default_rng(s), 64) for s in (1, 2))
    assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).mean() > 3
    assert not np.array_equal(a.footprint, b.footprint)  # pose and size change


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    make_demo_industrial(again, TINY, workers=1)  # the thread count must not matter
    assert _tree(again) == _tree(out)
    other = tmp_path / "other"
    make_demo_industrial(other, IndustrialDemoConfig(**{**TINY.__dict__, "seed": 6}), workers=1)
    a, b = _tree(out), _tree(other)
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert images and all(a[k] != b[k] for k in images)


def test_a_category_does_not_depend_on_the_others(tmp_path):
    one = make_demo_industrial(tmp_path / "one", IndustrialDemoConfig(**{**TINY.__dict__, "categories": ("pill",)}))
    assert list(one["categories"]) == ["pill"]
    full = make_demo_industrial(tmp_path / "full", TINY)
    assert set(full["categories"]) == set(DEFECTS)
    a, b = _tree(tmp_path / "one" / "pill"), _tree(tmp_path / "full" / "pill")
    assert a == b


def test_config_checks():
    assert IndustrialDemoConfig.from_dict(None) == IndustrialDemoConfig()
    assert IndustrialDemoConfig.from_dict({"categories": ["carpet"]}).categories == ("carpet",)
    for bad, word in (({"size": 16}, "size"), ({"categories": ["screw"]}, "categories"),
                      ({"test_per_defect": 0}, "test_per_defect"), ({"seeds": 1}, "seeds")):
        with pytest.raises(ValueError, match=word):
            IndustrialDemoConfig.from_dict(bad)
    default = plan(IndustrialDemoConfig())
    assert 100 <= len(default) <= 200  # a few seconds to draw


# --------------------------------------------------------------------------- config and workflow


def _merged_config() -> dict:
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())

    def merge(base: dict, extra: dict) -> None:
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                merge(base[k], v)
            else:
                base[k] = v

    merge(cfg, yaml.safe_load((REPO / "config/industrial.yaml").read_text()))
    return cfg


def test_overlay_validates_and_defaults_match_the_code():
    cfg = _merged_config()
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["dataset"]["layout"] == "demo_industrial" and cfg["preprocess"]["depth_source"] == "dataset"
    assert IndustrialDemoConfig.from_dict(cfg["demo"]["industrial"]) == IndustrialDemoConfig()
    assert ProtocolConfig.from_dict(cfg["ingest"]["protocol"]) == ProtocolConfig()


def test_workflow_dry_run_with_the_overlay(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config/config.yaml"), str(REPO / "config/industrial.yaml"), "--quiet", "rules"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {line.split()[0] for line in (proc.stdout + proc.stderr).splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}  # the "rule count" table
    assert {"demo_industrial", "ingest", "preprocess", "train", "generate", "evaluate", "report"} <= jobs, jobs
    assert not jobs & {"demo_data", "classify"}  # no butterflies, no hybrid classification
