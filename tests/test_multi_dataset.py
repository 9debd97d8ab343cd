"""One model over several datasets (AnomalyFactory Sec. 4.1-4.2): the MAD-Sim and Real-IAD readers,
`dataset` as a list merged into one manifest, the layout-aware defaults over every layout, and the
schema's messages for a list."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from hybrid.autoconf import ConfigError, dataset_entries, resolve_auto, schema_errors
from hybrid.data.manifest import MANIFEST_COLUMNS, ManifestError
from hybrid.data.readers import READERS, read_dataset
from hybrid.stages.ingest import SKIPPED_COLUMNS, ingest
from hybrid.stages.ingest import run as ingest_datasets
from tests.stage_data import REPO_CONFIG

SCHEMA = yaml.safe_load((REPO_CONFIG.parent / "schema.yaml").read_text())


def img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((4, 4, 3), 128, np.uint8))
    return path


# ---------------------------------------------------------------- MAD-Sim


def madsim_tree(root: Path, toys=("01Gorilla", "02Unicorn"), per_defect: int = 3) -> dict:
    """MAD-Sim's public layout: toys as MVTec AD categories, Burrs / Missing / Stains, transforms.json."""
    for toy in toys:
        for i in range(2):
            img(root / toy / "train" / "good" / f"{i}.png")
        img(root / toy / "test" / "good" / "0.png")
        for defect in ("Burrs", "Missing", "Stains"):
            for i in range(per_defect):
                img(root / toy / "test" / defect / f"{i}.png")
                img(root / toy / "ground_truth" / defect / f"{i}_mask.png")
        (root / toy / "transforms.json").write_text(json.dumps({"frames": []}))
        (root / toy / "license").write_text("CC BY-NC-SA 4.0")
        (root / toy / "readme").write_text("MAD-Sim")
    return {"root": str(root)}


def test_madsim_reads_the_pad_layout(tmp_path):
    df = read_dataset("madsim", madsim_tree(tmp_path / "MAD-Sim"))
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert set(df["dataset"]) == {"madsim"} and set(df["category"]) == {"01Gorilla", "02Unicorn"}
    burr = df[df["sample_id"] == "madsim/01Gorilla/test/Burrs/1"].iloc[0]
    assert (burr["label"], burr["defect"], burr["split"]) == (1, "Burrs", "test")
    assert burr["mask_path"].endswith("01Gorilla/ground_truth/Burrs/1_mask.png")
    good = df[df["label"] == 0]
    assert set(good["defect"]) == {"good"} and good["mask_path"].isna().all() and len(good) == 6
    assert len(df) == 2 * (2 + 1 + 9)
    (tmp_path / "MAD-Sim/02Unicorn/ground_truth/Stains/2_mask.png").unlink()
    with pytest.raises(ManifestError, match="no mask.*Stains/2.png"):
        read_dataset("madsim", {"root": str(tmp_path / "MAD-Sim")})


# ---------------------------------------------------------------- Real-IAD


def realiad_entry(cat: str, obj: int, view: int, defect: str | None, mask: bool = True) -> dict:
    """One entry of a Real-IAD split JSON, and its files (paths relative to the category folder)."""
    kind = f"NG/{defect}" if defect else "OK"
    stem = f"{cat}_{obj:04d}_{'NG' if defect else 'OK'}_C{view}_2023102113{obj:04d}"
    entry = {"category": cat, "anomaly_class": defect or "OK", "image_path": f"{kind}/S{obj:04d}/{stem}.jpg",
             "mask_path": f"{kind}/S{obj:04d}/{stem}.png" if defect and mask else None}
    return entry


def realiad_tree(root: Path, cats=("audiojack", "toy_brick"), images: str = "realiad_256",
                 jsons: str = "realiad_jsons/realiad_jsons") -> dict:
    """Real-IAD's public layout: per-category split JSONs, five views (C1..C5) of every object."""
    for cat in cats:
        train = [realiad_entry(cat, obj, v, None) for obj in (1, 2) for v in range(1, 6)]
        test = [realiad_entry(cat, 3, v, None) for v in range(1, 6)]
        # an NG object: the defect shows in views 1-3 (AK, with masks); in 4-5 the JSON says OK
        test += [realiad_entry(cat, 4, v, "AK") for v in (1, 2, 3)]
        test += [dict(realiad_entry(cat, 4, v, None), image_path=realiad_entry(cat, 4, v, "AK")["image_path"])
                 for v in (4, 5)]
        test += [realiad_entry(cat, obj, 1, "BX") for obj in (5, 6, 7)]
        for e in train + test:
            img(root / images / cat / e["image_path"])
            if e["mask_path"]:
                img(root / images / cat / e["mask_path"])
        img(root / images / cat / "OK/S0099/not_in_any_json_C1_.jpg")  # the JSON decides what is read
        doc = {"meta": {"prefix": f"{cat}/", "normal_class": "OK"}, "train": train, "test": test}
        (root / jsons).mkdir(parents=True, exist_ok=True)
        (root / jsons / f"{cat}.json").write_text(json.dumps(doc))
    return {"root": str(root), "images": images, "jsons": jsons}


