"""The classify stage on tiny shards, a tiny reference CSV and the random DINOv2 stand-in."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from hybrid.metrics.challenge import read_predictions, score_files
from hybrid.models.store import MissingWeightsError
from hybrid.stages.classify import ClassifyStageConfig, match_reference
from hybrid.stages.classify import run as run_classify_stage
from tests.stage_data import make_generated, make_real

# Small heads: the stage's plumbing is under test, not the heads (tests/test_classify.py).
FAST = {"weights": "random", "linear_hidden": [16], "linear_epochs": 5, "batch_size": 16, "device": "cpu"}
RECALLS = ["major_recall", "minor_recall", "mimic_recall", "challenge_score"]


def test_heads_by_training_sets_predictions_rescorable_and_cache_reused(tmp_path, model_dir, caplog):
    real = make_real(tmp_path)
    gen = make_generated(tmp_path, per_decoder={"erato": 3, "melpomene": 2})
    out = tmp_path / "results" / "metrics"
    args = (real["manifest"], real["index"], gen, gen.parent, real["reference"], out, FAST)
    with caplog.at_level(logging.INFO, logger="hybrid.classify"):
        table = run_classify_stage(*args)

    # Table 6: 2 heads x 4 training sets; generated global hybrids of each decoder (normal ones left out).
    assert list(zip(table["head"], table["train_set"])) == [
        (h, t) for t in ("train", "train+AHD", "train+AHE", "train+both") for h in ("linear", "sgd")]
    assert table.groupby("train_set")["n_generated"].first().to_dict() == {
        "train": 0, "train+AHD": 5, "train+AHE": 5, "train+both": 10}
    assert (table["n_train"] == 16 + table["n_generated"]).all()
    assert table[RECALLS].apply(lambda c: c.between(0, 1)).all().all()
    assert (table["weights"] == "random stand-in (numbers not comparable to papers)").all()
    assert pd.read_parquet(out / "classify.parquet").equals(table)

    # One predictions file per row, in the challenge format, named by the reference CSV, re-scorable.
    ref = pd.read_csv(real["reference"])
    files = sorted(p.name for p in (out / "predictions").iterdir())
    assert files == sorted(f"{h}_{t}.txt" for h, t in zip(table["head"], table["train_set"]))
    for row in table.itertuples():
        path = out / "predictions" / f"{row.head}_{row.train_set}.txt"
        preds = read_predictions(path)
        assert sorted(preds["filename"]) == sorted(ref["filename"])  # "x.JPG" as in the CSV, not "x.jpg"
        scores = score_files(path, real["reference"])
        for k in RECALLS:
            assert scores[k] == pytest.approx(getattr(row, k))

    doc = json.loads((out / "classify.json").read_text())
    assert doc["weights"].startswith("random stand-in") and doc["feature_dim"] == 128
    assert doc["counts"] == {"train": 16, "train_hybrids": 6, "test": 24, "generated_AHD": 5, "generated_AHE": 5}
    assert doc["skipped"] == [] and len(doc["rows"]) == 8

    # A rerun reads every feature from the cache (the stand-in is seeded, so its fingerprint holds).
    first = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert any(" 0 cached" in m for m in first)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hybrid.classify"):
        again = run_classify_stage(*args)
    rerun = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert rerun and all(", 0 to compute" in m for m in rerun)
    pd.testing.assert_frame_equal(again, table)


def test_missing_test_image_is_listed_and_max_head_without_generated(tmp_path, model_dir):
    real = make_real(tmp_path)
    index = pd.read_parquet(real["index"])
    gone = "heliconius/test/test_minor_0_03"
    index[index["sample_id"] != gone].to_parquet(real["index"], index=False)  # as if preprocess skipped it
    out = tmp_path / "metrics"
    table = run_classify_stage(real["manifest"], real["index"], None, None, real["reference"], out,
                               {**FAST, "heads": ["linear", "sgd", "max"]})
    assert list(table["head"]) == ["linear", "sgd", "max"] and set(table["train_set"]) == {"train"}
    doc = json.loads((out / "classify.json").read_text())
    assert doc["skipped"] == [{"what": "reference row", "id": "test_minor_0_03.JPG",
                               "reason": "not in the shards (see the preprocess skips)"}]
    lin, sgd, mx = (read_predictions(out / "predictions" / f"{h}_train.txt").set_index("filename")["score"]
                    for h in ("linear", "sgd", "max"))
    assert len(mx) == 23 and "test_minor_0_03.JPG" not in mx.index
    np.testing.assert_allclose(mx, np.maximum(lin, sgd.reindex(lin.index)).reindex(mx.index))


def test_reference_matching_ignores_extension_case_and_falls_back_to_the_file_stem():
    manifest = pd.DataFrame({"sample_id": ["heliconius/test/A_1_d", "heliconius/train/A_1_d", "folder/x/B_2"],
                             "image_path": ["/i/A_1_d.jpg", "/i/A_1_d.jpg", "/i/B_2.PNG"],
                             "split": ["test", "train", "test"]})
    ref = pd.DataFrame({"filename": ["A_1_d.JPG", "b_2.png", "C_3.jpg"], "hybrid_stat": [1, 0, 0],
                        "ssp_indicator": ["major", "minor", "mimic"]})
    got = match_reference(manifest, ref, "test")
    assert got["sample_id"].tolist()[:2] == ["heliconius/test/A_1_d", "folder/x/B_2"]
    assert got["sample_id"].isna().tolist() == [False, False, True]


def test_config_and_weights_errors(tmp_path, model_dir):
    with pytest.raises(ValueError, match="list both heads"):
        ClassifyStageConfig.from_dict({"heads": ["max"]})
    with pytest.raises(ValueError, match="unknown classify config key"):
        ClassifyStageConfig.from_dict({"linear_epoch": 3})
    cfg = ClassifyStageConfig.from_dict({"heads": ["sgd"], "sgd_alpha": 0.01, "model": "dinov2_small"})
    assert cfg.head.sgd_alpha == 0.01 and cfg.heads == ("sgd",)
    real = make_real(tmp_path)
    with pytest.raises(MissingWeightsError, match="dinov2-small"):
        run_classify_stage(real["manifest"], real["index"], None, None, real["reference"], tmp_path / "m",
                           {**FAST, "weights": "real", "model": "dinov2_small"})
