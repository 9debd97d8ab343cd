"""The ingest stage: a dataset layout -> one validated manifest (parquet) and a skip list.

The skip list (results/ingest_skipped.csv) has one row per image a reader dropped (path, source,
reason, and its category and defect where the layout knows them) and one per defect type the
industrial protocol left out (source ``ingest.protocol``, category, defect, count, reason).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from hybrid.data.manifest import validate_manifest
from hybrid.data.protocol import LAYOUTS as PROTOCOL_LAYOUTS
from hybrid.data.protocol import ProtocolConfig, assign_protocol, summary
from hybrid.data.readers import read_dataset
from hybrid.io import atomic_path, write_parquet_atomic

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["path", "source", "reason", "category", "defect", "count"]


def ingest(layout: str, options: dict, missing: str, manifest_path: str | Path,
           skipped_path: str | Path, protocol: dict | ProtocolConfig | None = None) -> pd.DataFrame:
    """Read ``layout`` with ``options``, mark the protocol split (``ingest.protocol``; layouts
    with defect types only) and write the manifest and the skip list."""
    cfg = protocol if isinstance(protocol, ProtocolConfig) else ProtocolConfig.from_dict(protocol)
    df = read_dataset(layout, {**options, "missing": missing})
    records = list(df.attrs.get("skipped", []))
    for r in records:
        log.warning("skipped %s (%s, from %s)", r["path"], r["reason"], r["source"])
    df.attrs = {}
    if layout in PROTOCOL_LAYOUTS:
        df, bad = assign_protocol(df, cfg, records)
        records += bad
        df = validate_manifest(df, manifest_path)
        split = summary(df)
        if len(split):
            log.info("protocol (%s of each defect type's test anomalies are base, %s, order %s): %d base, %d eval "
                     "over %d defect types", f"{cfg.fraction:g}", cfg.rounding, cfg.order, int(split["base"].sum()),
                     int(split["eval"].sum()), len(split))
            for r in split.itertuples(index=False):
                log.info("protocol %s/%s: %d base, %d eval", r.category, r.defect, r.base, r.eval)
        elif cfg.enabled:
            log.info("protocol: no test anomaly could be split (%d defect types skipped)", len(bad))
    skipped = pd.DataFrame(records, columns=SKIPPED_COLUMNS).astype({"count": "Int64"})
    with atomic_path(skipped_path) as tmp:
        skipped.to_csv(tmp, index=False)
    write_parquet_atomic(df, manifest_path)
    counts = df.groupby(["split", "label"], dropna=False).size().to_dict()
    log.info("ingest %s: %d images (split, label -> count: %s); %d skipped", layout, len(df), counts, len(skipped))
    return df
