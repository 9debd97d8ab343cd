"""Dataset readers: each layout on a tiny tree written here, including the awkward cases."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hybrid.data.manifest import MANIFEST_COLUMNS, ManifestError
from hybrid.data.readers import READERS, read_dataset
from tests.conftest import shared_path


def img(path: Path) -> Path:
    """Write a tiny real image (4x4) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((4, 4, 3), 128, np.uint8))
    return path


def text(path: Path, content: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def by_id(df: pd.DataFrame) -> dict[str, dict]:
    return {r["sample_id"]: r for r in df.to_dict("records")}


# ---------------------------------------------------------------- Heliconius (HDR challenge CSVs)

TRAIN_HEADER = ["CAMID", "hybrid_stat", "split", "subspecies", "parent_subspecies_1",
                "parent_subspecies_2", "filename"]
REF_HEADER = ["CAMID", "hybrid_stat", "X", "subspecies_ref", "filename", "ssp_indicator"]


def heliconius_tree(tmp_path: Path) -> dict:
    images = tmp_path / "images"
    train = pd.DataFrame([
        ["C1", "non-hybrid", "train", 8.0, None, None, "C1.jpg"],
        ["C2", "hybrid", "train", None, 8.0, 9.0, "C2.jpg"],
        ["C3", "hybrid", "train", None, 9.0, 8.0, "C3.jpg"],
        ["C4", "hybrid", "train", None, 2.0, 9.0, "C4.jpg"],
    ], columns=TRAIN_HEADER)
    ref = pd.DataFrame([
        ["R1", 1, 11, "notabilis x lativitta", "11_R1_d.JPG", "major"],
        ["R2", 0, 12, "cyrbia", "12_R2_d.JPG", "minor"],
        ["R3", 1, 13, "hydara x erato", "13_R3_d.JPG", "minor"],
        ["R4", 1, 14, "plesseni x malleti", "14_R4_d.jpeg", "mimic"],
        ["R5", 0, 15, "malleti", "15_R5_d.JPG", "mimic"],
    ], columns=REF_HEADER)
    for name in train["filename"]:
        img(images / name)
    for name in ref["filename"]:  # on disk with a lower-case extension: .JPG in the CSV
        img(images / (Path(name).stem + Path(name).suffix.lower()))
    train.to_csv(tmp_path / "train.csv", index=False)
    ref.to_csv(tmp_path / "ref_test.csv", index=False)
    img(tmp_path / "depth" / "C1.tiff")
    return {"image_dir": str(images), "train_csv": str(tmp_path / "train.csv"),
            "reference_csvs": {"test": str(tmp_path / "ref_test.csv")},
            "depth_dir": str(tmp_path / "depth")}


def test_heliconius_fields(tmp_path):
    opts = heliconius_tree(tmp_path)
    df = read_dataset("heliconius", opts)
    assert list(df.columns) == list(MANIFEST_COLUMNS) and len(df) == 9
    rows = by_id(df)
    c1, c2, c3, c4 = (rows[f"heliconius/train/C{i}"] for i in range(1, 5))
    assert (c1["label"], c1["subspecies"], c1["hybrid_type"], c1["parent_a"]) == (0, "8", None, None)
    assert c1["depth_path"] == str((tmp_path / "depth" / "C1.tiff").resolve())
    assert c2["depth_path"] is None and c2["split"] == "train" and c2["category"] == "erato"
    assert (c2["hybrid_type"], c2["parent_a"], c2["parent_b"], c2["subspecies"]) == ("signal", "8", "9", None)
    assert c3["hybrid_type"] == "signal"  # parents in the other order
    assert c4["hybrid_type"] == "non-signal"
    r1, r2, r3, r4, r5 = (rows[f"heliconius/test/{i}_R{i - 10}_d"] for i in range(11, 16))
    assert (r1["label"], r1["hybrid_type"], r1["category"]) == (1, "signal", "erato")
    assert (r1["subspecies"], r1["parent_a"], r1["parent_b"]) == ("notabilis x lativitta", "notabilis", "lativitta")
    assert (r2["label"], r2["hybrid_type"], r2["subspecies"], r2["parent_a"]) == (0, None, "cyrbia", None)
    assert (r3["hybrid_type"], r3["parent_b"]) == ("non-signal", "erato")
    assert (r4["hybrid_type"], r4["category"], r5["category"]) == ("mimic", "melpomene", "melpomene")
    assert r1["image_path"] == str((tmp_path / "images" / "11_R1_d.jpg").resolve())
    assert df.attrs["skipped"] == []


def test_heliconius_signal_parents_option(tmp_path):
    opts = heliconius_tree(tmp_path)
    rows = by_id(read_dataset("heliconius", {**opts, "signal_parents": ["2", "9"]}))
    assert rows["heliconius/train/C4"]["hybrid_type"] == "signal"
    assert rows["heliconius/train/C2"]["hybrid_type"] == "non-signal"


def test_heliconius_missing_images_error_or_skip(tmp_path):
    opts = heliconius_tree(tmp_path)
    (tmp_path / "images" / "C2.jpg").unlink()
    (tmp_path / "images" / "12_R2_d.jpg").unlink()
    with pytest.raises(ManifestError) as err:
        read_dataset("heliconius", opts)
    msg = str(err.value)
    assert "C2.jpg" in msg and "12_R2_d.JPG" in msg and "train.csv" in msg and "ref_test.csv" in msg
    assert "ingest.missing: skip" in msg and "image_dir" in msg

    df = read_dataset("heliconius", {**opts, "missing": "skip"})
    assert len(df) == 7 and "heliconius/train/C2" not in set(df["sample_id"])
    skipped = {Path(s["path"]).name: s for s in df.attrs["skipped"]}
    assert set(skipped) == {"C2.jpg", "12_R2_d.JPG"}
    assert skipped["C2.jpg"]["reason"] == "missing"
    assert skipped["C2.jpg"]["source"] == str((tmp_path / "train.csv").resolve())


def test_heliconius_error_lists_first_twenty_and_count(tmp_path):
    names = [f"CAM{i:03d}.jpg" for i in range(30)]
    pd.DataFrame({"CAMID": [n[:-4] for n in names], "hybrid_stat": "non-hybrid", "subspecies": 1.0,
                  "parent_subspecies_1": None, "parent_subspecies_2": None, "filename": names}
                 ).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "im").mkdir()
    with pytest.raises(ManifestError, match=r"missing \(30,.*and 10 more") as err:
        read_dataset("heliconius", {"image_dir": str(tmp_path / "im"), "train_csv": str(tmp_path / "t.csv")})
    assert "CAM019.jpg" in str(err.value) and "CAM020.jpg" not in str(err.value)


