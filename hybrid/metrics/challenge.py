"""The HDR butterfly hybrid challenge score, computed as the challenge's scoring program does.

Rules (Imageomics/HDR-anomaly-challenge, ``ingestion_program/ingestion.py`` and
``scoring_program/score_combined.py``):

- ``predictions.txt`` has no header, one ``filename,score`` per line; higher = more likely hybrid.
  The ingestion program writes ``round(score, 4)``, so scores are rounded to 4 decimals here too.
- Predictions are inner-joined with the reference on ``filename``; every reference row must have
  a prediction; extra predictions are ignored.
- Species A (``ssp_indicator != "mimic"``) and Mimic (``== "mimic"``) get separate thresholds:
  walk the distinct scores ``t`` in ascending order, predict hybrid where ``score > t`` and stop at
  the first ``t`` whose non-hybrid recall is >= 0.95. The largest score always qualifies (all
  rows predicted 0, non-hybrid recall 1), unless the group has no non-hybrids: then nothing
  qualifies and the walk ends at the largest score anyway, again predicting 0 everywhere.
- major / minor recall = hybrid recall on the Species A rows with that indicator; mimic recall =
  hybrid recall on the Mimic rows; a recall with no hybrids is 0 (sklearn's ``zero_division``).
- ``challenge_score = statistics.harmonic_mean([major, minor, mimic])`` (0 if any is 0).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid.io import atomic_path

NON_HYBRID_RECALL = 0.95
DECIMALS = 4
SSP_VALUES = ("major", "minor", "mimic")


class PredictionsError(ValueError):
    """A predictions file or table that the challenge scorer would not accept."""


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a challenge ``predictions.txt`` (no header, ``filename,score``) into (filename, score).

    Blank lines are skipped; any other malformed line, a non-finite score or a repeated filename
    raises :class:`PredictionsError` naming the file and line.
    """
    path = Path(path)
    names: list[str] = []
    scores: list[float] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            fields = line.split(",")
            if len(fields) != 2 or not fields[0]:
                raise PredictionsError(
                    f"{where}: expected 'filename,score' (no header, one per line), got {line!r}"
                )
            name, text = fields
            try:
                score = float(text)
            except ValueError:
                raise PredictionsError(
                    f"{where}: score {text!r} is not a number (the file has no header line)"
                ) from None
            if not np.isfinite(score):
                raise PredictionsError(f"{where}: score {text!r} is not finite")
            if name in first_line:
                raise PredictionsError(
                    f"{where}: filename {name!r} already given on line {first_line[name]}; "
                    "give one score per image"
                )
            first_line[name] = lineno
            names.append(name)
            scores.append(score)
    return pd.DataFrame({"filename": pd.Series(names, dtype=object), "score": np.asarray(scores, np.float64)})


def write_predictions(path: str | Path, filenames: Sequence[str], scores: Sequence[float]) -> None:
    """Write ``filename,score`` lines atomically, scores rounded to 4 decimals as the ingestion does."""
    filenames = [str(n) for n in filenames]
    values = np.round(np.asarray(scores, dtype=np.float64).reshape(-1), DECIMALS)
    if len(filenames) != len(values):
        raise ValueError(f"{path}: {len(filenames)} filenames but {len(values)} scores")
    bad = [n for n in filenames if "," in n or "\n" in n or not n]
    if bad:
        raise ValueError(f"{path}: filenames must be non-empty without commas or newlines: {bad[:5]}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: scores must be finite")
    text = "".join(f"{n},{float(v)!r}\n" for n, v in zip(filenames, values))
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_reference(path: str | Path) -> pd.DataFrame:
    """Read a challenge reference CSV (``ref_val.csv`` / ``ref_test.csv``)."""
    df = pd.read_csv(path, dtype={"filename": str, "ssp_indicator": str})
    return _check_reference(df, str(path))


