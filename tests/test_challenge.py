"""HDR butterfly challenge scorer: hand-worked cases (reasoning in comments) and the real ref_test."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from hybrid.cli import add_score_cli as add_cli
from hybrid.metrics.challenge import (
    PredictionsError,
    challenge_scores,
    read_predictions,
    read_reference,
    score_files,
    write_predictions,
)
from tests.conftest import shared_path


def make_case(groups: dict[tuple[str, int], list[float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference and predictions from {(ssp_indicator, hybrid_stat): [scores]}; filenames made up."""
    ref, pred = [], []
    for (ssp, label), scores in groups.items():
        for i, s in enumerate(scores):
            name = f"{ssp}_{label}_{i}.JPG"
            ref.append({"filename": name, "hybrid_stat": label, "ssp_indicator": ssp})
            pred.append({"filename": name, "score": s})
    return pd.DataFrame(pred), pd.DataFrame(ref)


def test_perfect_separation_scores_one_and_threshold_sits_at_95_percent():
    # Species A non-hybrids: 20 distinct scores 0.01..0.20 (10 major, 10 minor). The walk needs
    # >= 19/20 = 0.95 of them <= t, first reached at t = 0.19 (the 19th smallest): 19/20 is 0.95
    # exactly and qualifies (>=). The non-hybrid at 0.20 becomes a false positive; every hybrid
    # (0.8, 0.9) is > 0.19, so major = minor = 1. Mimic: 20 non-hybrids 0.21..0.40 -> t = 0.39,
    # hybrids 0.7 > t -> mimic = 1. Harmonic mean of 1, 1, 1 = 1.
    a = [round(0.01 * k, 2) for k in range(1, 21)]
    m = [round(0.2 + 0.01 * k, 2) for k in range(1, 21)]
    pred, ref = make_case({
        ("major", 0): a[::2], ("minor", 0): a[1::2], ("mimic", 0): m,
        ("major", 1): [0.9, 0.9], ("minor", 1): [0.8, 0.8], ("mimic", 1): [0.7, 0.7, 0.7],
    })
    s = challenge_scores(pred, ref)
    assert (s["major_recall"], s["minor_recall"], s["mimic_recall"], s["challenge_score"]) == (1, 1, 1, 1)
    assert s["species_a_threshold"] == 0.19 and s["species_a_non_hybrid_recall"] == 0.95
    assert s["mimic_threshold"] == 0.39


def test_ties_at_the_threshold_are_predicted_non_hybrid_and_harmonic_mean():
    # Species A: 10 non-hybrids (9 at 0.1, 1 at 0.5); 95% of 10 needs all 10 <= t, so t = 0.5
    # (at t = 0.1 recall is 0.9). Prediction is score > t (strict): the major hybrids at 0.5 tie
    # with t and count as non-hybrid -> major = 2/4 = 0.5; minor hybrids 0.6, 0.7 -> minor = 1.
    # Mimic: 10 non-hybrids at 0.2 -> t = 0.2; hybrids 0.2, 0.2, 0.2, 0.3 -> only 0.3 > t ->
    # mimic = 1/4 = 0.25. Harmonic mean of 1, 0.5, 0.25 = 3 / (1 + 2 + 4) = 3/7.
    pred, ref = make_case({
        ("major", 0): [0.1] * 5, ("minor", 0): [0.1] * 4 + [0.5],
        ("major", 1): [0.5, 0.5, 0.9, 0.9], ("minor", 1): [0.6, 0.7],
        ("mimic", 0): [0.2] * 10, ("mimic", 1): [0.2, 0.2, 0.2, 0.3],
    })
    s = challenge_scores(pred, ref)
    assert s["species_a_threshold"] == 0.5 and s["mimic_threshold"] == 0.2
    assert (s["major_recall"], s["minor_recall"], s["mimic_recall"]) == (0.5, 1.0, 0.25)
    assert s["challenge_score"] == pytest.approx(3 / 7, abs=1e-12)


def test_species_a_and_mimic_get_separate_thresholds():
    # Mimic scores all sit above Species A's: one common threshold (95% of all 20 non-hybrids)
    # would land inside the mimic range. Separately, Species A: t = 0.1 (its 10 non-hybrids all at
    # 0.1) so the major/minor hybrids at 0.2 are found; Mimic: t = 0.95, hybrids at 0.97 are found.
    pred, ref = make_case({
        ("major", 0): [0.1] * 5, ("minor", 0): [0.1] * 5, ("major", 1): [0.2], ("minor", 1): [0.2],
        ("mimic", 0): [0.95] * 10, ("mimic", 1): [0.97],
    })
    s = challenge_scores(pred, ref)
    assert (s["species_a_threshold"], s["mimic_threshold"]) == (0.1, 0.95)
    assert s["challenge_score"] == 1.0


