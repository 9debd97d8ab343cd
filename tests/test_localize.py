"""The localize stage (Blaze on the real test images, strips, Boot vs Flare quality), its report section,
and the AnomalyFactory rules end to end on the tiny butterfly demo."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hybrid.checkpoint import load_checkpoint
from hybrid.metrics.localization import LocalizationMetrics
from hybrid.regions import write_regions
from hybrid.stages.localize import Inputs, LocalizeConfig, Outputs, read_rows, run, run_blaze, to_model
from hybrid.stages.report import run as build_report
from tests.af_data import MANIPULATE, make_results, save_af_checkpoint
from tests.workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(tmp_path, regions=False):
    data = make_results(tmp_path)
    ckpt = {s: save_af_checkpoint(tmp_path / s, s, seed=k) for k, s in enumerate(("boot", "flare", "blaze"))}
    reg = None
    if regions:  # a candidate map for every image: two squares
        idx = pd.read_parquet(data["index"])
        labels = np.zeros((len(idx), 32, 32), np.uint8)
        labels[:, 4:12, 4:12], labels[:, 18:28, 16:30] = 1, 2
        reg = tmp_path / "regions.h5"
        write_regions(reg, labels, idx["sample_id"].tolist(), {"status": "sam", "note": ""})
    inputs = Inputs(data["manifest"], data["index"], ckpt["boot"], ckpt["flare"], ckpt["blaze"], reg)
    out = tmp_path / "out"
    outputs = Outputs(out / "localize.json", out / "localize.parquet", out / "strips", out / "af_generation.json",
                      out / "af_generation.parquet")
    return data, inputs, outputs


def test_localize_scores_blaze_heatmaps_and_writes_the_strips(tmp_path):
    data, inputs, outputs = setup(tmp_path)
    res = run(inputs, outputs, LocalizeConfig(device="cpu", strip_images=2, quality_count=0),
              flare_cfg={"region_mix": 0.0}, manipulate_cfg=MANIPULATE)
    rows = {r["category"]: r for r in res["rows"]}
    assert set(rows) == {"disc", "ring", "(mean)"}
    disc, ring = rows["disc"], rows["ring"]
    assert disc["n_test"] == 6 and disc["n_masks"] == 3 and disc["note"] == ""
    assert all(disc[k] is not None for k in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"))
    # the anomaly of ring without a mask: image metrics only, and the reason named
    assert ring["pixel_auroc"] is None and "1 of 2 test anomalies have no ground-truth mask" in ring["note"]
    assert ring["image_auroc"] is not None
    # the same numbers as LocalizationMetrics on Blaze's heatmaps
    manifest, index = pd.read_parquet(data["manifest"]), pd.read_parquet(data["index"])
    t = manifest.merge(index, on="sample_id")
    t = t[(t["category"] == "disc") & (t["split"] == "test")].sort_values("sample_id").reset_index(drop=True)
    arrays, _ = read_rows(t, data["index"].parent, ["image", "edge", "mask"])
    _, heat = run_blaze(load_checkpoint(inputs.blaze), to_model(arrays["image"]), to_model(arrays["edge"]), 16,
                        torch.device("cpu"))
    expect = LocalizationMetrics(sigma=4.0)
    expect.update(heat.numpy(), arrays["mask"] > 127, labels=t["label"].to_numpy())
    assert all(np.isclose(v, disc[k]) for k, v in expect.compute().items())
    table = pd.read_parquet(outputs.table)
    assert list(table["category"]) == ["disc", "ring", "(mean)"]
    assert res["strips"]["disc"] == {"flare_blaze": str(outputs.strips / "disc.png"),
                                     "test": str(outputs.strips / "disc-test.png")}
    assert all(Path(p).exists() for s in res["strips"].values() for p in s.values())
    html = build_report(tmp_path / "report.html", localize_json=outputs.json).read_text()
    assert 'id="anomalyfactory"' in html and html.count("anomalyfactory disc") == 2 and "BlazeDetector" in html


def test_generation_quality_compares_boot_and_flare_per_region_strategy(tmp_path):
    _, inputs, outputs = setup(tmp_path, regions=True)
    cfg = LocalizeConfig.from_dict({"device": "cpu", "strip_images": 0},
                                   {"count": 3, "strategies": ["semantic", "stochastic"]})
    run(inputs, outputs, cfg, flare_cfg={"region_mix": 0.5}, manipulate_cfg=MANIPULATE,
        evaluate_cfg={"weights": "random", "device": "cpu", "n_centres": 3, "batch_size": 8})
    q = json.loads(outputs.quality_json.read_text())
    rows = pd.DataFrame(q["rows"])
    cats = rows[rows["category"] != "(mean)"]
    assert set(cats["category"]) == {"disc", "ring"}
    assert set(zip(cats["strategy"], cats["generator"])) == {(s, g) for s in ("semantic", "stochastic")
                                                             for g in ("boot", "flare")}
    assert (cats["n_images"] == 3).all() and (cats["is_mean"] > 0).all()
    assert (cats.loc[cats["strategy"] == "semantic", "n_semantic"] == 3).all()
    assert (cats.loc[cats["strategy"] == "stochastic", "n_semantic"] == 0).all()
    lp = cats.dropna(subset=["lpips"])
    assert len(lp) and np.allclose(lp["lpips_x10"], 10 * lp["lpips"])
    assert "random stand-in" in q["weights"]["inception_score"]
    html = build_report(tmp_path / "r.html", localize_json=outputs.json).read_text()
    assert "semantic · flare" in html and "stochastic · boot" in html


@pytest.mark.slow
def test_anomalyfactory_rules_end_to_end_on_the_tiny_demo(tmp_path):
    """boot -> flare -> blaze -> localize at 32 px on the butterfly demo (about 2 minutes on 2 cores), then a
    changed Flare setting reschedules flare, blaze and localize but not boot."""
    af = {"enabled": True, "boot": {"epochs": 1, "epochs_decay": 1, "batch_size": 4},
          "flare": {"epochs": 1, "batch_size": 4}, "blaze": {"epochs": 1, "batch_size": 4},
          "localize": {"device": "cpu", "strip_images": 2}, "quality": {"count": 2, "strategies": ["stochastic"]}}
    write_config(tmp_path, {"anomalyfactory": af})
    snakemake(tmp_path, "--cores", "2", "results/metrics/localize.json")
    res = tmp_path / "results"
    for stage in ("boot", "flare", "blaze"):
        ckpt = res / "anomalyfactory" / stage / "checkpoint"
        assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "discriminator.safetensors",
                                                    "state.pt"}
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["model"]["decoders"] == ["AHE"]
        assert cfg.get("anomalyfactory", {}).get("stage", "boot") == stage
        assert (res / "logs" / f"{stage}.log").exists() and (res / "benchmarks" / f"{stage}.tsv").exists()
        assert list((res / "anomalyfactory" / stage / "work").iterdir())  # the resumable work folder
    loc = json.loads((res / "metrics" / "localize.json").read_text())
    assert {r["category"] for r in loc["rows"]} == {"erato", "melpomene", "(mean)"}
    assert all((tmp_path / p).exists() for s in loc["strips"].values() for p in s.values())
    assert (res / "metrics" / "af_generation.parquet").exists()
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("w_fh: 10.0", "w_fh: 5.0"))
    proc = snakemake(tmp_path, "-n", "results/metrics/localize.json")
    out = proc.stdout + proc.stderr
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    assert all(f"\n{r} " in table for r in ("flare", "blaze", "localize")) and "\nboot " not in table
