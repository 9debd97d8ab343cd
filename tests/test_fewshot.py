"""The fewshot stage: seeded k-shot draws from training images only, PatchCore with and without
generated normals on a toy MVTec-like set, the table's rows, and the report's table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hybrid.models.store import MissingWeightsError
from hybrid.stages.fewshot import METHODS, PUBLISHED_PATCHCORE, FewShotConfig, candidates, draw_shots, run, setting
from tests.test_baselines_stage import make_industrial
from tests.test_generate import save_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    data = make_industrial(root, n_train=5, n_good=3, n_bad=3)
    data["checkpoint"] = save_tiny_checkpoint(root / "checkpoint")
    return data


def cfg(**kw) -> FewShotConfig:
    d = {"shots": [1, 2, "all"], "weights": "random", "device": "cpu", "generated_per_shot": 2, "batch_size": 8}
    d.update(kw)
    return FewShotConfig.from_dict(d)


def test_draws_are_seeded_nested_and_never_from_the_test_set(toy):
    rows = toy["manifest"]
    pool = candidates(rows, cfg())
    assert sorted(pool) == ["bottle", "nut"]
    train = set(rows.query("split == 'train' and label == 0")["sample_id"])
    for c, ids in pool.items():
        assert set(ids) <= train and len(ids) == 5
        d1, d2, d4 = (draw_shots(ids, k, 0, c) for k in (1, 2, 4))
        assert d2[:1] == d1 and d4[:2] == d2 and len(set(d4)) == 4  # nested, no repeats
        assert draw_shots(ids, 2, 0, c) == d2  # seeded
        assert sorted(draw_shots(ids, "all", 0, c)) == ids
    assert {draw_shots(pool["bottle"], 2, s, "bottle")[0] for s in range(8)} != {pool["bottle"][0]}  # seed matters
    with pytest.raises(ValueError, match=r"fewshot.shots asks for 6 .*category 'nut'.* only 5"):
        draw_shots(pool["nut"], 6, 0, "nut")
    with pytest.raises(ValueError, match="never come from test images"):
        candidates(rows, cfg(select={"label": 0}))


def test_k_too_large_fails_before_any_work(toy, tmp_path):
    with pytest.raises(ValueError, match=r"fewshot.shots .*'bottle'"):
        run(toy["index"], toy["manifest"], None, tmp_path / "f.json", tmp_path / "f.parquet", cfg(shots=[1, 9]))
    assert not (tmp_path / "f.json").exists()


def test_patchcore_with_and_without_generated_normals(toy, tmp_path):
    table = run(toy["index"], toy["manifest"], toy["checkpoint"], tmp_path / "f.json", tmp_path / "f.parquet",
                cfg(), threads=1)
    assert len(table) == 2 * 3 * 2  # categories x shots x methods
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f.parquet"), table)
    assert set(table["method"]) == set(METHODS)
    assert (table["backbone_weights"] == "random stand-in (seed 0)").all() and (table["backbone"] == "resnet18").all()
    assert table.set_index(["category", "shots", "method"])["setting"].xs("PatchCore", level="method").to_dict() == {
        (c, k): s for c in ("bottle", "nut") for k, s in (("1", "one-shot"), ("2", "few-shot"), ("all", "full-shot"))}
    plain, plus = table[table["method"] == METHODS[0]], table[table["method"] == METHODS[1]]
    assert (plain["n_generated"] == 0).all() and (plain["generator"] == "none").all()
    assert plus["n_generated"].tolist() == [2 * k for k in plus["k"]]  # 2 per shot, k = 1, 2, 5
    assert plus["generator"].str.startswith("full model").all()
    assert (table["n_real"] == table["k"]).all() and table["k"].tolist()[:6] == [1, 1, 2, 2, 5, 5]
    for m in ("image_auroc", "pixel_auroc", "aupro"):
        assert table[m].between(0, 1).all(), m
    assert (table["n_test"] == 6).all() and (table["n_test_anomalous"] == 3).all()
    assert (table["n_test_no_mask"] == 0).all()
    assert (plus["memory_bank"].to_numpy() > plain["memory_bank"].to_numpy()).all()
    js = json.loads((tmp_path / "f.json").read_text())
    assert js["weights"] == "random stand-in (seed 0)" and js["train_generator"] is False
    assert js["published"] is None and "dataset is toy" in js["published_note"]  # MVTec AD's numbers only
    assert js["shots"] == ["1", "2", "all"] and (table["dataset"] == "toy").all()
    train = set(toy["manifest"].query("split == 'train'")["sample_id"])
    assert all(set(ids) <= train for d in js["draws"].values() for ids in d.values())
    assert len(js["rows"]) == 12
    # seeded: a second run gives the same numbers
    again = run(toy["index"], toy["manifest"], toy["checkpoint"], tmp_path / "g.json", tmp_path / "g.parquet",
                cfg(shots=[2]), threads=1)
    mine = table[table["shots"] == "2"].reset_index(drop=True)
    np.testing.assert_allclose(again[["image_auroc", "pixel_auroc", "aupro"]], mine[["image_auroc", "pixel_auroc",
                                                                                  "aupro"]])


def test_without_a_checkpoint_only_patchcore_rows(toy, tmp_path):
    table = run(toy["index"], toy["manifest"], None, tmp_path / "f.json", tmp_path / "f.parquet",
                cfg(shots=[1], categories=["nut"]))
    assert table["method"].tolist() == ["PatchCore"] and table["category"].tolist() == ["nut"]


def test_weights_real_missing_fails_with_the_store_message_and_auto_is_a_labelled_stand_in(toy, tmp_path, model_dir):
    with pytest.raises(MissingWeightsError, match="resnet18"):
        run(toy["index"], toy["manifest"], None, tmp_path / "f.json", tmp_path / "f.parquet",
            cfg(weights="real", shots=[1]))
    table = run(toy["index"], toy["manifest"], None, tmp_path / "f.json", tmp_path / "f.parquet",
                cfg(weights="auto", shots=[1], categories=["bottle"]))
    assert table["backbone_weights"].tolist() == ["random stand-in (seed 0)"]


def test_config_errors():
    with pytest.raises(ValueError, match="train_generator"):
        FewShotConfig.from_dict({"train_generator": True})
    with pytest.raises(ValueError, match="fewshot.shots"):
        FewShotConfig.from_dict({"shots": [0, "all"]})
    with pytest.raises(ValueError, match="fewshot.shots"):
        FewShotConfig.from_dict({"shots": ["most"]})
    with pytest.raises(ValueError, match=r"unknown fewshot config key\(s\) \['shot'\]"):
        FewShotConfig.from_dict({"shot": [1]})
    assert FewShotConfig.from_dict({"enabled": "auto"}).shots == [1, 2, 4, 8, "all"]
    assert [setting(k) for k in (1, 4, "all")] == ["one-shot", "few-shot", "full-shot"]
    assert set(PUBLISHED_PATCHCORE["one-shot"]) == set(PUBLISHED_PATCHCORE["full-shot"])
    assert len(PUBLISHED_PATCHCORE["one-shot"]) == 16  # 15 MVTec AD categories and the mean


def test_report_table_in_the_seed_readme_layout_beside_the_published_numbers(toy, tmp_path):
    from hybrid.stages.baselines import BaselinesConfig
    from hybrid.stages.baselines import run as run_baselines
    from hybrid.stages.report import fewshot_table
    from hybrid.stages.report import run as build_report

    rows = pd.DataFrame([
        {"category": c, "shots": k, "setting": setting(int(k) if k != "all" else k), "method": m,
         "image_auroc": v, "pixel_auroc": v, "aupro": v}
        for c in ("bottle", "grid") for k in ("1", "4", "all") for m, v in zip(METHODS, (0.5, 0.75))])
    t = fewshot_table(rows, "image_auroc", PUBLISHED_PATCHCORE)
    assert list(t.columns) == ["Avg", "grid", "bottle"]  # the README's category order
    assert list(t.index) == [
        "one-shot · PatchCore, published (resnet18)", "one-shot · PatchCore",
        "one-shot · PatchCore + generated normals",
        "few-shot · PatchCore, published (resnet18)", "few-shot (k=4) · PatchCore",
        "few-shot (k=4) · PatchCore + generated normals",
        "full-shot · PatchCore, published (resnet18)", "full-shot · PatchCore",
        "full-shot · PatchCore + generated normals"]
    assert t.loc["one-shot · PatchCore, published (resnet18)"].tolist() == ["0.825", "0.649", "1.000"]
    assert t.loc["full-shot · PatchCore + generated normals"].tolist() == ["0.750", "0.750", "0.750"]

    fs = tmp_path / "fewshot.json"
    mvtec = make_industrial(tmp_path, n_train=3, n_good=2, n_bad=2, dataset="mvtec_ad")
    run(mvtec["index"], mvtec["manifest"], toy["checkpoint"], fs, tmp_path / "f.parquet", cfg(shots=[1, "all"]))
    assert json.loads(fs.read_text())["published"]["few-shot"]["mean"] == 0.914
    run_baselines(toy["index"], toy["manifest"], tmp_path / "baselines", BaselinesConfig(count=2))
    html = build_report(tmp_path / "index.html", fewshot_json=fs,
                        baselines_manifest=tmp_path / "baselines" / "manifest.parquet").read_text()
    for text in ('id="baselines"', 'id="fewshot"', 'href="#fewshot"', "perlin/images", "cutpaste/normal",
                 "one-shot · PatchCore + generated normals", "full-shot · PatchCore, published (resnet18)",
                 '<span class="badge stand-in">random stand-in (seed 0)</span>', "full model",
                 "some numbers come from random stand-in weights", "AU-PRO"):
        assert text in html, text
    assert html.count("data:image/png;base64,") == 2  # one baselines sheet per category
    assert 'id="fewshot"' not in build_report(tmp_path / "plain.html").read_text()
    # another dataset: no published row, and the page says why
    run(toy["index"], toy["manifest"], None, tmp_path / "toy.json", tmp_path / "toy.parquet", cfg(shots=[1]))
    html = build_report(tmp_path / "toy.html", fewshot_json=tmp_path / "toy.json").read_text()
    assert "published (resnet18)" not in html and "dataset is toy" in html


# ----------------------------------------------------------------------------- the workflow
def mvtec_tree(root, size: int = 48) -> None:
    """A tiny MVTec AD folder: two categories, 6 train / 2 good / 2 cracked test images, masks."""
    from PIL import Image

    from tests.test_baselines_stage import toy_image

    rng = np.random.default_rng(7)
    for c in ("bottle", "screw"):
        for split, defect, n in (("train", "good", 6), ("test", "good", 2), ("test", "crack", 2)):
            d = root / c / split / defect
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = toy_image(rng, size)
                if defect == "crack":
                    y, x = rng.integers(6, size - 18, 2)
                    img[y:y + 12, x:x + 12] = 250
                    m = np.zeros((size, size), np.uint8)
                    m[y:y + 12, x:x + 12] = 255
                    g = root / c / "ground_truth" / defect
                    g.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(m).save(g / f"{i:03d}_mask.png")
                Image.fromarray(img).save(d / f"{i:03d}.png")


@pytest.mark.slow
def test_workflow_runs_both_rules_on_an_industrial_layout_and_not_on_butterflies(tmp_path, monkeypatch):
    from tests.workflow_helpers import scheduled, snakemake, write_config

    monkeypatch.setenv("HYBRID_OFFLINE", "1")
    # Butterflies (the default demo): neither rule is part of the run.
    demo = tmp_path / "demo"
    demo.mkdir()
    write_config(demo)
    jobs = scheduled(demo)
    assert "classify" in jobs and not {"baselines", "fewshot"} & set(jobs)

    mvtec, work = tmp_path / "mvtec_ad", tmp_path / "work"
    mvtec_tree(mvtec)
    work.mkdir()
    write_config(work, {
        "dataset": {"layout": "mvtec_ad", "options": {"root": str(mvtec)}},
        "preprocess": {"depth_source": "none"},
        "model": {"conditions": ["reference_image", "target_edge"], "decoders": ["AHE"]},
        "baselines": {"count": 3},
        "fewshot": {"shots": [1, 2, "all"], "weights": "random", "device": "cpu", "generated_per_shot": 1},
    })
    jobs = scheduled(work)
    assert {"baselines", "fewshot"} <= set(jobs) and "classify" not in jobs
    targets = ["results/baselines/manifest.parquet", "results/metrics/fewshot.json"]
    snakemake(work, "--cores", "2", *targets)
    base = pd.read_parquet(work / "results/baselines/manifest.parquet")
    assert base.groupby(["category", "decoder"]).size().to_dict() == {
        (c, m): 3 for c in ("bottle", "screw") for m in ("cutpaste", "perlin")}
    assert (work / "results/baselines/sheets/screw.png").exists()
    fs = pd.read_parquet(work / "results/metrics/fewshot.parquet")
    assert len(fs) == 2 * 3 * 2 and (fs["backbone_weights"] == "random stand-in (seed 0)").all()
    assert fs.loc[fs["method"] == METHODS[1], "n_generated"].tolist() == [1, 2, 6] * 2
    for rule in ("baselines", "fewshot"):
        assert (work / f"results/logs/{rule}.log").exists() and (work / f"results/benchmarks/{rule}.tsv").exists()
    # Only what a setting feeds reruns (everything else is up to date). --cores ends --quiet's list.
    assert set(scheduled(work, "--config", "baselines={seed: 1}", "--cores", "1", *targets)) == {"baselines"}
    assert set(scheduled(work, "--config", "fewshot={coreset_ratio: 0.5}", "--cores", "1", *targets)) == {"fewshot"}
