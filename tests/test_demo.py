"""The embedded demo: deterministic, in the HDR challenge formats, with distinct patterns."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hybrid.data import demo
from hybrid.data.demo import (
    HYBRID_TYPES,
    SUBSPECIES,
    DemoConfig,
    cross,
    draw_butterfly,
    individual,
    make_demo,
)
from hybrid.data.xyz import read_xyz
from tests.conftest import shared_path

# The real challenge files' headers, written out so the test runs without the shared folder.
TRAIN_COLUMNS = ["CAMID", "file_url", "hybrid_stat", "split", "zenodo_link", "md5", "subspecies",
                 "parent_subspecies_1", "parent_subspecies_2", "filename"]
REF_COLUMNS = ["CAMID", "file_url", "hybrid_stat", "X", "subspecies_ref", "filename",
               "ssp_indicator"]

TINY = DemoConfig(seed=3, width=96, height=64, train_per_subspecies=2, test_per_subspecies=1,
                  train_hybrids_per_type=3, test_hybrids_per_type=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, make_demo(out, TINY, workers=2)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    make_demo(again, TINY, workers=1)  # thread count must not matter either
    assert _tree(again) == _tree(out)

    other = tmp_path / "other"
    make_demo(other, DemoConfig(**{**TINY.__dict__, "seed": 4}))
    a, b = _tree(out), _tree(other)
    images = [k for k in a if k.startswith("images/")]
    assert images and all(a[k] != b[k] for k in images if k in b)


# --------------------------------------------------------------------------- CSV formats


def test_train_csv_format(tiny):
    out, _ = tiny
    raw = (out / "butterfly_anomaly_train.csv").read_bytes()
    assert b"\r\n" not in raw  # the real train CSV has LF line ends
    df = _read(out / "butterfly_anomaly_train.csv")
    assert list(df.columns) == TRAIN_COLUMNS
    assert set(df["split"]) == {"train"}
    assert set(df["hybrid_stat"]) == {"hybrid", "non-hybrid"}
    assert df["CAMID"].is_unique
    assert (df["filename"] == df["CAMID"] + ".jpg").all()
    assert df["md5"].str.fullmatch(r"[0-9a-f]{32}").all()
    hyb = df[df["hybrid_stat"] == "hybrid"]
    non = df[df["hybrid_stat"] == "non-hybrid"]
    # Codes are written as floats ("8.0"), empty where they do not apply, as in the real file.
    assert (hyb["subspecies"] == "").all()
    assert (non[["parent_subspecies_1", "parent_subspecies_2"]] == "").all().all()
    assert non["subspecies"].str.fullmatch(r"\d+\.0").all()


def test_train_holds_only_species_a_and_signal_hybrids(tiny):
    out, summary = tiny
    df = _read(out / "butterfly_anomaly_train.csv")
    non = df[df["hybrid_stat"] == "non-hybrid"]
    hyb = df[df["hybrid_stat"] == "hybrid"]
    assert non["subspecies"].value_counts().to_dict() == {
        f"{c}.0": TINY.train_per_subspecies for c in range(10)}
    assert set(zip(hyb["parent_subspecies_1"], hyb["parent_subspecies_2"])) == {("8.0", "9.0")}
    assert len(hyb) == TINY.train_hybrids_per_type == summary["train_hybrids"]
    codes = pd.read_csv(out / "subspecies.csv")
    assert codes.set_index("name").loc[["lativitta", "notabilis"], "code"].tolist() == [8, 9]


def test_ref_csv_format_and_counts(tiny):
    out, summary = tiny
    assert b"\r\n" in (out / "ref_test.csv").read_bytes()  # the real reference CSVs use CRLF
    df = _read(out / "ref_test.csv")
    assert list(df.columns) == REF_COLUMNS
    assert set(df["hybrid_stat"]) == {"0", "1"}
    assert df["X"].str.fullmatch(r"\d+").all() and df["X"].is_unique
    assert (df["filename"] == df["X"] + "_" + df["CAMID"] + "_d.JPG").all()
    hyb = df[df["hybrid_stat"] == "1"]
    assert hyb["subspecies_ref"].str.fullmatch(r"[a-z]+ x [a-z]+").all()
    assert (~df.loc[df["hybrid_stat"] == "0", "subspecies_ref"].str.contains(" x ")).all()

    n, h = TINY.test_per_subspecies, TINY.test_hybrids_per_type
    counts = df.groupby(["ssp_indicator", "hybrid_stat"]).size().to_dict()
    assert counts == {("major", "0"): 2 * n, ("major", "1"): h,
                      ("minor", "0"): 8 * n, ("minor", "1"): 4 * h,
                      ("mimic", "0"): 2 * n, ("mimic", "1"): h}
    assert summary["test_by_indicator"]["minor"] == {"non-hybrid": 8 * n, "hybrid": 4 * h}
    # Which rows are major / minor / mimic follows the challenge's definition.
    kind = {frozenset(["lativitta", "notabilis"]): "major",
            frozenset(["malleti", "plesseni"]): "mimic"}
    for ref, ind in zip(hyb["subspecies_ref"], hyb["ssp_indicator"]):
        assert ind == kind.get(frozenset(ref.split(" x ")), "minor"), ref
    assert set(df.loc[df["ssp_indicator"] == "mimic", "subspecies_ref"]) <= {
        "malleti", "plesseni", "malleti x plesseni", "plesseni x malleti"}
    assert set(df.loc[(df["ssp_indicator"] == "major") & (df["hybrid_stat"] == "0"),
                      "subspecies_ref"]) == {"lativitta", "notabilis"}


def test_columns_and_conventions_match_the_real_challenge_files(tiny):
    ref_dir = shared_path("reference", "heliconius")
    out, _ = tiny
    real_train = _read(ref_dir / "butterfly_anomaly_train.csv")
    real_ref = _read(ref_dir / "ref_test.csv")
    assert list(real_train.columns) == TRAIN_COLUMNS == list(
        _read(out / "butterfly_anomaly_train.csv").columns)
    assert list(real_ref.columns) == REF_COLUMNS == list(_read(out / "ref_test.csv").columns)
    ours = _read(out / "ref_test.csv")
    assert set(ours["ssp_indicator"]) == set(real_ref["ssp_indicator"])
    assert set(ours["hybrid_stat"]) == set(real_ref["hybrid_stat"])
    # Hybrid names are "<parent> x <parent>" in the real file too, and the parents are ours.
    real_hyb = set(real_ref.loc[real_ref["hybrid_stat"] == "1", "subspecies_ref"])
    assert all(re.fullmatch(r"[a-z]+ x [a-z]+", s) for s in real_hyb)
    ours_hyb = set(ours.loc[ours["hybrid_stat"] == "1", "subspecies_ref"])
    canon = lambda s: " x ".join(sorted(s.split(" x ")))  # noqa: E731
    assert {canon(s) for s in ours_hyb} <= {canon(s) for s in real_hyb}
    real_codes = set(real_train.loc[real_train["hybrid_stat"] == "hybrid",
                                    ["parent_subspecies_1", "parent_subspecies_2"]].agg(
        tuple, axis=1))
    ours_train = _read(out / "butterfly_anomaly_train.csv")
    assert set(ours_train.loc[ours_train["hybrid_stat"] == "hybrid",
                              ["parent_subspecies_1", "parent_subspecies_2"]].agg(
        tuple, axis=1)) == real_codes


# --------------------------------------------------------------------------- files


def test_images_match_csvs_and_md5(tiny):
    out, summary = tiny
    train = _read(out / "butterfly_anomaly_train.csv")
    ref = _read(out / "ref_test.csv")
    names = set(train["filename"]) | set(ref["filename"])
    assert {p.name for p in (out / "images").iterdir()} == names
    assert len(names) == summary["images"] == len(train) + len(ref)
    for row in train.itertuples():
        data = (out / "images" / row.filename).read_bytes()
        assert hashlib.md5(data).hexdigest() == row.md5
    img = cv2.imread(str(out / "images" / ref["filename"].iloc[0]))
    assert img.shape == (TINY.height, TINY.width, 3)


def test_depth_tiffs_body_nearer_than_background(tiny):
    out, _ = tiny
    stems = {Path(p.name).stem for p in (out / "images").iterdir()}
    assert {p.stem for p in (out / "depth").glob("*.tiff")} == stems
    for path in sorted((out / "depth").glob("*.tiff"))[:6]:
        xyz = read_xyz(path)
        assert xyz.shape == (TINY.height, TINY.width, 3) and xyz.dtype == np.float32
        x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
        assert np.all(np.diff(x, axis=1) > 0) and np.all(np.diff(y, axis=0) > 0)  # pixel grid
        border = np.concatenate([z[0], z[-1], z[:, 0], z[:, -1]])
        assert np.ptp(border) < 1e-6  # a flat background plane
        assert border[0] - z.min() > 0.003  # the body stands > 3 mm nearer than the background


def test_draw_butterfly_depth_layers():
    rgb, z = draw_butterfly(SUBSPECIES["hydara"].genes, np.random.default_rng(0), 192, 128,
                            vary=0.0)
    assert rgb.shape == (128, 192, 3) and rgb.dtype == np.uint8 and z.dtype == np.float32
    # canonical pose: the thorax sits at (96, 75), one unit (half a wingspan) is 71 pixels
    bg, body, wing = z[2, 2], z[70:80, 95:97].min(), z[100, 75]  # corner, thorax, hindwing
    assert body < wing < bg  # larger = farther: background farthest, body nearest
    assert rgb[100, 75].max() < 80 and rgb[2, 2].min() > 120  # black wing, light background
    band = rgb[74, 50]  # hydara's crimson forewing band
    assert band[0] > 120 and band[1] < 60


def test_interrupted_write_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    calls = {"n": 0}
    real = demo.write_xyz

    def failing(path, xyz):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interrupt")
        real(path, xyz)

    monkeypatch.setattr(demo, "write_xyz", failing)
    with pytest.raises(KeyboardInterrupt):
        make_demo(out, TINY, workers=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is cleaned up too

    # An interrupted rerun leaves the previous complete dataset untouched.
    monkeypatch.setattr(demo, "write_xyz", real)
    make_demo(out, TINY, workers=1)
    before = _tree(out)
    calls["n"] = 0
    monkeypatch.setattr(demo, "write_xyz", failing)
    with pytest.raises(KeyboardInterrupt):
        make_demo(out, DemoConfig(**{**TINY.__dict__, "seed": 9}), workers=1)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


# --------------------------------------------------------------------------- patterns


def _thumb(rgb: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Butterfly pixels only (background zeroed), averaged down to a 12 x 8 colour layout."""
    fg = (z < z.max() - 5e-4)[..., None]
    return cv2.resize((rgb * fg).astype(np.float32) / 255, (12, 8),
                      interpolation=cv2.INTER_AREA).ravel()


