"""The ingest stage: a dataset layout -> one validated manifest (parquet) and a skip list."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from hybrid.data.readers import read_dataset
from hybrid.io import atomic_path, write_parquet_atomic

log = logging.getLogger(__name__)


def ingest(layout: str, options: dict, missing: str, manifest_path: str | Path,
           skipped_path: str | Path) -> pd.DataFrame:
    df = read_dataset(layout, {**options, "missing": missing})
    skipped = pd.DataFrame(df.attrs.get("skipped", []), columns=["path", "source", "reason"])
    for r in skipped.itertuples(index=False):
        log.warning("skipped %s (%s, from %s)", r.path, r.reason, r.source)
    df.attrs = {}
    with atomic_path(skipped_path) as tmp:
        skipped.to_csv(tmp, index=False)
    write_parquet_atomic(df, manifest_path)
    counts = df.groupby(["split", "label"], dropna=False).size().to_dict()
    log.info("ingest %s: %d images (split, label -> count: %s); %d skipped", layout, len(df), counts, len(skipped))
    return df