def test_no_useful_threshold_gives_recall_zero_and_challenge_zero():
    # Species A has 10 non-hybrids (< 20), so 95% recall needs all of them <= t. One non-hybrid
    # has the top Species A score 0.99, so the first qualifying t is the maximum 0.99 and nothing
    # is > t: major = minor = 0 although the hybrids (0.9) beat the other 9 non-hybrids.
    # Mimic is perfect (1.0) but the harmonic mean is 0 when any recall is 0.
    pred, ref = make_case({
        ("major", 0): [0.1] * 5, ("minor", 0): [0.1] * 4 + [0.99],
        ("major", 1): [0.9, 0.9], ("minor", 1): [0.9],
        ("mimic", 0): [0.1] * 10, ("mimic", 1): [0.9],
    })
    s = challenge_scores(pred, ref)
    assert s["species_a_threshold"] == 0.99
    assert (s["major_recall"], s["minor_recall"], s["mimic_recall"]) == (0.0, 0.0, 1.0)
    assert s["challenge_score"] == 0.0


def test_all_equal_scores_and_a_group_without_non_hybrids():
    # All scores 0.5: the only candidate is t = 0.5 (recall of non-hybrids 1) and 0.5 > 0.5 is
    # false, so every recall is 0. In the mimic group there are no non-hybrids: non-hybrid recall
    # is 0 for every t, the walk runs to the maximum, and again nothing is predicted hybrid.
    pred, ref = make_case({
        ("major", 0): [0.5] * 3, ("minor", 0): [0.5] * 3, ("major", 1): [0.5], ("minor", 1): [0.5],
        ("mimic", 1): [0.2, 0.8],
    })
    s = challenge_scores(pred, ref)
    assert s["species_a_threshold"] == 0.5
    assert s["mimic_threshold"] == 0.8 and s["mimic_non_hybrid_recall"] == 0.0
    assert (s["major_recall"], s["minor_recall"], s["mimic_recall"], s["challenge_score"]) == (0, 0, 0, 0)


def test_rounding_to_four_decimals_creates_ties():
    # Species A non-hybrids: 9 at 0.1 and one at 0.29996 -> t must be >= every non-hybrid.
    # Unrounded, t = 0.29996 and the major hybrid at 0.30003 is > t (found): major = 2/2.
    # The ingestion program rounds to 4 decimals: 0.29996 -> 0.3 and 0.30003 -> 0.3, so t = 0.3
    # and the hybrid ties with it (not > t): major = 1/2. Minor and mimic are perfect.
    pred, ref = make_case({
        ("major", 0): [0.1] * 5, ("minor", 0): [0.1] * 4 + [0.29996],
        ("major", 1): [0.30003, 0.9], ("minor", 1): [0.9],
        ("mimic", 0): [0.1] * 10, ("mimic", 1): [0.9],
    })
    s = challenge_scores(pred, ref)
    assert s["species_a_threshold"] == 0.3
    assert s["major_recall"] == 0.5 and s["minor_recall"] == 1.0 and s["mimic_recall"] == 1.0
    # Harmonic mean of 0.5, 1, 1 = 3 / (2 + 1 + 1) = 0.75.
    assert s["challenge_score"] == pytest.approx(0.75)


def test_missing_predictions_are_listed_and_extra_ones_ignored():
    pred, ref = make_case({
        ("major", 0): [0.1] * 10, ("minor", 0): [0.1] * 10, ("major", 1): [0.9], ("minor", 1): [0.3],
        ("mimic", 0): [0.1] * 20, ("mimic", 1): [0.9],
    })
    base = challenge_scores(pred, ref)
    # Extra rows are dropped by the inner join: a score between the groups' values that would
    # otherwise be a candidate threshold changes nothing.
    extra = pd.DataFrame({"filename": ["other1.JPG", "other2.JPG"], "score": [0.2, 0.95]})
    assert challenge_scores(pd.concat([pred, extra], ignore_index=True), ref) == base
    missing = r"2 of 43 reference images have no prediction: major_0_3\.JPG, minor_1_0\.JPG"
    with pytest.raises(PredictionsError, match=missing):
        challenge_scores(pred[~pred.filename.isin(["major_0_3.JPG", "minor_1_0.JPG"])], ref)