def _features(genes_fn, n: int, seed: tuple) -> np.ndarray:
    """Features of ``n`` individuals drawn in the canonical pose (vary=0)."""
    out = []
    for k in range(n):
        rng = np.random.default_rng([*seed, k])
        out.append(_thumb(*draw_butterfly(genes_fn(rng), rng, 96, 64, vary=0.0)))
    return np.array(out)


@pytest.fixture(scope="module")
def subspecies_features() -> dict[str, np.ndarray]:
    return {name: _features(lambda rng, s=s: individual(s.genes, rng), 5, (11, j))
            for j, (name, s) in enumerate(SUBSPECIES.items())}


def test_subspecies_patterns_are_distinct(subspecies_features):
    feats = subspecies_features
    centre = {k: v.mean(0) for k, v in feats.items()}
    within = max(np.linalg.norm(v - centre[k], axis=1).max() for k, v in feats.items())
    a_names = [k for k in feats if SUBSPECIES[k].species == "erato"]
    between = min(np.linalg.norm(centre[a] - centre[b])
                  for i, a in enumerate(a_names) for b in a_names[i + 1:])
    assert between > within  # every pair of A subspecies further apart than any individual strays
    assert np.linalg.norm(centre["malleti"] - centre["plesseni"]) > within


def test_mimics_are_closest_to_their_models(subspecies_features):
    centre = {k: v.mean(0) for k, v in subspecies_features.items()}
    a_names = [k for k in centre if SUBSPECIES[k].species == "erato"]
    for mimic, model in (("malleti", "lativitta"), ("plesseni", "notabilis")):
        assert SUBSPECIES[mimic].mimic_of == model
        dist = {a: np.linalg.norm(centre[mimic] - centre[a]) for a in a_names}
        assert min(dist, key=dist.get) == model
        assert SUBSPECIES[mimic].genes != SUBSPECIES[model].genes  # the wing shape differs


