"""Heliconius butterflies in the HDR anomaly challenge CSV format (the demo writes the same format).

Train CSV (``butterfly_anomaly_train.csv``): hybrid_stat 'hybrid'/'non-hybrid', subspecies codes
(8.0, empty for hybrids), parent_subspecies_1/2 for hybrids, filename. Reference CSVs
(``ref_val.csv``, ``ref_test.csv``): hybrid_stat 1/0, subspecies_ref (a name, or ``"a x b"`` for a
hybrid), filename, ssp_indicator major/minor/mimic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from hybrid.data._files import FileIndex, Problems, check_unique, folder, read_csv
from hybrid.data.manifest import SPLITS, ManifestError

TRAIN_COLUMNS = ("filename", "hybrid_stat", "subspecies", "parent_subspecies_1",
                 "parent_subspecies_2")
REFERENCE_COLUMNS = ("filename", "hybrid_stat", "subspecies_ref", "ssp_indicator")
HYBRID_TYPES = {"major": "signal", "minor": "non-signal", "mimic": "mimic"}
LABELS = {"hybrid": 1, "non-hybrid": 0, "1": 1, "0": 0}
DEPTH_EXTS = (".tiff", ".tif")


def clean(value: object) -> str | None:
    """A subspecies code or name as a clean string: 8.0 -> "8", "lativitta" stays, empty -> None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _read_csv(path: str | Path, required: tuple[str, ...], what: str) -> tuple[Path, pd.DataFrame]:
    path, df = read_csv(path, required, what, nonempty=("filename", "hybrid_stat"))
    ids = df["filename"].map(lambda f: Path(f).with_suffix("").as_posix())
    check_unique(ids, path)
    df["hybrid_stat"] = [LABELS.get((clean(v) or "").lower()) for v in df["hybrid_stat"]]
    if df["hybrid_stat"].isna().any():
        bad = (df.index[df["hybrid_stat"].isna()] + 2)[:20].tolist()
        raise ManifestError(f"{path}: hybrid_stat must be hybrid/non-hybrid or 1/0; "
                            f"it is not on lines {bad}")
    return path, df.assign(stem=ids)


def _train_row(r: dict, signal: list[str]) -> dict:
    a, b, kind = None, None, None
    if r["hybrid_stat"]:
        a, b = clean(r["parent_subspecies_1"]), clean(r["parent_subspecies_2"])
        if a and b:  # parents unknown: the hybrid type stays unknown (null)
            kind = "signal" if sorted((a, b)) == signal else "non-signal"
    return {"category": "erato", "subspecies": clean(r["subspecies"]), "hybrid_type": kind,
            "parent_a": a, "parent_b": b}


def _reference_row(r: dict, path: Path) -> dict:
    ssp = str(r["ssp_indicator"]).strip().lower()
    if ssp not in HYBRID_TYPES:
        raise ManifestError(f"{path}: ssp_indicator {r['ssp_indicator']!r} of {r['filename']} is "
                            f"not one of {list(HYBRID_TYPES)}")
    name = clean(r["subspecies_ref"])
    parents = re.split(r"\s+[x×]\s+", name) if name and r["hybrid_stat"] else []
    a, b = parents if len(parents) == 2 else (None, None)
    return {"category": "melpomene" if ssp == "mimic" else "erato", "subspecies": name,
            "hybrid_type": HYBRID_TYPES[ssp] if r["hybrid_stat"] else None,
            "parent_a": a, "parent_b": b}