def test_realiad_follows_its_split_json_with_the_view_in_the_id(tmp_path):
    opts = realiad_tree(tmp_path / "Real-IAD")
    df = read_dataset("realiad", opts)
    assert list(df.columns) == list(MANIFEST_COLUMNS) and set(df["dataset"]) == {"realiad"}
    assert len(df) == 2 * (10 + 5 + 5 + 3)
    ids = set(df["sample_id"])
    assert "realiad/audiojack/OK/S0001/audiojack_0001_OK_C3_2023102113" + "0001" in ids  # view C3 in the id
    assert not any("not_in_any_json" in s for s in ids)
    a = df[df["category"] == "audiojack"]
    assert a["split"].value_counts().to_dict() == {"train": 10, "test": 13}
    assert (a.loc[a["split"] == "train", "label"] == 0).all()
    ng = a[(a["label"] == 1)]
    assert sorted(ng["defect"].value_counts().items()) == [("AK", 3), ("BX", 3)]
    assert ng["mask_path"].notna().all() and ng["mask_path"].str.endswith(".png").all()
    hidden = a[a["image_path"].str.contains("_NG_C4_|_NG_C5_", regex=True)]
    assert len(hidden) == 2 and (hidden["label"] == 0).all() and set(hidden["defect"]) == {"good"}

    one_view = read_dataset("realiad", {**opts, "views": ["C1"], "categories": ["toy_brick"]})
    assert set(one_view["category"]) == {"toy_brick"} and one_view["image_path"].str.contains("_C1_").all()
    assert len(one_view) == 2 + 1 + 1 + 3

    first = json.loads((tmp_path / "Real-IAD/realiad_jsons/realiad_jsons/toy_brick.json").read_text())
    (tmp_path / "Real-IAD/realiad_256/toy_brick" / first["test"][-1]["mask_path"]).unlink()
    with pytest.raises(ManifestError, match="no mask"):
        read_dataset("realiad", opts)
    skipped = read_dataset("realiad", {**opts, "missing": "skip"})
    assert len(skipped) == len(df) - 1 and skipped.attrs["skipped"][0]["reason"] == "no mask"
    with pytest.raises(ManifestError, match="realiad split-file folder"):
        read_dataset("realiad", {**opts, "jsons": "realiad_jsons/nope"})


def test_new_layouts_are_registered_with_the_protocol():
    from hybrid.autoconf import INDUSTRIAL_LAYOUTS
    from hybrid.data.protocol import LAYOUTS

    for layout in ("madsim", "realiad"):
        assert layout in READERS and layout in LAYOUTS and layout in INDUSTRIAL_LAYOUTS
        assert layout in SCHEMA["properties"]["dataset"]["oneOf"][0]["properties"]["layout"]["enum"]


# ---------------------------------------------------------------- dataset as a list


def mvtec_tree(root: Path) -> dict:
    for p in ["bottle/train/good/000.png", "bottle/train/good/001.png", "bottle/test/good/000.png"]:
        img(root / p)
    for i in range(3):
        img(root / f"bottle/test/broken/{i:03d}.png")
        img(root / f"bottle/ground_truth/broken/{i:03d}_mask.png")
    return {"root": str(root)}


