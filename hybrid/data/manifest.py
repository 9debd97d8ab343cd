"""The manifest contract: one row per image, the same columns for every dataset layout.

Every reader returns a DataFrame that passes :func:`validate_manifest`; the ingest stage writes it
as parquet. Columns that a layout does not know are null, never invented.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# column -> pandas dtype. Strings are pandas' nullable "string", integers nullable "Int8".
MANIFEST_COLUMNS: dict[str, str] = {
    "sample_id": "string",  # unique and stable across re-ingests of the same data
    "dataset": "string",  # heliconius, mvtec_ad, mvtec_3d, mvtec_loco, visa, folder, demo
    "category": "string",  # object category (MVTec/VisA) or species group (butterflies)
    "split": "string",  # train, val, test
    "label": "Int8",  # 0 normal, 1 anomaly or hybrid
    "defect": "string",  # defect type for industrial data ("good" for normal test images)
    "hybrid_type": "string",  # signal, non-signal, mimic (butterfly hybrids only)
    "subspecies": "string",  # butterfly subspecies (name or code)
    "parent_a": "string",  # hybrid parents (butterflies)
    "parent_b": "string",
    "image_path": "string",  # absolute path
    "mask_path": "string",  # absolute path of the ground-truth mask, if any
    "depth_path": "string",  # absolute path of sensor depth (xyz tiff or z tiff), if any
    # The industrial protocol (hybrid.data.protocol): "base" (generation base, the first third of
    # each defect type's test anomalies) or "eval" (held out for testing); null on every other row.
    "protocol": "string",
}
# Columns added after manifests were first written: a manifest without one reads it as null.
LATER_COLUMNS = ("protocol",)
PROTOCOL_VALUES = ("base", "eval")

SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest (or the data behind it) breaks the contract; the message says what to do."""


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def make_manifest(rows: list[dict], source: str | Path) -> pd.DataFrame:
    """Build a validated manifest from row dicts; missing columns become null."""
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)) if rows else empty_manifest()
    df = df.astype(MANIFEST_COLUMNS)
    return validate_manifest(df, source)


def validate_manifest(df: pd.DataFrame, source: str | Path = "manifest") -> pd.DataFrame:
    """Check columns, dtypes, unique ids and allowed values; return the frame in column order."""
    for c in LATER_COLUMNS:
        if c not in df.columns:
            df = df.assign(**{c: pd.Series(pd.NA, index=df.index, dtype=MANIFEST_COLUMNS[c])})
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: manifest lacks columns {missing}")
    df = df[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    if df["sample_id"].isna().any():
        raise ManifestError(f"{source}: {int(df['sample_id'].isna().sum())} rows have no sample_id")
    dup = df["sample_id"][df["sample_id"].duplicated(keep=False)]
    if len(dup):
        shown = sorted(set(dup))[:10]
        raise ManifestError(
            f"{source}: duplicate sample_id values {shown} ({len(set(dup))} in all); "
            "each image must appear once: remove the repeated rows or give them distinct ids"
        )
    bad_split = sorted(set(df["split"].dropna()) - set(SPLITS))
    if bad_split:
        raise ManifestError(f"{source}: unknown split values {bad_split}; expected one of {SPLITS}")
    bad_protocol = sorted(set(df["protocol"].dropna()) - set(PROTOCOL_VALUES))
    if bad_protocol:
        raise ManifestError(f"{source}: unknown protocol values {bad_protocol}; "
                            f"expected {PROTOCOL_VALUES} or null")
    stray = df["protocol"].notna() & ~((df["split"] == "test") & (df["label"] == 1)).fillna(False)
    if stray.any():
        raise ManifestError(f"{source}: {int(stray.sum())} rows that are not test anomalies have a protocol value "
                            f"(e.g. {df.loc[stray, 'sample_id'].iloc[0]}); only split test, label 1 rows are base "
                            "or eval")
    if df["label"].isna().any() or not df["label"].isin([0, 1]).all():
        raise ManifestError(f"{source}: label must be 0 (normal) or 1 (anomaly/hybrid) on every row")
    if df["image_path"].isna().any():
        raise ManifestError(f"{source}: {int(df['image_path'].isna().sum())} rows have no image_path")
    return df.reset_index(drop=True)


def matches(rows: pd.DataFrame, filters: dict, where: str = "filter") -> pd.Series:
    """Rows whose columns equal the filter values (a value or a list; compared as text, so the
    YAML ``8`` and the manifest's ``"8"`` agree)."""
    keep = pd.Series(True, index=rows.index)
    for col, want in filters.items():
        if col not in rows.columns:
            raise ValueError(f"{where}: {col!r} is not a manifest column; use one of {list(rows.columns)}")
        values = want if isinstance(want, (list, tuple)) else [want]
        keep &= rows[col].astype("string").isin([str(v) for v in values]).fillna(False).astype(bool)
    return keep


def read_manifest(path: str | Path) -> pd.DataFrame:
    return validate_manifest(pd.read_parquet(path), path)


def distinct_categories(rows: pd.DataFrame) -> pd.Series:
    """The ``category`` column as strings, with a name that several datasets of a merged manifest
    share written ``<dataset> / <category>`` (so per-category results never mix datasets); every
    other name is kept as it is."""
    category = rows["category"].astype(str)
    if "dataset" not in rows.columns:
        return category
    dataset = rows["dataset"].astype(str)
    shared = dataset.groupby(category).nunique()
    clash = category.isin(shared[shared > 1].index)
    return category.where(~clash, dataset + " / " + category)