def read_heliconius(
    image_dir: str | Path,
    train_csv: str | Path | None = None,
    reference_csvs: Mapping[str, str | Path] | None = None,
    depth_dir: str | Path | None = None,
    missing: str = "error",
    signal_parents: tuple[str, str] = ("8", "9"),
) -> pd.DataFrame:
    """Read the HDR challenge CSVs into one manifest.

    Rows of ``train_csv`` get split "train"; ``reference_csvs`` maps a split name to a reference CSV
    (e.g. ``{"val": "ref_val.csv", "test": "ref_test.csv"}``). Images are ``image_dir/<filename>``;
    a file whose extension differs only in case (``x.jpg`` on disk for ``x.JPG``) is accepted.
    ``depth_dir/<stem>.tiff`` becomes depth_path where it exists. Train hybrids whose parents equal
    ``signal_parents`` (either order) are "signal", others "non-signal"; reference hybrids take
    their type from ssp_indicator (major signal, minor non-signal, mimic mimic).

    sample_id is ``heliconius/<split>/<filename without extension>``. One image may appear in
    several reference CSVs (the real ref_val.csv is a subset of ref_test.csv) and then has a row
    per split, so each reference set stays complete for scoring; its labels must agree. An image
    or CAMID in both the train CSV and a reference CSV is an error (training on evaluation data).
    Missing images raise (``missing="error"``) or are dropped and listed in ``df.attrs["skipped"]``.
    """
    image_dir = folder(image_dir, "image_dir")
    depth = folder(depth_dir, "depth_dir") if depth_dir is not None else None
    problems = Problems(missing, f"correct image_dir (now {image_dir}) or add the images")
    signal = sorted(clean(p) or "" for p in signal_parents)
    refs = dict(reference_csvs or {})
    if train_csv is None and not refs:
        raise ValueError("read_heliconius needs train_csv and/or reference_csvs; both are empty")
    unknown = sorted(set(refs) - set(SPLITS))
    if unknown:
        raise ValueError(f"reference_csvs keys {unknown} are not splits; use {SPLITS}")

    tables = []  # (split, csv path, table, is the train CSV)
    if train_csv is not None:
        tables.append(("train", *_read_csv(train_csv, TRAIN_COLUMNS, "HDR train CSV"), True))
    for split in (s for s in SPLITS if s in refs):
        ref = _read_csv(refs[split], REFERENCE_COLUMNS, "HDR reference CSV")
        tables.append((split, *ref, False))
    _check_overlap(tables)

    files, rows = FileIndex(), []
    for split, path, df, is_train in tables:
        for r in df.to_dict("records"):
            image = files.find(image_dir / r["filename"])
            if image is None:
                problems.add(image_dir / r["filename"], path, "missing")
                continue
            d = files.find_stem(depth, Path(r["filename"]).stem, DEPTH_EXTS) if depth else None
            fields = _train_row(r, signal) if is_train else _reference_row(r, path)
            rows.append({"sample_id": f"heliconius/{split}/{r['stem']}", "dataset": "heliconius",
                         "split": split, "label": r["hybrid_stat"], "image_path": str(image),
                         "depth_path": str(d) if d else None, **fields})
    return problems.manifest(rows, "heliconius", image_dir)


def _check_overlap(tables: list[tuple]) -> None:
    """Error where training and evaluation share an image or CAMID, or reference labels conflict."""
    train = [(p, df) for split, p, df, _ in tables if split == "train"]
    evals = [(p, df) for split, p, df, _ in tables if split != "train"]
    for (tp, tdf), (ep, edf) in ((t, e) for t in train for e in evals):
        for col in ("stem", "CAMID"):
            if col in tdf and col in edf:
                shared = sorted(set(tdf[col].dropna()) & set(edf[col].dropna()))
                if shared:
                    raise ManifestError(
                        f"{tp} (training) and {ep} (evaluation) share {len(shared)} {col} values "
                        f"{shared[:20]}; training on evaluation images inflates every score: "
                        "remove those rows from the training CSV")
    labels: dict[str, tuple[int, Path]] = {}
    for path, df in evals:
        for stem, label in zip(df["stem"], df["hybrid_stat"]):
            first_label, first_path = labels.setdefault(stem, (label, path))
            if first_label != label:
                raise ManifestError(f"{stem} is hybrid_stat {first_label} in {first_path} but "
                                    f"{label} in {path}; correct one of the CSVs")