def test_a_dataset_list_is_one_manifest_with_unique_ids(tmp_path):
    mv, ms = mvtec_tree(tmp_path / "mvtec"), madsim_tree(tmp_path / "madsim", toys=("01Gorilla",))
    out = tmp_path / "out"
    alone = ingest("mvtec_ad", mv, "error", out / "alone.parquet", out / "alone.csv", {})
    merged = ingest_datasets([{"layout": "mvtec_ad", "options": mv},
                              {"layout": "mvtec_ad", "name": "mvtec_copy", "options": mv},
                              {"layout": "madsim", "name": "mad", "options": ms}],
                             "error", out / "m.parquet", out / "m.csv", {})
    assert merged["sample_id"].is_unique and len(merged) == 2 * len(alone) + 12
    assert merged.groupby("dataset").size().to_dict() == {"mvtec_ad": len(alone), "mvtec_copy": len(alone), "mad": 12}
    by = {d: set(g["sample_id"]) for d, g in merged.groupby("dataset")}
    assert by["mvtec_ad"] == set(alone["sample_id"])  # named after its layout: the ids it has alone
    assert by["mvtec_copy"] == {f"mvtec_copy/{s}" for s in alone["sample_id"]}
    assert all(s.startswith("mad/madsim/01Gorilla/") for s in by["mad"])
    # each dataset gets its own protocol split (per category and defect type)
    base = merged[merged["protocol"] == "base"].groupby("dataset").size().to_dict()
    assert base == {"mvtec_ad": 1, "mvtec_copy": 1, "mad": 3}
    assert pd.read_parquet(out / "m.parquet")["sample_id"].is_unique

    img(tmp_path / "madsim/01Gorilla/test/Burrs/9.png")  # no mask: the skip list names the dataset
    ingest_datasets([{"layout": "mvtec_ad", "options": mv}, {"layout": "madsim", "name": "mad", "options": ms}],
                    "skip", out / "s.parquet", out / "s.csv", {})
    skipped = pd.read_csv(out / "s.csv")
    assert list(skipped.columns) == SKIPPED_COLUMNS and skipped.loc[0, "dataset"] == "mad"
    with pytest.raises(ValueError, match=r"names \['mvtec_ad'\] repeat"):
        ingest_datasets([{"layout": "mvtec_ad", "options": mv}, {"layout": "mvtec_ad", "options": mv}],
                        "error", out / "d.parquet", out / "d.csv", {})


def default_config(dataset) -> dict:
    cfg = yaml.safe_load(REPO_CONFIG.read_text())
    cfg["dataset"] = dataset
    return cfg


def entry(layout: str, **kw) -> dict:
    return {"layout": layout, "options": {} if layout.startswith("demo") else {"root": "/data"}, **kw}


def test_dataset_entries_and_unique_names():
    assert dataset_entries({"dataset": entry("visa")}) == [{"name": "visa", "layout": "visa",
                                                            "options": {"root": "/data"}}]
    two = dataset_entries({"dataset": [entry("visa"), entry("realiad", name="riad")]})
    assert [(e["name"], e["layout"]) for e in two] == [("visa", "visa"), ("riad", "realiad")]
    with pytest.raises(ConfigError, match=r"names \['visa'\] are used by more than one entry"):
        dataset_entries({"dataset": [entry("visa"), entry("visa")]})


def test_auto_defaults_consider_every_layout(model_dir):
    both_3d, notes = resolve_auto(default_config([entry("mvtec_3d"), entry("mvtec_3d", name="b")]))
    assert both_3d["preprocess"]["depth_source"] == "sensor"
    mixed, notes = resolve_auto(default_config([entry("mvtec_3d"), entry("mvtec_ad")]))
    assert mixed["preprocess"]["depth_source"] == "none"  # depth of its own only if every dataset has it
    assert any("not every dataset has depth of its own" in n for n in notes)
    assert mixed["generate"]["local"]["source"] == "base"
    own, _ = resolve_auto(default_config([entry("mvtec_3d"), entry("demo_industrial")]))
    assert own["preprocess"]["depth_source"] == "sensor"  # both read the manifest's depth_path
    butterflies = default_config([entry("demo"), entry("demo", name="demo2")])
    assert resolve_auto(butterflies)[0]["generate"]["global"]["pairing"] == "groups"
    with_industrial, _ = resolve_auto(default_config([entry("demo"), entry("mvtec_ad")]))
    assert with_industrial["generate"]["global"]["pairing"] == "random"  # groups only for all-butterfly lists
    assert with_industrial["generate"]["local"]["source"] == "select"  # base only when every layout has defects