def test_read_write_predictions_round_trip_and_errors(tmp_path):
    p = tmp_path / "predictions.txt"
    write_predictions(p, ["a.JPG", "b.JPG"], [0.123456, 1 / 3])
    assert p.read_text() == "a.JPG,0.1235\nb.JPG,0.3333\n"
    df = read_predictions(p)
    assert df.filename.tolist() == ["a.JPG", "b.JPG"] and df.score.tolist() == [0.1235, 0.3333]

    # The challenge's own files have no trailing newline; blank lines are tolerated.
    p.write_text("a.JPG,0.5\n\nb.JPG,1")
    assert read_predictions(p).score.tolist() == [0.5, 1.0]

    for text, line, what in [
        ("filename,score\na.JPG,0.1", 1, "not a number"),
        ("a.JPG,0.1\nb.JPG,0.2,0.3", 2, "expected 'filename,score'"),
        ("a.JPG,0.1\nb.JPG", 2, "expected 'filename,score'"),
        ("a.JPG,0.1\nb.JPG,nan", 2, "not finite"),
        ("a.JPG,0.1\nb.JPG,0.2\na.JPG,0.3", 3, "already given on line 1"),
    ]:
        p.write_text(text)
        with pytest.raises(PredictionsError, match=rf"predictions\.txt, line {line}: .*{what}"):
            read_predictions(p)


def test_score_files_and_cli_print_json(tmp_path, capsys):
    pred, ref = make_case({
        ("major", 0): [0.1] * 10, ("minor", 0): [0.1] * 10, ("major", 1): [0.9, 0.05],
        ("minor", 1): [0.9], ("mimic", 0): [0.1] * 20, ("mimic", 1): [0.9],
    })
    # major = 1/2 (0.05 < t = 0.1), minor = mimic = 1 -> harmonic mean 3 / (2 + 1 + 1) = 0.75.
    ref.to_csv(tmp_path / "ref.csv", index=False)
    write_predictions(tmp_path / "p.txt", pred.filename, pred.score)
    assert score_files(tmp_path / "p.txt", tmp_path / "ref.csv")["challenge_score"] == pytest.approx(0.75)

    parser = argparse.ArgumentParser(prog="hybrid")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["score", "--predictions", str(tmp_path / "p.txt"),
                              "--reference", str(tmp_path / "ref.csv")])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["major_recall"] == 0.5 and out["challenge_score"] == pytest.approx(0.75)
    assert {"minor_recall", "mimic_recall"} <= set(out)


def test_real_ref_test_group_sizes():
    ref = read_reference(shared_path("reference", "heliconius", "ref_test.csv"))
    rng = np.random.default_rng(0)
    # Non-hybrids get distinct scores (k / 10^4 stay distinct after rounding); within each group,
    # the first k hybrids score 1.0 (above every non-hybrid) and the rest 0.0 (below all).
    score = np.zeros(len(ref))
    non = (ref.hybrid_stat == 0).to_numpy()
    score[non] = rng.permutation(np.arange(1, non.sum() + 1)) / 10_000
    found = {"major": 73, "minor": 7, "mimic": 62}
    for ssp, k in found.items():
        idx = np.flatnonzero(((ref.ssp_indicator == ssp) & (ref.hybrid_stat == 1)).to_numpy())
        score[idx[:k]] = 1.0
    s = challenge_scores(pd.DataFrame({"filename": ref.filename, "score": score}), ref)

    # Facts: major 455/365, minor 407/28, mimic 847/248 (non-hybrid/hybrid).
    assert (s["n_major_non_hybrids"], s["n_major_hybrids"]) == (455, 365)
    assert (s["n_minor_non_hybrids"], s["n_minor_hybrids"]) == (407, 28)
    assert (s["n_mimic_non_hybrids"], s["n_mimic_hybrids"]) == (847, 248)
    # Recalls are over each indicator's own hybrids: 73/365 = 0.2, 7/28 = 0.25, 62/248 = 0.25.
    assert (s["major_recall"], s["minor_recall"], s["mimic_recall"]) == (0.2, 0.25, 0.25)
    assert s["challenge_score"] == pytest.approx(3 / (5 + 4 + 4))
    # Species A pools major + minor non-hybrids (862): the first t keeps ceil(0.95 * 862) = 819 of
    # them at or below it (818/862 = 0.9490 < 0.95); Mimic alone: ceil(0.95 * 847) = 805.
    assert s["species_a_non_hybrid_recall"] == 819 / 862
    assert s["mimic_non_hybrid_recall"] == 805 / 847
    a_non = np.sort(score[non & (ref.ssp_indicator != "mimic").to_numpy()])
    assert s["species_a_threshold"] == a_non[818]
