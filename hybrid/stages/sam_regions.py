"""The sam_regions rule: SAM's candidate region maps of every preprocessed image, for Flare's
semantic regions (AnomalyFactory paper 002, Sec. 3.3; the selection rules are in
:mod:`hybrid.regions`). Without SAM weights it writes a fallback file when allowed, else says
which weights to fetch."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from hybrid.config import resolve_device
from hybrid.regions import FETCH_HINT, RegionConfig, candidate_maps, load_sam, write_regions

log = logging.getLogger(__name__)


def run(index: str | Path, out: str | Path, cfg: RegionConfig | Mapping | None = None,
        fallback: bool = False, paths: Mapping[str, str] | None = None, threads: int = 1) -> dict:
    """Candidate maps of every image in the preprocess shards -> ``out`` (see the module doc).

    Without SAM weights: with ``fallback`` a file with ``status: fallback`` (no maps; Flare then draws
    stochastic regions only and says so), else an error naming the store entry and how to get it.
    """
    from hybrid.models import store

    cfg = cfg if isinstance(cfg, RegionConfig) else RegionConfig.from_dict(cfg)
    torch.set_num_threads(max(1, threads))
    index = Path(index)
    idx = pd.read_parquet(index)
    settings = json.dumps(asdict(cfg), sort_keys=True)
    explicit = (paths or {}).get(cfg.model)
    try:
        source = explicit or (cfg.model if Path(cfg.model).is_dir() else str(store.locate(cfg.model)))
    except (store.MissingWeightsError, KeyError) as e:
        spec = store.REGISTRY.get(cfg.model)
        hint = FETCH_HINT.format(name=cfg.model, hub=spec.hub_id if spec else "facebook/sam-vit-base",
                                 folder=spec.filename if spec else "sam-vit-base")
        if not fallback:
            raise ValueError(f"semantic regions (anomalyfactory.flare.region_mix > 0) need the SAM weights of model-"
                             f"store entry {cfg.model!r}, which are not here: {hint}. Or set "
                             "anomalyfactory.flare.semantic_fallback: true to train with stochastic regions only, "
                             f"or region_mix: 0. ({e})") from e
        note = (f"SAM weights {cfg.model!r} not found; semantic_fallback: true, so Flare uses stochastic regions "
                f"only. To get semantic regions, {hint}")
        log.warning("sam_regions: %s", note)
        write_regions(out, np.zeros((0, 1, 1), np.uint8), [], {"status": "fallback", "note": note,
                                                               "model": cfg.model, "settings": settings})
        return {"status": "fallback", "note": note, "n": 0}
    device = resolve_device(cfg.device)
    model = load_sam(source, device)
    log.info("sam_regions: %s on %s; %d images from %s", source, device, len(idx), index.parent)
    labels, ids, counts = [], [], []
    for shard, g in idx.groupby("shard", sort=True):
        g = g.sort_values("index")
        with h5py.File(index.parent / str(shard), "r") as f:
            images = f["image"][g["index"].to_numpy()]
        maps = candidate_maps(model, images, cfg)
        labels.append(maps)
        ids += g["sample_id"].astype(str).tolist()
        counts += [int(len(np.unique(m)) - (m == 0).any()) for m in maps]
        log.info("sam_regions: %s: %d images, %.1f candidates each on average", shard, len(g),
                 np.mean(counts[-len(g):]))
    labels = np.concatenate(labels) if labels else np.zeros((0, 1, 1), np.uint8)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    write_regions(out, labels, ids, {"status": "sam", "note": "", "model": str(source), "settings": settings,
                                     "settings_hash": digest})
    empty = int(sum(c == 0 for c in counts))
    if empty:
        log.warning("sam_regions: %d of %d images have no candidate region; Flare draws stochastic regions for "
                    "them", empty, len(counts))
    return {"status": "sam", "n": len(ids), "mean_candidates": float(np.mean(counts)) if counts else 0.0,
            "no_candidates": empty}