def test_schema_takes_a_list_and_names_the_key_of_a_mistake():
    ok = default_config([entry("mvtec_ad"), entry("realiad", name="riad", options={"root": "/r", "views": ["C1"]})])
    assert schema_errors(ok, SCHEMA, "schema.yaml") == []
    assert schema_errors(default_config(entry("visa")), SCHEMA, "schema.yaml") == []
    bad = default_config([entry("mvtec_ad"), {"layout": "mvtec_ad", "options": {"rot": "/x"}}])
    errors = schema_errors(bad, SCHEMA, "schema.yaml")
    assert any(e.startswith("config key dataset.1.options: Additional properties") and "'rot' was unexpected" in e
               and "['categories', 'root']" in e for e in errors), errors
    errors = schema_errors(default_config([entry("mvtec")]), SCHEMA, "schema.yaml")
    assert any(e.startswith("config key dataset.0.layout: 'mvtec' is not one of") for e in errors), errors
    errors = schema_errors(default_config({"layout": "realiad", "options": {"root": "/r", "views": ["1"]}}),
                           SCHEMA, "schema.yaml")
    assert any(e.startswith("config key dataset.options.views.0:") for e in errors), errors
    assert schema_errors(default_config([]), SCHEMA, "schema.yaml") == [
        "config key dataset: [] should be non-empty (see schema.yaml)"]


# ---------------------------------------------------------------- the workflow


def test_the_workflow_plans_and_ingests_a_two_layout_list(tmp_path, model_dir):
    from tests.workflow_helpers import scheduled, snakemake, write_config

    mv, ri = mvtec_tree(tmp_path / "mvtec"), realiad_tree(tmp_path / "Real-IAD", cats=("audiojack",))
    datasets = [{"layout": "mvtec_ad", "options": mv}, {"layout": "realiad", "name": "riad", "options": ri}]
    write_config(tmp_path, {"dataset": datasets, "preprocess": {"depth_source": "auto"},
                            "anomalyfactory": {"enabled": True, "per_dataset": {"riad": 2, "mvtec_ad": 1}}})
    jobs = scheduled(tmp_path)
    assert {"ingest", "preprocess", "train", "generate", "evaluate", "boot", "flare", "blaze", "localize",
            "report"} <= set(jobs), jobs
    assert "demo_data" not in jobs and "classify" not in jobs
    snakemake(tmp_path, "--cores", "1", "results/manifest.parquet")
    man = pd.read_parquet(tmp_path / "results/manifest.parquet")
    assert man.groupby("dataset").size().to_dict() == {"mvtec_ad": 6, "riad": 23}
    assert man["sample_id"].is_unique and man.loc[man["dataset"] == "riad", "sample_id"].str.startswith(
        "riad/realiad/audiojack/").all()
    assert (man["protocol"] == "base").groupby(man["dataset"]).sum().to_dict() == {"mvtec_ad": 1, "riad": 2}


# ---------------------------------------------------------------- cross-dataset references (Table 2)


def merged_rows() -> pd.DataFrame:
    """Dataset a: categories x and shared; dataset b: categories shared and z; normal training rows
    plus one test anomaly each."""
    rows = []
    for ds, cats in (("a", ("x", "shared")), ("b", ("shared", "z"))):
        for c in cats:
            rows += [{"sample_id": f"{ds}/{c}/{i}", "dataset": ds, "category": c, "split": "train", "label": 0}
                     for i in range(4)]
            rows.append({"sample_id": f"{ds}/{c}/bad", "dataset": ds, "category": c, "split": "test", "label": 1})
    return pd.DataFrame(rows)


def plan(rows: pd.DataFrame, select: dict, **pairings):
    from types import SimpleNamespace

    from hybrid.planning import PairingConfig, plan_jobs

    cfg = SimpleNamespace(seed=0, kinds=list(pairings), select=select,
                          pairings={k: PairingConfig.from_dict(v, k) for k, v in pairings.items()},
                          manipulate=SimpleNamespace(manipulations=["merge"]))
    return plan_jobs(rows, cfg)