def _check_reference(df: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = {"filename", "hybrid_stat", "ssp_indicator"} - set(df.columns)
    if missing:
        raise PredictionsError(f"reference {name}: missing columns {sorted(missing)}")
    unknown = sorted(set(df["ssp_indicator"].astype(str)) - set(SSP_VALUES))
    if unknown:
        raise PredictionsError(f"reference {name}: ssp_indicator must be one of {SSP_VALUES}, got {unknown}")
    if not set(pd.unique(df["hybrid_stat"])) <= {0, 1}:
        raise PredictionsError(f"reference {name}: hybrid_stat must be 0 or 1")
    dup = df["filename"][df["filename"].duplicated()].tolist()
    if dup:
        raise PredictionsError(f"reference {name}: repeated filenames {dup[:5]}")
    return df


def _threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The challenge threshold of one group: (t, non-hybrid recall at t); predict hybrid if score > t."""
    if len(scores) == 0:
        raise PredictionsError("a scoring group (Species A or Mimic) has no rows")
    candidates = np.unique(scores)  # ascending distinct scores
    negatives = np.sort(scores[labels == 0])
    n0 = len(negatives)
    if n0 == 0:  # sklearn's recall is 0 for every t: the walk runs to the end
        return float(candidates[-1]), 0.0
    recall = np.searchsorted(negatives, candidates, side="right") / n0  # non-hybrids with score <= t
    i = int(np.argmax(recall >= NON_HYBRID_RECALL))  # the largest candidate always has recall 1
    return float(candidates[i]), float(recall[i])


def _hybrid_recall(pred: np.ndarray, labels: np.ndarray) -> float:
    n1 = int((labels == 1).sum())
    return float((pred[labels == 1] == 1).sum() / n1) if n1 else 0.0


def challenge_scores(predictions: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """Challenge recalls, harmonic mean and thresholds for ``predictions`` (filename, score)."""
    reference = _check_reference(reference, "table")
    if not {"filename", "score"} <= set(predictions.columns):
        raise PredictionsError("predictions need columns 'filename' and 'score'")
    dup = predictions["filename"][predictions["filename"].duplicated()].tolist()
    if dup:
        raise PredictionsError(f"predictions repeat filenames {dup[:5]}; give one score per image")
    missing = sorted(set(reference["filename"]) - set(predictions["filename"]))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise PredictionsError(
            f"{len(missing)} of {len(reference)} reference images have no prediction: {shown}"
        )
    df = reference.merge(predictions[["filename", "score"]], on="filename", how="inner")
    score = np.round(df["score"].to_numpy(np.float64), DECIMALS)
    if not np.all(np.isfinite(score)):
        raise PredictionsError("predictions contain non-finite scores")
    label = df["hybrid_stat"].to_numpy(np.int64)
    ssp = df["ssp_indicator"].astype(str).to_numpy()

    out: dict = {}
    pred = np.zeros(len(df), dtype=np.int64)
    for group, rows in (("species_a", ssp != "mimic"), ("mimic", ssp == "mimic")):
        t, r = _threshold(score[rows], label[rows])
        pred[rows] = score[rows] > t
        out[f"{group}_threshold"] = t
        out[f"{group}_non_hybrid_recall"] = r
    for name in SSP_VALUES:
        rows = ssp == name
        out[f"{name}_recall"] = _hybrid_recall(pred[rows], label[rows])
        out[f"n_{name}_hybrids"] = int((label[rows] == 1).sum())
        out[f"n_{name}_non_hybrids"] = int((label[rows] == 0).sum())
    out["challenge_score"] = float(
        statistics.harmonic_mean([out["major_recall"], out["minor_recall"], out["mimic_recall"]])
    )
    return out


def score_files(predictions_path: str | Path, reference_csv: str | Path) -> dict:
    """:func:`challenge_scores` of a ``predictions.txt`` against a reference CSV."""
    predictions, reference = read_predictions(predictions_path), read_reference(reference_csv)
    try:
        return challenge_scores(predictions, reference)
    except PredictionsError as e:
        raise PredictionsError(f"{predictions_path} vs {reference_csv}: {e}") from None