def test_heliconius_duplicates_and_columns(tmp_path):
    opts = heliconius_tree(tmp_path)
    ref = pd.read_csv(opts["reference_csvs"]["test"])
    pd.concat([ref, ref.iloc[[1]]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ManifestError, match=r"dup\.csv lists these images more than once: \['12_R2_d'\]"):
        read_dataset("heliconius", {**opts, "reference_csvs": {"test": str(tmp_path / "dup.csv")}})
    ref.drop(columns=["ssp_indicator"]).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(ManifestError, match=r"cols\.csv lacks the columns \['ssp_indicator'\]"):
        read_dataset("heliconius", {**opts, "reference_csvs": {"test": str(tmp_path / "cols.csv")}})


def test_heliconius_overlaps(tmp_path):
    opts = heliconius_tree(tmp_path)
    ref = pd.read_csv(opts["reference_csvs"]["test"])
    ref.iloc[:2].to_csv(tmp_path / "ref_val.csv", index=False)
    refs = {"val": str(tmp_path / "ref_val.csv"), **opts["reference_csvs"]}
    df = read_dataset("heliconius", {**opts, "reference_csvs": refs})  # val inside test: a row each
    assert sorted(df.loc[df["split"] == "val", "sample_id"]) == ["heliconius/val/11_R1_d", "heliconius/val/12_R2_d"]
    assert (df["split"] == "test").sum() == 5

    ref.assign(hybrid_stat=1 - ref["hybrid_stat"]).iloc[:1].to_csv(tmp_path / "ref_val.csv", index=False)
    with pytest.raises(ManifestError, match=r"11_R1_d is hybrid_stat 0 in .*ref_val\.csv but 1 in .*ref_test\.csv"):
        read_dataset("heliconius", {**opts, "reference_csvs": refs})

    train = pd.read_csv(opts["train_csv"])
    pd.concat([train, ref.iloc[[0]].assign(hybrid_stat="hybrid")]).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ManifestError, match=r"train\.csv \(training\) and .*ref_test\.csv .*11_R1_d"):
        read_dataset("heliconius", opts)


