"""The industrial protocol split at ingest: base / eval per (category, defect type)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hybrid.data.manifest import ManifestError, read_manifest, validate_manifest
from hybrid.data.protocol import ProtocolConfig, assign_protocol, summary
from hybrid.data.readers import read_dataset
from hybrid.stages.ingest import SKIPPED_COLUMNS, ingest
from tests.test_readers import heliconius_tree, visa_tree

# category -> defect -> file stems, written out of order and with gaps: the split follows sorted names
TREE = {
    "bottle": {"broken": ["002", "000", "001"], "crack": ["013", "010", "011", "012"],
               "scratch": ["006", "000", "005", "001", "004", "002", "003"]},
    "cable": {"cut": ["001", "000"], "hole": ["004", "001", "003", "000", "002"]},
}


def png(path: Path, value: int = 128, mask: bool = False) -> Path:
    """A real 16x16 PNG (a mask: a white square on black)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        a = np.zeros((16, 16), np.uint8)
        a[4:10, 5:12] = 255
    else:
        a = np.full((16, 16, 3), value, np.uint8)
    assert cv2.imwrite(str(path), a)
    return path


def mvtec_tree(root: Path, tree: dict = TREE) -> Path:
    for cat, defects in tree.items():
        for i in range(3):
            png(root / cat / "train/good" / f"{i:03d}.png")
        png(root / cat / "test/good/000.png")
        for defect, stems in defects.items():
            for stem in stems:
                png(root / cat / "test" / defect / f"{stem}.png", 60)
                png(root / cat / "ground_truth" / defect / f"{stem}_mask.png", mask=True)
    return root


