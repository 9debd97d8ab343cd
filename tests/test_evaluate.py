"""The evaluate stage on tiny real and generated shards, with random stand-in feature networks."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from hybrid.models.store import MissingWeightsError
from hybrid.stages.evaluate import EvaluateConfig, lpips_network, random_inception, seeded_init
from hybrid.stages.evaluate import run as evaluate
from tests.conftest import shared_path
from tests.stage_data import make_generated, make_real

TINY = {"n_centres": 2, "is_splits": 2, "batch_size": 8, "lpips_min_size": 2}


def strict_json(text: str) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"evaluate.json holds {name}, which is not JSON")

    return json.loads(text, parse_constant=no_constants)


def test_scores_per_category_and_decoder_with_stand_ins_recorded(tmp_path, model_dir, caplog):
    real = make_real(tmp_path)
    gen = make_generated(tmp_path, per_decoder={"erato": 3, "melpomene": 1})
    out = tmp_path / "results" / "metrics"
    with caplog.at_level(logging.WARNING, logger="hybrid.stages.evaluate"):
        result = evaluate(gen, gen.parent, real["manifest"], real["index"], out, {"weights": "auto", **TINY})

    table = pd.read_parquet(out / "evaluate.parquet")
    keys = list(zip(table["category"], table["decoder"]))
    assert keys == [(c, d) for c in ("erato", "melpomene", "(mean)") for d in ("AHD", "AHE", "both")]
    t = table.set_index(["category", "decoder"])
    # Generated normal images are not anomalies: only the global ones are scored, and the JSON says so.
    assert t.loc[("erato", "AHD"), "n_images"] == 3 and t.loc[("erato", "both"), "n_images"] == 6
    assert t.loc[("melpomene", "both"), "n_images"] == 2 and t.loc[("(mean)", "both"), "n_images"] == 8
    assert result["kinds_left_out"] == {"normal": 4}
    scored = table[table["category"] != "(mean)"]
    assert np.isfinite(scored["is_mean"]).all() and (scored["is_mean"] >= 1.0).all()
    assert scored["is_splits"].tolist() == [2, 2, 2, 1, 1, 2]  # min(is_splits, images)

    # erato has 3 real test hybrids, 2 drawn as centres; 3 images per decoder put 2 in one cluster.
    for d in ("AHD", "AHE", "both"):
        row = t.loc[("erato", d)]
        assert row["n_centres"] == 2 and row["n_clusters_used"] >= 1
        assert math.isfinite(row["lpips"]) and row["lpips"] > 0
    manifest = pd.read_parquet(real["manifest"]).set_index("sample_id")
    centres = manifest.loc[result["centres"]["erato"]]
    assert len(centres) == 2 and set(centres["split"]) == {"test"} and set(centres["label"]) == {1}
    assert set(centres["category"]) == {"erato"}

    # melpomene has one real hybrid: no cluster LPIPS, and the outputs say why.
    assert t.loc[("melpomene", "both"), "lpips"] != t.loc[("melpomene", "both"), "lpips"]  # NaN
    assert "LPIPS skipped" in t.loc[("melpomene", "AHD"), "note"]
    kid_skip, skip = result["skipped"]
    assert skip["category"] == "melpomene" and skip["metric"] == "lpips"
    assert "1 real test anomalies" in skip["reason"] and "at least 2" in skip["reason"]
    assert kid_skip["category"] == "melpomene" and kid_skip["metric"] == "kid"
    # KID against erato's real test anomalies; the settings of every number beside it
    assert (scored.loc[scored["category"] == "erato", "kid_mean"].notna()).all()
    assert t.loc[("erato", "both"), "n_real"] == 5 and table["kid_mean"].iloc[3:6].isna().all()
    assert (table["settings"] == result["settings"]).all() and "LPIPS net=vgg cap=" in result["settings"]
    assert t.loc[("(mean)", "both"), "lpips"] == pytest.approx(t.loc[("erato", "both"), "lpips"])

    # Which weights produced each number: stand-ins here (empty model dir), with a warning in the log.
    assert (table["is_weights"] == "random stand-in (numbers not comparable to papers)").all()
    assert table["lpips_weights"].str.startswith("random stand-in").all()
    assert "backbone random" in result["weights"]["lpips"] and "linear random positive" in result["weights"]["lpips"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "inception_is" in warned and "RANDOM STAND-IN" in warned and "vgg16" in warned

    # The JSON is strict JSON (NaN written as null) and holds the same rows.
    doc = strict_json((out / "evaluate.json").read_text())
    assert len(doc["rows"]) == len(table)
    mel = next(r for r in doc["rows"] if r["category"] == "melpomene" and r["decoder"] == "both")
    assert mel["lpips"] is None and mel["is_mean"] == pytest.approx(t.loc[("melpomene", "both"), "is_mean"])
    assert doc["config"]["n_centres"] == 2 and doc["weights"]["inception_score"].startswith("random stand-in")


def test_real_weights_fail_with_the_store_message_before_writing(tmp_path, model_dir):
    real = make_real(tmp_path)
    gen = make_generated(tmp_path, per_decoder={"erato": 1})
    out = tmp_path / "results" / "metrics"
    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate(gen, gen.parent, real["manifest"], real["index"], out, {"weights": "real", **TINY})
    assert not (out / "evaluate.json").exists() and not (out / "evaluate.parquet").exists()
    with pytest.raises(ValueError, match="no generated images of kinds"):
        evaluate(gen, gen.parent, real["manifest"], real["index"], out, {"kinds": ["local"], **TINY})


def test_stand_ins_are_seeded_and_lpips_linear_layers_are_real_when_present(model_dir, monkeypatch):
    a, b = random_inception(0), random_inception(0)
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(a.Mixed_7c.branch_pool.conv.weight,
                                                                  b.Mixed_7c.branch_pool.conv.weight)
    small = [seeded_init(torch.nn.Conv2d(3, 4, 3), seed) for seed in (0, 0, 1)]
    assert torch.equal(small[0].weight, small[1].weight) and not torch.equal(small[0].weight, small[2].weight)

    metric, label = lpips_network(EvaluateConfig(weights="random"))  # model dir empty: all random
    assert "linear random positive" in label and all((w >= 0).all() for w in metric.lins.weights())
    again, _ = lpips_network(EvaluateConfig(weights="random"))
    assert torch.equal(metric.features_net[0].weight, again.features_net[0].weight)

    vgg = shared_path("models", "lpips", "v0.1", "vgg.pth")  # the official linear layers, where present
    monkeypatch.setenv("HYBRID_MODEL_DIR", str(vgg.parents[2]))
    metric, label = lpips_network(EvaluateConfig(weights="random"))
    assert label.startswith("random stand-in") and "backbone random" in label and "linear real: vgg.pth" in label
    official = torch.load(vgg, map_location="cpu", weights_only=True)
    assert torch.equal(metric.lins.lin0.model[1].weight, official["lin0.model.1.weight"])


def test_config_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown evaluate config key"):
        EvaluateConfig.from_dict({"n_centers": 10})
    with pytest.raises(ValueError, match="auto, real or random"):
        EvaluateConfig.from_dict({"weights": "pretrained"})
    assert EvaluateConfig.from_dict({"kinds": ["local"]}).kinds == ("local",)


def test_industrial_protocol_scores_local_anomalies_against_eval_anomalies_only(tmp_path, model_dir):
    real = make_real(tmp_path)
    manifest = pd.read_parquet(real["manifest"])
    anomalies = (manifest["split"] == "test") & (manifest["label"] == 1)
    manifest["defect"] = manifest["defect"].astype("string").where(~anomalies, "scratch")
    first = manifest[anomalies & (manifest["category"] == "erato")]["sample_id"].sort_values().iloc[0]
    manifest["protocol"] = pd.Series(pd.NA, index=manifest.index, dtype="string").where(
        ~anomalies, np.where(manifest["sample_id"] == first, "base", "eval"))
    gen = make_generated(tmp_path, per_decoder={"erato": 3})
    out = tmp_path / "results" / "metrics"
    gen_df = pd.read_parquet(gen)
    gen_df["kind"] = np.where(gen_df["kind"] == "global", "local", gen_df["kind"])
    result = evaluate(gen_df, gen.parent, manifest, real["index"], out, {"weights": "random", **TINY, "n_centres": 10})
    assert result["kinds"] == ["local"]  # auto: industrial data is scored on its local anomalies
    centres = result["centres"]["erato"]
    assert first not in centres and len(centres) == 4  # the base third fed generation: never a centre
    table = pd.read_parquet(out / "evaluate.parquet").set_index(["category", "decoder"])
    assert table.loc[("erato", "AHD"), "n_real"] == 4 and np.isfinite(table.loc[("erato", "AHD"), "kid_mean"])