def test_hybrids_differ_from_both_parents(subspecies_features):
    centre = {k: v.mean(0) for k, v in subspecies_features.items()}
    spread = {k: np.linalg.norm(v - centre[k], axis=1).mean()
              for k, v in subspecies_features.items()}
    for t, (p1, p2, _, _) in enumerate(HYBRID_TYPES):
        g1, g2 = SUBSPECIES[p1].genes, SUBSPECIES[p2].genes
        hyb = _features(lambda rng, g1=g1, g2=g2: individual(cross(g1, g2, rng), rng), 5, (12, t))
        for p in (p1, p2):
            assert (np.linalg.norm(hyb - centre[p], axis=1) > spread[p]).all(), (p1, p2, p)
        for k in range(20):  # and on the gene level, a hybrid never copies a parent
            child = cross(g1, g2, np.random.default_rng([13, t, k]))
            assert child != g1 and child != g2


# --------------------------------------------------------------------------- config, docs


def test_config_from_dict_rejects_unknown_and_bad_values():
    assert DemoConfig.from_dict({"seed": 5, "width": 128}) == DemoConfig(seed=5, width=128)
    assert DemoConfig.from_dict(None) == DemoConfig()
    with pytest.raises(ValueError, match="train_per_subspeces"):
        DemoConfig.from_dict({"train_per_subspeces": 3})
    with pytest.raises(ValueError, match="jpeg_quality"):
        DemoConfig(jpeg_quality=0)
    with pytest.raises(ValueError, match="width"):
        DemoConfig(width=8)
    with pytest.raises(ValueError, match="test_hybrids_per_type"):
        DemoConfig(test_hybrids_per_type=0)