def test_reference_datasets_take_references_from_other_datasets_targets_per_category():
    rows = merged_rows()
    normal = {"split": "train", "label": 0}
    jobs = plan(rows, {**normal, "dataset": "a"}, local={"count": 6, "reference_datasets": ["b"]})
    assert {j.category for j in jobs} == {"x", "shared"} and len(jobs) == 12
    assert all(j.target_id.startswith("a/") and j.reference_id.startswith("b/") for j in jobs)
    # select's split and label hold for the references too
    assert all(j.reference_dataset == "b" and not j.reference_id.endswith("/bad") for j in jobs)
    assert {j.reference_id.split("/")[1] for j in jobs} == {"shared", "z"}  # any category of b
    assert plan(rows, {**normal, "dataset": "a"}, local={"count": 6, "reference_datasets": ["b"]}) == jobs

    # without reference_datasets, random pairs of a merged manifest stay within one dataset and category
    own = plan(rows, normal, local={"count": 20})
    assert all(j.reference_id.split("/")[:2] == j.target_id.split("/")[:2] for j in own)
    assert {j.reference_dataset for j in own} == {"a", "b"}
    # the own dataset can be a reference pool too ("mvtec_ad + mvtec_loco"), never the target itself
    both = plan(rows, {**normal, "dataset": "a"}, normal={"count": 30, "reference_datasets": ["a", "b"]})
    assert {j.reference_dataset for j in both} == {"a", "b"} and all(j.reference_id != j.target_id for j in both)

    with pytest.raises(ValueError, match=r"reference_datasets names \['c'\], not datasets of the manifest"):
        plan(rows, normal, local={"reference_datasets": ["c"]})
    with pytest.raises(ValueError, match="needs pairing: random and source: select"):
        plan(rows, normal, local={"reference_datasets": ["b"], "source": "base"})


def test_reference_datasets_are_checked_against_the_dataset_list_before_any_job(model_dir):
    from hybrid.autoconf import check_config

    cfg = default_config([entry("mvtec_ad"), entry("mvtec_loco", name="loco")])
    cfg["generate"]["normal"]["reference_datasets"] = ["loco"]
    check_config(resolve_auto(cfg)[0])
    cfg["generate"]["global"]["reference_datasets"] = ["mvtec_lcoo"]
    cfg["generate"]["local"]["reference_datasets"] = ["loco"]  # local.source auto -> base on industrial lists
    with pytest.raises(ConfigError) as err:
        check_config(resolve_auto(cfg)[0])
    assert "generate.global.reference_datasets names ['mvtec_lcoo'], which are not datasets" in str(err.value)
    assert "generate.local.reference_datasets needs pairing: random and source: select" in str(err.value)
    assert schema_errors(cfg, SCHEMA, "schema.yaml") == []


# ---------------------------------------------------------------- Tables 1-2: per dataset and reference source


def test_generation_quality_per_dataset_and_reference_source_boot_vs_flare(tmp_path, one_thread):
    from hybrid.stages.localize import Inputs, LocalizeConfig, Outputs, run
    from hybrid.stages.report import anomalyfactory_section
    from tests.af_data import MANIPULATE, make_results, save_af_checkpoint

    data = make_results(tmp_path)  # two datasets: toy_a (category disc), toy_b (ring)
    ckpt = {s: save_af_checkpoint(tmp_path / s, s, seed=k) for k, s in enumerate(("boot", "flare", "blaze"))}
    out = tmp_path / "out"
    outputs = Outputs(out / "l.json", out / "l.parquet", out / "strips", out / "q.json", out / "q.parquet")
    inputs = Inputs(data["manifest"], data["index"], ckpt["boot"], ckpt["flare"], ckpt["blaze"])
    cfg = LocalizeConfig.from_dict({"device": "cpu", "strip_images": 0},
                                   {"count": 2, "strategies": ["stochastic", "mixed"], "references": ["self", "toy_b"]})
    evaluate = {"weights": "random", "device": "cpu", "n_centres": 2, "batch_size": 8}
    res = run(inputs, outputs, cfg, flare_cfg={"region_mix": 0.0}, manipulate_cfg=MANIPULATE, evaluate_cfg=evaluate)
    q = json.loads(outputs.quality_json.read_text())
    assert q["references"] == ["self", "toy_b"]
    rows = pd.DataFrame(q["rows"])
    cats = rows[rows["category"] != "(mean)"]
    assert set(zip(cats["dataset"], cats["category"])) == {("toy_a", "disc"), ("toy_b", "ring")}
    stochastic = cats[cats["strategy"] == "stochastic"]
    assert len(stochastic) == 2 * 2 * 2 and (stochastic["n_images"] == 2).all()  # datasets x references x generators
    mixed = cats[cats["strategy"] == "mixed"]  # no SAM maps: NaN with the reason, for every reference source
    assert mixed["is_mean"].isna().all() and set(mixed["reference"]) == {"self", "toy_b"}
    # the same edited edges with other references give other images: another cluster LPIPS
    disc = stochastic[(stochastic["category"] == "disc") & (stochastic["generator"] == "flare")].set_index("reference")
    assert disc["lpips"].fillna(-1).loc["self"] != disc["lpips"].fillna(-1).loc["toy_b"]
    means = rows[rows["category"] == "(mean)"]
    assert set(means["dataset"]) == {"toy_a", "toy_b", "(all)"}  # Table 2's rows, then the mean over all
    assert set(zip(means["reference"], means["generator"])) == {(r, g) for r in ("self", "toy_b")
                                                                for g in ("boot", "flare")}
    html = anomalyfactory_section(res)
    assert "the layout of paper 002 Table 2" in html and "toy_b · flare" in html and "self · boot" in html
    assert "toy_a / disc" in html  # Table 1's rows name the dataset when there are several

    bad = LocalizeConfig.from_dict({"device": "cpu", "strip_images": 0}, {"count": 2, "references": ["loco"]})
    with pytest.raises(ValueError, match=r"quality.references names \['loco'\]"):
        run(inputs, outputs, bad, flare_cfg={"region_mix": 0.0}, manipulate_cfg=MANIPULATE, evaluate_cfg=evaluate)
    with pytest.raises(ValueError, match="distinct sources"):
        LocalizeConfig.from_dict({}, {"references": []})