def test_heliconius_real_challenge_csvs(tmp_path):
    ref_dir = shared_path("reference", "heliconius")
    csvs = {n: ref_dir / f"{n}.csv" for n in ("butterfly_anomaly_train", "ref_val", "ref_test")}
    names = set().union(*(pd.read_csv(p)["filename"] for p in csvs.values()))
    for name in names:  # empty files: readers check existence, they never decode
        (tmp_path / name).touch()
    df = read_dataset("heliconius", {
        "image_dir": str(tmp_path), "train_csv": str(csvs["butterfly_anomaly_train"]),
        "reference_csvs": {"val": str(csvs["ref_val"]), "test": str(csvs["ref_test"])}})
    assert df["split"].value_counts().to_dict() == {"train": 2082, "test": 2350, "val": 1175}
    train, test = df[df["split"] == "train"], df[df["split"] == "test"]
    assert train["label"].value_counts().to_dict() == {0: 1991, 1: 91}
    assert train["hybrid_type"].value_counts().to_dict() == {"signal": 91}
    assert set(train.loc[train["label"] == 1, ["parent_a", "parent_b"]].itertuples(index=False)) == {("8", "9")}
    assert train["subspecies"].nunique() == 14 and "8" in set(train["subspecies"])
    ssp = test["hybrid_type"].fillna("none") + "/" + test["category"]
    counts = pd.crosstab(ssp, test["label"])
    assert counts.loc["signal/erato", 1] == 365 and counts.loc["non-signal/erato", 1] == 28
    assert counts.loc["mimic/melpomene", 1] == 248
    assert counts.loc["none/melpomene", 0] == 847 and counts.loc["none/erato", 0] == 455 + 407
    major = test["subspecies"].isin(["lativitta", "notabilis"]) & (test["label"] == 0)
    assert major.sum() == 455  # the 'major' non-hybrids: the signal hybrid's parent subspecies
    assert test.loc[test["hybrid_type"] == "mimic", "parent_a"].notna().all()
    assert df["sample_id"].is_unique


# ---------------------------------------------------------------- MVTec AD, 3D-AD, LOCO


def test_mvtec_ad(tmp_path):
    root = tmp_path / "mvtec"
    for p in ["bottle/train/good/000.png", "bottle/train/good/001.PNG", "bottle/test/good/000.png",
              "bottle/test/broken/000.png", "bottle/ground_truth/broken/000_mask.png",
              "cable/train/good/000.jpg"]:
        img(root / p)
    for p in ["license.txt", "bottle/train/good/.DS_Store", "bottle/train/good/readme.txt",
              "bottle/train/good/._000.png", ".cache/x.png"]:
        text(root / p)
    df = read_dataset("mvtec_ad", {"root": str(root)})
    assert list(df["sample_id"]) == [
        "mvtec_ad/bottle/train/good/000", "mvtec_ad/bottle/train/good/001",
        "mvtec_ad/bottle/test/broken/000", "mvtec_ad/bottle/test/good/000", "mvtec_ad/cable/train/good/000"]
    broken = by_id(df)["mvtec_ad/bottle/test/broken/000"]
    assert (broken["label"], broken["defect"], broken["split"]) == (1, "broken", "test")
    assert broken["mask_path"] == str((root / "bottle/ground_truth/broken/000_mask.png").resolve())
    good = df[df["defect"] == "good"]
    assert good["label"].eq(0).all() and good["mask_path"].isna().all()

    assert set(read_dataset("mvtec_ad", {"root": str(root), "categories": ["cable"]})["category"]) == {"cable"}
    assert len(read_dataset("mvtec_ad", {"root": str(root), "categories": []})) == 5  # empty = all
    with pytest.raises(ManifestError, match=r"\['carpet'\] are not in .*available: \['bottle', 'cable'\]"):
        read_dataset("mvtec_ad", {"root": str(root), "categories": ["carpet"]})

    img(root / "bottle/test/crack/003.png")  # an anomaly without its mask
    with pytest.raises(ManifestError, match=r"(?s)no mask.*crack/003\.png.*ingest\.missing: skip"):
        read_dataset("mvtec_ad", {"root": str(root)})
    df = read_dataset("mvtec_ad", {"root": str(root), "missing": "skip"})
    assert len(df) == 5 and [Path(s["path"]).name for s in df.attrs["skipped"]] == ["003.png"]
    assert df.attrs["skipped"][0]["reason"] == "no mask"