def test_default_config_is_small():
    cfg = DemoConfig()
    n_a, n_b = 10, 2
    total = (n_a * cfg.train_per_subspecies + cfg.train_hybrids_per_type
             + (n_a + n_b) * cfg.test_per_subspecies
             + len(HYBRID_TYPES) * cfg.test_hybrids_per_type)
    assert 150 <= total <= 250 and cfg.width > cfg.height  # landscape, like the real photos
    assert sum(s.species == "erato" for s in SUBSPECIES.values()) == n_a


def test_subspecies_table_documents_every_subspecies(tiny):
    out, _ = tiny
    df = pd.read_csv(out / "subspecies.csv", keep_default_na=False)
    assert len(df) == len(SUBSPECIES) == 12
    a = df[df["species"] == "erato"]
    assert sorted(a["code"].astype(int)) == list(range(10))
    assert set(df.loc[df["species"] == "melpomene", "mimic_of"]) == {"lativitta", "notabilis"}
    assert df.set_index("name").loc["lativitta", "basal"] == "orange"


def test_demo_sheet_shows_every_subspecies_and_hybrid_type():
    sheet = demo.demo_sheet(seed=0, width=96, height=64, cell=64, cols=6)
    n = len(SUBSPECIES) + len(HYBRID_TYPES)
    assert sheet.dtype == np.uint8 and sheet.shape[1] > 6 * 64
    assert sheet.shape[0] > (n // 6) * 43  # three rows of 64 x 43 images plus labels