def test_af_dataset_names_are_checked_before_any_job(model_dir):
    from hybrid.autoconf import check_config

    cfg = default_config([entry("visa"), entry("realiad")])
    cfg["anomalyfactory"].update(enabled=True, per_dataset={"visa": 200, "realiad": 400},
                                 quality={"count": 4, "references": ["self", "visa"]})
    check_config(resolve_auto(cfg)[0])
    assert schema_errors(cfg, SCHEMA, "schema.yaml") == []
    cfg["anomalyfactory"].update(per_dataset={"VisA": 200}, quality={"references": ["self", "mvtec_loco"]})
    with pytest.raises(ConfigError) as err:
        check_config(resolve_auto(cfg)[0])
    assert "anomalyfactory.per_dataset names ['VisA']" in str(err.value)
    assert "anomalyfactory.quality.references names ['mvtec_loco']" in str(err.value)


@pytest.mark.slow
def test_two_datasets_run_to_generation_with_cross_dataset_references(tmp_path, model_dir):
    """ingest -> preprocess -> train -> generate on mvtec_ad + madsim trees at 40 px (about 2 minutes on
    2 cores): one model, one manifest, normal pairs with MAD-Sim references for MVTec AD targets."""
    from tests.test_default_config import INDUSTRIAL_TINY, mvtec_ad
    from tests.workflow_helpers import snakemake, write_config

    rng = np.random.default_rng(0)
    datasets = [{"layout": "mvtec_ad", "options": mvtec_ad(tmp_path / "mvtec", rng)},
                {"layout": "madsim", "options": mvtec_ad(tmp_path / "madsim", rng)}]  # the same tree layout
    write_config(tmp_path, {**INDUSTRIAL_TINY, "dataset": datasets,
                            "generate": {**INDUSTRIAL_TINY["generate"], "kinds": ["local", "normal"],
                                         "normal": {"count": 3, "reference_datasets": ["madsim"]}}})
    snakemake(tmp_path, "--cores", "2", "results/generated/manifest.parquet")
    man = pd.read_parquet(tmp_path / "results/manifest.parquet")
    assert set(man["dataset"]) == {"mvtec_ad", "madsim"} and man["sample_id"].is_unique
    gen = pd.read_parquet(tmp_path / "results/generated/manifest.parquet")
    normal = gen[gen["kind"] == "normal"]
    assert len(normal) and normal["reference_id"].str.startswith("madsim/").all()
    local = gen[gen["kind"] == "local"]  # base-set pairs of each dataset's own defect types
    assert set(local["target_id"].str.split("/").str[0]) == {"mvtec_ad", "madsim"}


def test_a_category_name_two_datasets_share_is_told_apart():
    from hybrid.data.manifest import distinct_categories

    rows = pd.DataFrame({"dataset": ["mvtec_ad", "mvtec_ad", "visa", "visa"],
                         "category": ["bottle", "screw", "bottle", "pcb1"]})
    assert distinct_categories(rows).tolist() == ["mvtec_ad / bottle", "screw", "visa / bottle", "pcb1"]
    assert distinct_categories(rows.drop(columns="dataset")).tolist() == ["bottle", "screw", "bottle", "pcb1"]
