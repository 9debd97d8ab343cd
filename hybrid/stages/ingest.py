"""The ingest stage: one dataset layout, or several, -> one validated manifest (parquet) and a skip list.

Several datasets (``dataset`` as a list, AnomalyFactory's one model over five datasets) are read
one by one, each with its own reader options and its own protocol split, and merged: the manifest's
``dataset`` column is each entry's ``name`` (default its layout). Sample ids must be unique across
the datasets, so in a list every id that does not already start with ``<name>/`` gets that prefix
(the readers' ids start with their layout: a list entry named after its layout keeps the ids it
has alone, a second ``mvtec_ad`` entry named ``mvtec_ad_b`` gets ``mvtec_ad_b/mvtec_ad/...``). The
prefix depends on the entry only, not on the other entries, so adding a dataset to the list changes
no existing id. The single mapping keeps the reader's ids as they are.

The skip list (results/ingest_skipped.csv) has one row per image a reader dropped (path, source,
reason, and its category and defect where the layout knows them) and one per defect type the
industrial protocol left out (source ``ingest.protocol``, category, defect, count, reason); its
``dataset`` column names the entry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from hybrid.data.manifest import ManifestError, validate_manifest
from hybrid.data.protocol import LAYOUTS as PROTOCOL_LAYOUTS
from hybrid.data.protocol import ProtocolConfig, assign_protocol, summary
from hybrid.data.readers import read_dataset
from hybrid.io import atomic_path, write_parquet_atomic

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["path", "source", "reason", "category", "defect", "count", "dataset"]


def ingest(layout: str, options: dict, missing: str, manifest_path: str | Path,
           skipped_path: str | Path, protocol: dict | ProtocolConfig | None = None) -> pd.DataFrame:
    """Read ``layout`` with ``options``, mark the protocol split (``ingest.protocol``; layouts
    with defect types only) and write the manifest and the skip list."""
    return run({"layout": layout, "options": options}, missing, manifest_path, skipped_path, protocol)


def run(datasets: dict | list[dict], missing: str, manifest_path: str | Path,
        skipped_path: str | Path, protocol: dict | ProtocolConfig | None = None) -> pd.DataFrame:
    """``datasets``: the config's ``dataset`` (one ``{layout, options, name?}`` mapping, or a list of
    them). Each is read and protocol-split on its own, then merged (see the module doc)."""
    cfg = protocol if isinstance(protocol, ProtocolConfig) else ProtocolConfig.from_dict(protocol)
    is_list = isinstance(datasets, list)
    entries = [{"name": str(e.get("name") or e["layout"]), "layout": e["layout"],
                "options": dict(e.get("options") or {})} for e in (datasets if is_list else [datasets])]
    names = [e["name"] for e in entries]
    if len(set(names)) < len(names):
        raise ValueError(f"dataset names {sorted({n for n in names if names.count(n) > 1})} repeat; give each entry "
                         "of the dataset list its own name")
    frames, records = [], []
    for e in entries:
        df, recs = _read_one(e, missing, cfg, is_list, manifest_path)
        frames.append(df)
        records += recs
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    try:
        df = validate_manifest(df, manifest_path)
    except ManifestError as err:
        raise ManifestError(f"{err} (merging the datasets {names})") from err
    skipped = pd.DataFrame(records, columns=SKIPPED_COLUMNS).astype({"count": "Int64"})
    with atomic_path(skipped_path) as tmp:
        skipped.to_csv(tmp, index=False)
    write_parquet_atomic(df, manifest_path)
    counts = df.groupby(["split", "label"], dropna=False).size().to_dict()
    what = ", ".join(f"{e['name']} ({e['layout']})" if e["name"] != e["layout"] else e["name"] for e in entries)
    log.info("ingest %s: %d images (split, label -> count: %s); %d skipped", what, len(df), counts, len(skipped))
    if len(entries) > 1:
        for name, n in df.groupby("dataset", sort=False).size().items():
            log.info("ingest: dataset %s: %d images in %d categories", name, n,
                     df.loc[df["dataset"] == name, "category"].nunique())
    return df


def _read_one(entry: dict, missing: str, cfg: ProtocolConfig, prefix: bool,
              manifest_path: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """One dataset entry read, named, (in a list) id-prefixed and protocol-split, with its skip records."""
    layout, name = entry["layout"], entry["name"]
    df = read_dataset(layout, {**entry["options"], "missing": missing})
    records = list(df.attrs.get("skipped", []))
    for r in records:
        log.warning("skipped %s (%s, from %s)", r["path"], r["reason"], r["source"])
    df.attrs = {}
    df["dataset"] = pd.Series(name, index=df.index, dtype="string")
    if prefix:
        ids = df["sample_id"].astype(str)
        df["sample_id"] = ids.where(ids.str.startswith(f"{name}/"), f"{name}/" + ids).astype("string")
    if layout in PROTOCOL_LAYOUTS:
        df, bad = assign_protocol(df, cfg, records)
        records += bad
        df = validate_manifest(df, manifest_path)
        split = summary(df)
        label = "" if name == layout else f" {name}:"
        if len(split):
            log.info("protocol%s (%s of each defect type's test anomalies are base, %s, order %s): %d base, %d eval "
                     "over %d defect types", label, f"{cfg.fraction:g}", cfg.rounding, cfg.order,
                     int(split["base"].sum()), int(split["eval"].sum()), len(split))
            for r in split.itertuples(index=False):
                log.info("protocol%s %s/%s: %d base, %d eval", label, r.category, r.defect, r.base, r.eval)
        elif cfg.enabled:
            log.info("protocol%s: no test anomaly could be split (%d defect types skipped)", label, len(bad))
    return df, [{**r, "dataset": name} for r in records]