def test_mvtec_3d_validation_depth_and_masks(tmp_path):
    root = tmp_path / "m3d"
    for split, defect in [("train", "good"), ("validation", "good"), ("test", "good"), ("test", "hole")]:
        d = root / "bagel" / split / defect
        img(d / "rgb/000.png")
        img(d / "xyz/000.tiff")
        if split == "test":
            img(d / "gt/000.png")
    text(root / "bagel/calibration/camera_parameters.json")
    df = read_dataset("mvtec_3d", {"root": str(root)})
    assert df["split"].value_counts().to_dict() == {"test": 2, "train": 1, "val": 1}
    rows = by_id(df)
    assert set(rows) >= {"mvtec_3d/bagel/val/good/000", "mvtec_3d/bagel/test/hole/000"}
    hole = rows["mvtec_3d/bagel/test/hole/000"]
    assert hole["label"] == 1 and hole["mask_path"].endswith("test/hole/gt/000.png")
    assert hole["depth_path"] == str((root / "bagel/test/hole/xyz/000.tiff").resolve())
    assert rows["mvtec_3d/bagel/train/good/000"]["mask_path"] is None
    assert df["depth_path"].notna().all()

    (root / "bagel/test/hole/gt/000.png").unlink()
    (root / "bagel/validation/good/xyz/000.tiff").unlink()
    with pytest.raises(ManifestError, match="no depth") as err:
        read_dataset("mvtec_3d", {"root": str(root)})
    assert "no mask" in str(err.value)
    df = read_dataset("mvtec_3d", {"root": str(root), "missing": "skip"})
    assert sorted(s["reason"] for s in df.attrs["skipped"]) == ["no depth", "no mask"] and len(df) == 2


def test_mvtec_loco_mask_folders(tmp_path):
    root = tmp_path / "loco"
    for p in ["juice/train/good/000.png", "juice/validation/good/000.png", "juice/test/good/000.png",
              "juice/test/logical_anomalies/000.png", "juice/ground_truth/logical_anomalies/000/000.png",
              "juice/ground_truth/logical_anomalies/000/001.png", "juice/test/structural_anomalies/000.png"]:
        img(root / p)
    text(root / "juice/ground_truth/structural_anomalies/000/notes.txt")  # a folder without PNGs
    with pytest.raises(ManifestError, match="no mask.*structural_anomalies/000.png"):
        read_dataset("mvtec_loco", {"root": str(root)})
    df = read_dataset("mvtec_loco", {"root": str(root), "missing": "skip"})
    assert len(df) == 4 and df.attrs["skipped"][0]["reason"] == "no mask"
    logical = by_id(df)["mvtec_loco/juice/test/logical_anomalies/000"]
    assert logical["mask_path"] == str((root / "juice/ground_truth/logical_anomalies/000").resolve())
    assert "mvtec_loco/juice/val/good/000" in set(df["sample_id"])


def test_empty_root_says_what_was_expected(tmp_path):
    (tmp_path / "bottle/train/good").mkdir(parents=True)
    with pytest.raises(ManifestError, match="no mvtec_ad images found"):
        read_dataset("mvtec_ad", {"root": str(tmp_path)})
    with pytest.raises(ManifestError, match="is not a folder"):
        read_dataset("mvtec_ad", {"root": str(tmp_path / "nope")})


# ---------------------------------------------------------------- VisA


def visa_tree(root: Path) -> None:
    rows = [["candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", None],
            ["candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", None],
            ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"],
            ["pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", None]]
    for r in rows:
        img(root / r[3])
        if r[4]:
            img(root / r[4])
    (root / "split_csv").mkdir()
    pd.DataFrame(rows, columns=["object", "split", "label", "image", "mask"]).to_csv(
        root / "split_csv/1cls.csv", index=False)