def run_ingest(tmp_path: Path, layout: str, options: dict, missing: str = "error",
               protocol: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    out = tmp_path / "results"
    df = ingest(layout, options, missing, out / "manifest.parquet", out / "ingest_skipped.csv", protocol)
    return df, pd.read_csv(out / "ingest_skipped.csv", dtype={"count": "Int64"})


def by_group(df: pd.DataFrame) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(category, defect) -> protocol -> sorted file stems."""
    out: dict = {}
    for r in df[df["protocol"].notna()].itertuples():
        out.setdefault((r.category, r.defect), {}).setdefault(r.protocol, []).append(Path(r.image_path).stem)
    return {k: {p: sorted(v) for p, v in d.items()} for k, d in out.items()}


# ---------------------------------------------------------------- the rule


def test_first_third_by_sorted_name_is_base(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    df, skipped = run_ingest(tmp_path, "mvtec_ad", {"root": str(root)})
    assert by_group(df) == {
        ("bottle", "broken"): {"base": ["000"], "eval": ["001", "002"]},  # ceil(3/3) = 1
        ("bottle", "crack"): {"base": ["010", "011"], "eval": ["012", "013"]},  # ceil(4/3) = 2
        ("bottle", "scratch"): {"base": ["000", "001", "002"], "eval": ["003", "004", "005", "006"]},  # ceil(7/3)
        ("cable", "hole"): {"base": ["000", "001"], "eval": ["002", "003", "004"]},  # ceil(5/3) = 2
    }
    # Every other row is null: training images, good test images, and the type too small to split.
    anomalies = (df["split"] == "test") & (df["label"] == 1)
    assert df.loc[~anomalies, "protocol"].isna().all()
    assert df.loc[df["defect"] == "cut", "protocol"].isna().all() and (df["defect"] == "cut").sum() == 2
    # The skipped type is listed, with its count, never silently.
    assert list(skipped.columns) == SKIPPED_COLUMNS
    assert skipped[["source", "category", "defect", "count"]].values.tolist() == [
        ["ingest.protocol", "cable", "cut", 2]]
    assert "too few test anomalies: 2 < ingest.protocol.min_anomalies 3" in skipped["reason"][0]
    # The written manifest carries the column.
    written = read_manifest(tmp_path / "results/manifest.parquet")
    assert written["protocol"].value_counts().to_dict() == {"eval": 11, "base": 8}


def test_floor_rounding_is_anomalydiffusions_len_div_3(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    df, _ = run_ingest(tmp_path, "mvtec_ad", {"root": str(root)}, protocol={"rounding": "floor"})
    counts = summary(df).set_index(["category", "defect"])
    expect = {(c, d): (len(s) // 3, len(s) - len(s) // 3) for c in TREE for d, s in TREE[c].items() if len(s) >= 3}
    assert {k: (r.base, r.eval) for k, r in counts.iterrows()} == expect
    assert by_group(df)[("bottle", "scratch")] == {"base": ["000", "001"], "eval": ["002", "003", "004", "005", "006"]}
    ceil = ProtocolConfig()
    assert [ceil.n_base(n) for n in range(3, 10)] == [math.ceil(n / 3) for n in range(3, 10)]
    assert ProtocolConfig(fraction=0.3333333333333333).n_base(9) == 3  # 1/3 as a decimal: no off-by-one


def test_too_few_error_names_category_and_defect(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    with pytest.raises(ManifestError, match=r"(?s)cable/cut: too few test anomalies: 2.*too_few: skip"):
        run_ingest(tmp_path, "mvtec_ad", {"root": str(root)}, protocol={"too_few": "error"})
    assert not (tmp_path / "results/manifest.parquet").exists()


def test_skips_are_logged(tmp_path, caplog):
    root = mvtec_tree(tmp_path / "mvtec")
    with caplog.at_level(logging.INFO):
        run_ingest(tmp_path, "mvtec_ad", {"root": str(root)})
    text = caplog.text
    assert "skipped defect type cable/cut (2 test anomalies)" in text
    assert "protocol bottle/scratch: 3 base, 4 eval" in text


def test_one_sided_split_is_a_bad_type(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec", {"bottle": {"broken": ["000", "001", "002"], "crack": list("0123456")}})
    # fraction 0.9: ceil(2.7) = 3 of 3 are base, nothing left to evaluate; 7 -> 7 of 7 as well.
    df, skipped = run_ingest(tmp_path, "mvtec_ad", {"root": str(root)}, protocol={"fraction": 0.9})
    assert df["protocol"].isna().all()
    assert sorted(skipped["reason"].str.split(":").str[0]) == ["only in base", "only in base"]
    # floor with two anomalies allowed: floor(2/3) = 0 base, so only in eval.
    two = read_dataset("mvtec_ad", {"root": str(mvtec_tree(tmp_path / "m2", {"c": {"d": ["0", "1"]}}))})
    out, bad = assign_protocol(two, ProtocolConfig(rounding="floor", min_anomalies=2))
    assert out["protocol"].isna().all()
    assert [(b["category"], b["defect"], b["count"]) for b in bad] == [("c", "d", 2)]
    assert bad[0]["reason"].startswith("only in eval: floor(0.333333 x 2) = 0 base, 2 eval")


def test_a_defect_type_whose_masks_are_all_missing(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    for m in (root / "cable/ground_truth/hole").iterdir():
        m.unlink()
    (root / "bottle/ground_truth/crack/010_mask.png").unlink()  # crack keeps 3 of 4
    # ingest.missing: error stops at the reader, naming the images (the readers' policy).
    with pytest.raises(ManifestError, match=r"no mask"):
        run_ingest(tmp_path, "mvtec_ad", {"root": str(root)})
    df, skipped = run_ingest(tmp_path, "mvtec_ad", {"root": str(root)}, missing="skip")
    proto = skipped[skipped["source"] == "ingest.protocol"].set_index(["category", "defect"])
    assert proto.loc[("cable", "hole"), "reason"].startswith("no masks: all 5 test anomalies lack their mask")
    assert proto.loc[("cable", "hole"), "count"] == 0
    images = skipped[skipped["source"] != "ingest.protocol"]
    assert len(images) == 6 and set(images["reason"]) == {"no mask"}
    assert by_group(df)[("bottle", "crack")] == {"base": ["011"], "eval": ["012", "013"]}
    with pytest.raises(ManifestError, match=r"cable/hole: no masks"):
        run_ingest(tmp_path, "mvtec_ad", {"root": str(root)}, missing="skip", protocol={"too_few": "error"})


def test_random_order_is_seeded_and_keeps_the_counts(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    df = read_dataset("mvtec_ad", {"root": str(root)})
    a, _ = assign_protocol(df, ProtocolConfig(order="random", seed=1))
    b, _ = assign_protocol(df, ProtocolConfig(order="random", seed=1))
    by_name, _ = assign_protocol(df, ProtocolConfig())
    assert a["protocol"].equals(b["protocol"])
    pd.testing.assert_frame_equal(summary(a), summary(by_name))
    seeds = {tuple(assign_protocol(df, ProtocolConfig(order="random", seed=s))[0]["protocol"].fillna("-"))
             for s in range(6)}
    assert len(seeds) > 1


def test_disabled_leaves_the_column_null(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    df, skipped = run_ingest(tmp_path, "mvtec_ad", {"root": str(root)}, protocol={"enabled": False})
    assert df["protocol"].isna().all() and skipped.empty


# ---------------------------------------------------------------- layouts


def test_folder_layout_with_defect_subfolders(tmp_path):
    for i in range(3):
        png(tmp_path / f"normal/{i}.png")
    for defect, n in (("dent", 4), ("scratch", 3), ("stain", 2)):
        for i in range(n):
            png(tmp_path / f"abnormal/{defect}/{i:02d}.png", 50)
            png(tmp_path / f"masks/{defect}/{i:02d}_mask.png", mask=True)
    opts = {"normal_dir": str(tmp_path / "normal"), "abnormal_dir": str(tmp_path / "abnormal"),
            "mask_dir": str(tmp_path / "masks"), "category": "plate"}
    df, skipped = run_ingest(tmp_path, "folder", opts)
    assert by_group(df) == {("plate", "dent"): {"base": ["00", "01"], "eval": ["02", "03"]},
                            ("plate", "scratch"): {"base": ["00"], "eval": ["01", "02"]}}
    assert skipped[["category", "defect", "count"]].values.tolist() == [["plate", "stain", 2]]


def test_flat_folder_and_visa_split_per_category(tmp_path):
    for i in range(2):
        png(tmp_path / f"normal/{i}.png")
    for i in range(6):
        png(tmp_path / f"abnormal/{i}.png", 50)
    df, _ = run_ingest(tmp_path, "folder", {"normal_dir": str(tmp_path / "normal"),
                                            "abnormal_dir": str(tmp_path / "abnormal")})
    assert df["protocol"].value_counts().to_dict() == {"eval": 4, "base": 2}  # no masks promised: split anyway

    visa_tree(tmp_path / "visa")  # candle has one anomaly: too few, named by category
    df, skipped = run_ingest(tmp_path / "v", "visa", {"root": str(tmp_path / "visa")})
    assert df["protocol"].isna().all()
    assert skipped[["category", "count"]].values.tolist() == [["candle", 1]] and pd.isna(skipped["defect"][0])


def test_butterflies_get_no_protocol(tmp_path):
    df, skipped = run_ingest(tmp_path, "heliconius", heliconius_tree(tmp_path))
    assert ((df["split"] == "test") & (df["label"] == 1)).any()  # test hybrids exist ...
    assert df["protocol"].isna().all() and skipped.empty  # ... but are no defect types


def test_mvtec_3d_and_loco(tmp_path):
    root = tmp_path / "m3d"
    for i in range(4):
        d = root / "bagel/test/hole"
        png(d / f"rgb/{i:03d}.png")
        png(d / f"xyz/{i:03d}.tiff")
        png(d / f"gt/{i:03d}.png", mask=True)
    png(root / "bagel/train/good/rgb/000.png")
    png(root / "bagel/train/good/xyz/000.tiff")
    df, _ = run_ingest(tmp_path / "a", "mvtec_3d", {"root": str(root)})
    assert by_group(df) == {("bagel", "hole"): {"base": ["000", "001"], "eval": ["002", "003"]}}

    loco = tmp_path / "loco"
    png(loco / "juice/train/good/000.png")
    for i in range(3):
        png(loco / f"juice/test/logical_anomalies/{i:03d}.png")
        png(loco / f"juice/ground_truth/logical_anomalies/{i:03d}/000.png", mask=True)
    df, _ = run_ingest(tmp_path / "b", "mvtec_loco", {"root": str(loco)})
    assert by_group(df) == {("juice", "logical_anomalies"): {"base": ["000"], "eval": ["001", "002"]}}


# ---------------------------------------------------------------- contract and config


def test_manifest_contract_for_the_column(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    df, _ = run_ingest(tmp_path, "mvtec_ad", {"root": str(root)})
    old = df.drop(columns="protocol")  # a manifest written before the column existed
    assert validate_manifest(old)["protocol"].isna().all()
    with pytest.raises(ManifestError, match=r"unknown protocol values \['train'\]"):
        validate_manifest(df.assign(protocol=df["protocol"].fillna("train")))
    train = df.index[df["split"] == "train"][0]
    stray = df.copy()
    stray.loc[train, "protocol"] = "base"
    with pytest.raises(ManifestError, match="not test anomalies have a protocol value"):
        validate_manifest(stray)


def test_config_is_checked():
    assert ProtocolConfig.from_dict(None) == ProtocolConfig()
    with pytest.raises(ValueError, match=r"unknown ingest.protocol config key\(s\) \['fractoin'\]"):
        ProtocolConfig.from_dict({"fractoin": 0.5})
    for bad, word in (({"fraction": 1.0}, "fraction"), ({"rounding": "round"}, "rounding"),
                      ({"order": "mtime"}, "order"), ({"too_few": "drop"}, "too_few"),
                      ({"min_anomalies": 1}, "min_anomalies")):
        with pytest.raises(ValueError, match=word):
            ProtocolConfig.from_dict(bad)


def test_bad_protocol_config_fails_before_reading(tmp_path):
    with pytest.raises(ValueError, match="rounding"):
        run_ingest(tmp_path, "mvtec_ad", {"root": str(tmp_path / "absent")}, protocol={"rounding": "up"})