def test_visa(tmp_path):
    visa_tree(tmp_path)
    df = read_dataset("visa", {"root": str(tmp_path)})
    assert len(df) == 4 and set(df["category"]) == {"candle", "pcb1"}
    a = by_id(df)["visa/candle/Data/Images/Anomaly/000"]
    assert (a["label"], a["split"], a["defect"]) == (1, "test", None)
    assert a["mask_path"] == str((tmp_path / "candle/Data/Masks/Anomaly/000.png").resolve())
    n = by_id(df)["visa/candle/Data/Images/Normal/0001"]
    assert (n["label"], n["defect"], n["mask_path"]) == (0, "good", None)
    assert len(read_dataset("visa", {"root": str(tmp_path), "categories": ["pcb1"]})) == 1

    (tmp_path / "candle/Data/Masks/Anomaly/000.png").unlink()
    (tmp_path / "pcb1/Data/Images/Normal/0000.JPG").unlink()
    with pytest.raises(ManifestError, match=r"missing \(1, from .*1cls\.csv\): .*pcb1/Data/Images/Normal/0000\.JPG"):
        read_dataset("visa", {"root": str(tmp_path)})
    df = read_dataset("visa", {"root": str(tmp_path), "missing": "skip"})
    assert len(df) == 2 and sorted(s["reason"] for s in df.attrs["skipped"]) == ["missing", "no mask"]


def test_visa_bad_rows(tmp_path):
    visa_tree(tmp_path)
    csv = tmp_path / "split_csv/1cls.csv"
    table = pd.read_csv(csv)
    table.assign(label="bad").to_csv(csv, index=False)
    with pytest.raises(ManifestError, match=r"label values \['bad'\]"):
        read_dataset("visa", {"root": str(tmp_path)})
    table.assign(image=[None, *table["image"][1:]]).to_csv(csv, index=False)
    with pytest.raises(ManifestError, match=r"column 'image' is empty on lines \[2\]"):
        read_dataset("visa", {"root": str(tmp_path)})


# ---------------------------------------------------------------- folder


def test_folder(tmp_path):
    for p in ["normal/a.png", "normal/b.JPG", "normal/.c.png", "abnormal/c.png", "abnormal/d.bmp",
              "masks/c_mask.png", "masks/d.PNG"]:
        img(tmp_path / p)
    text(tmp_path / "normal/notes.txt")
    opts = {"normal_dir": str(tmp_path / "normal"), "abnormal_dir": str(tmp_path / "abnormal"),
            "mask_dir": str(tmp_path / "masks"), "category": "screws"}
    df = read_dataset("folder", opts)
    assert list(df["sample_id"]) == ["folder/screws/train/a", "folder/screws/train/b",
                                     "folder/screws/test/c", "folder/screws/test/d"]
    assert list(df["label"]) == [0, 0, 1, 1] and set(df["category"]) == {"screws"}
    assert by_id(df)["folder/screws/test/d"]["mask_path"] == str((tmp_path / "masks/d.PNG").resolve())

    img(tmp_path / "abnormal/e.png")
    with pytest.raises(ManifestError, match=r"no mask.*abnormal/e\.png"):
        read_dataset("folder", opts)
    df = read_dataset("folder", {**opts, "missing": "skip"})
    assert len(df) == 4 and Path(df.attrs["skipped"][0]["path"]).name == "e.png"
    assert read_dataset("folder", {**opts, "mask_dir": None})["mask_path"].isna().all()


def test_folder_defect_subfolders(tmp_path):
    """Sub-folders of abnormal_dir are defect types, with their masks in mask_dir/<defect>/."""
    for p in ["normal/a.png", "abnormal/x.png", "abnormal/dent/000.png", "abnormal/dent/001.png",
              "abnormal/scratch/000.png", "masks/x_mask.png", "masks/dent/000_mask.png", "masks/dent/001.png",
              "masks/scratch/000_mask.png", "masks/000_mask.png"]:
        img(tmp_path / p)
    opts = {"normal_dir": str(tmp_path / "normal"), "abnormal_dir": str(tmp_path / "abnormal"),
            "mask_dir": str(tmp_path / "masks"), "category": "plate"}
    df = read_dataset("folder", opts)
    rows = by_id(df)
    assert set(rows) == {"folder/plate/train/a", "folder/plate/test/x", "folder/plate/test/dent/000",
                         "folder/plate/test/dent/001", "folder/plate/test/scratch/000"}
    assert rows["folder/plate/test/x"]["defect"] is None  # directly in abnormal_dir: no defect type
    assert rows["folder/plate/test/dent/001"]["defect"] == "dent"
    assert rows["folder/plate/test/dent/001"]["mask_path"] == str((tmp_path / "masks/dent/001.png").resolve())
    assert rows["folder/plate/test/scratch/000"]["mask_path"].endswith("masks/scratch/000_mask.png")

    (tmp_path / "masks/scratch/000_mask.png").unlink()  # masks/000_mask.png belongs to no defect type
    with pytest.raises(ManifestError, match=r"no mask.*abnormal/scratch/000\.png"):
        read_dataset("folder", opts)
    skipped = read_dataset("folder", {**opts, "missing": "skip"}).attrs["skipped"]
    assert [(s["reason"], s["category"], s["defect"]) for s in skipped] == [("no mask", "plate", "scratch")]


def test_skip_records_name_category_and_defect(tmp_path):
    root = tmp_path / "mvtec"
    for p in ["bottle/train/good/000.png", "bottle/test/crack/000.png", "bottle/test/crack/001.png",
              "bottle/ground_truth/crack/000_mask.png"]:
        img(root / p)
    skipped = read_dataset("mvtec_ad", {"root": str(root), "missing": "skip"}).attrs["skipped"]
    assert [(s["category"], s["defect"], Path(s["path"]).name) for s in skipped] == [("bottle", "crack", "001.png")]
    visa_tree(tmp_path / "visa")
    (tmp_path / "visa/candle/Data/Masks/Anomaly/000.png").unlink()
    skipped = read_dataset("visa", {"root": str(tmp_path / "visa"), "missing": "skip"}).attrs["skipped"]
    assert [(s["category"], s["defect"]) for s in skipped] == [("candle", None)]


def test_readers_leave_protocol_null(tmp_path):
    """The protocol column is the ingest stage's: every reader returns it null."""
    opts = heliconius_tree(tmp_path)
    assert read_dataset("heliconius", opts)["protocol"].isna().all()
    visa_tree(tmp_path / "visa")
    assert read_dataset("visa", {"root": str(tmp_path / "visa")})["protocol"].isna().all()


def test_same_stem_twice_is_an_error(tmp_path):
    img(tmp_path / "n/a.png")
    img(tmp_path / "n/a.jpg")
    with pytest.raises(ManifestError, match="share the name 'a'"):
        read_dataset("folder", {"normal_dir": str(tmp_path / "n")})


# ---------------------------------------------------------------- dispatch


def test_read_dataset_dispatch_and_errors(tmp_path):
    assert set(READERS) == {"heliconius", "demo", "demo_industrial", "mvtec_ad", "mvtec_3d", "mvtec_loco",
                            "visa", "madsim", "realiad", "folder"}
    opts = heliconius_tree(tmp_path)
    assert set(read_dataset("demo", opts)["dataset"]) == {"demo"}
    with pytest.raises(ValueError,
                       match=r"unknown dataset layout 'mvtec'; use one of \['demo', 'demo_industrial', 'folder'"):
        read_dataset("mvtec", {})
    with pytest.raises(ValueError,
                       match=r"does not take the options \['rot'\]; it accepts \['categories', 'missing', 'root'\]"):
        read_dataset("mvtec_ad", {"rot": "/data"})
    with pytest.raises(ValueError, match=r"needs the options \['root'\]"):
        read_dataset("visa", {})
    with pytest.raises(ValueError, match="missing='ignore' is not a policy"):
        read_dataset("heliconius", {**opts, "missing": "ignore"})


def test_a_configured_category_without_images_is_an_error_not_a_silent_drop(tmp_path):
    for p in ["bottle/train/good/000.png", "bottle/test/good/000.png"]:
        img(tmp_path / p)
    (tmp_path / "cable/train/good").mkdir(parents=True)  # the folders are there, the images not
    with pytest.raises(ManifestError, match=r"categories names \['cable'\], but no images of them were found"):
        read_dataset("mvtec_ad", {"root": str(tmp_path), "categories": ["bottle", "cable"]})
    assert set(read_dataset("mvtec_ad", {"root": str(tmp_path), "categories": ["bottle"]})["category"]) == {"bottle"}
