"""The classify stage: butterfly hybrid detection with and without generated hybrids (paper 003, Table 6).

Data plumbing around :mod:`hybrid.classify`: DINOv2 features of the real training set, the test
set (the rows of the reference CSV) and the generated global hybrids of each decoder, all read from
the shards at the working resolution (the classifier's preprocessing resizes to 224); features are
cached per image under ``<out_dir>/features/`` keyed by sample id and a hash of the pixels, so a
changed image is recomputed. Every head is trained on ``train``, ``train+AHD``, ``train+AHE`` and
``train+both`` and scored with the HDR challenge rule; ``max`` is Table 6's Max(Linear, SGD), the
larger of the two heads' scores.

Weights (``weights``): ``real`` loads the configured DINOv2 through the model store and fails with
its message when missing; ``random`` uses a small seeded random DINOv2 stand-in; ``auto`` takes the
real model when the store finds it, else the stand-in with a warning. The outputs say which.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from hybrid.classify import (
    HEADS,
    FeatureCache,
    HeadConfig,
    extract_features,
    load_dinov2,
    model_fingerprint,
    run_classification,
)
from hybrid.config import WEIGHT_MODES, check_choices, check_device, choice, resolve_device
from hybrid.data.manifest import read_manifest
from hybrid.data.shards import ShardDataset
from hybrid.io import write_json_atomic, write_parquet_atomic
from hybrid.metrics.challenge import challenge_scores, read_predictions, read_reference, write_predictions
from hybrid.models import store
from hybrid.models.generator import DECODERS

if TYPE_CHECKING:
    from transformers import Dinov2Model

log = logging.getLogger(__name__)

STAND_IN = "random stand-in (numbers not comparable to papers)"
SPLITS = ("val", "test")  # the Heliconius reference CSVs (ref_val.csv, ref_test.csv)
CHUNK = 256  # images read and featurised at a time (memory stays flat)
RESULT_COLUMNS = ["head", "train_set", "n_train", "n_generated", "major_recall", "minor_recall", "mimic_recall",
                  "challenge_score", "species_a_threshold", "mimic_threshold", "weights"]


@dataclass(frozen=True)
class ClassifyStageConfig:
    """The ``classify`` config section: stage keys here, head hyper-parameters in ``head``."""

    weights: str = choice(WEIGHT_MODES, "auto")
    model: str = "dinov2_base"  # a model-store name (dinov2_small/base/large/giant) or a directory
    device: str = "auto"
    batch_size: int = 32
    seed: int = 0
    heads: tuple[str, ...] = choice((*HEADS, "max"), ("linear", "sgd"))  # add "max" for Max(Linear, SGD)
    split: str = choice(SPLITS, "test")  # the manifest split the reference CSV describes
    head: HeadConfig = HeadConfig()
    paths: Mapping[str, str] = field(default_factory=dict)  # store name -> explicit weights

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(self.heads))
        unknown = sorted(set(self.heads) - {*HEADS, "max"})
        if unknown or not self.heads:
            raise ValueError(f"classify.heads {list(self.heads)}: choose from {[*HEADS, 'max']}")
        check_choices(self, "classify")
        check_device(self.device, "classify.device")
        if "max" in self.heads and not set(HEADS) <= set(self.heads):
            raise ValueError("classify.heads: 'max' is the larger of the linear and sgd scores; list both heads too")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> ClassifyStageConfig:
        """From the flat config section: stage keys, the rest are :class:`HeadConfig` fields."""
        d = dict(d or {})
        stage = {f.name for f in fields(cls)} - {"head"}
        own = {k: d.pop(k) for k in list(d) if k in stage}
        own["paths"] = dict(own.get("paths") or {})
        return cls(**own, head=HeadConfig.from_dict(d))


def random_dinov2(seed: int = 0) -> Dinov2Model:
    """A small DINOv2 (64 wide, 2 layers, patch 14 at 224) with seeded random weights."""
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(image_size=224, patch_size=14, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(cfg)
    model.config.name_or_path = f"dinov2-random-stand-in-seed{seed}"
    return model.eval()


def feature_model(cfg: ClassifyStageConfig) -> tuple[Dinov2Model, str, str]:
    """(model, weights label, cache name): the configured DINOv2, or the random stand-in."""
    path = Path(cfg.model) if cfg.weights != "random" and Path(cfg.model).is_dir() else \
        store.resolve_mode(cfg.model, cfg.weights, cfg.paths.get(cfg.model), what="DINOv2")
    if path is not None:
        return load_dinov2(str(path)), f"real: {path.name}", path.name
    model = random_dinov2(cfg.seed)
    return model, STAND_IN, model.config.name_or_path


# ----------------------------------------------------------------------------- data


def _key(sample_id: str, image_path: str, split: str) -> str:
    """The name a manifest row goes by in a reference CSV: the Heliconius reader's id after
    ``heliconius/<split>/``, else the image file's stem; no extension, case folded."""
    prefix = f"heliconius/{split}/"
    name = sample_id[len(prefix):] if sample_id.startswith(prefix) else Path(image_path).stem
    return name.casefold()


def match_reference(manifest: pd.DataFrame, reference: pd.DataFrame, split: str) -> pd.DataFrame:
    """The reference rows with the ``sample_id`` of their manifest row (NA where the manifest has none).

    Filenames are matched without their extension and case-insensitively (``x.JPG`` = ``x.jpg``).
    """
    rows = manifest[manifest["split"] == split]
    keys = pd.Series([_key(str(s), str(p), split) for s, p in zip(rows["sample_id"], rows["image_path"])],
                     index=rows.index)
    dup = keys[keys.duplicated()].tolist()
    if dup:
        raise ValueError(f"manifest split {split!r}: several images go by the names {dup[:5]} (ignoring extension "
                         "and case); they cannot be told apart in the reference CSV")
    by_key = dict(zip(keys, rows["sample_id"].astype(str)))
    ref_keys = [Path(str(f)).with_suffix("").as_posix().casefold() for f in reference["filename"]]
    return reference.assign(sample_id=pd.array([by_key.get(k) for k in ref_keys], dtype="string"))


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).hexdigest()


def features_of(model: Dinov2Model, rows: pd.DataFrame, shard_dir: str | Path, cfg: ClassifyStageConfig,
                device: str, cache_dir: Path, cache_name: str, used: set[str]) -> np.ndarray:
    """DINOv2 features of index rows (sample_id, shard, index), cached by sample id and pixel hash."""
    dim = 2 * model.config.hidden_size
    if rows.empty:
        return np.zeros((0, dim), np.float32)
    ds = ShardDataset(rows[["sample_id", "shard", "index"]], fields=("image",), shard_dir=shard_dir, raw=True)
    out = []
    try:
        for lo in range(0, len(ds), CHUNK):
            items = [ds[i] for i in range(lo, min(lo + CHUNK, len(ds)))]
            images = [it["image"] for it in items]
            ids = [f"{it['sample_id']}#{_digest(im)}" for it, im in zip(items, images)]
            used.update(ids)
            out.append(extract_features(model, images, batch_size=cfg.batch_size, device=device, ids=ids,
                                        cache_dir=cache_dir, model_name=cache_name))
    finally:
        ds.close()
    return np.concatenate(out)


def _prune_cache(model: Dinov2Model, cache_dir: Path, cache_name: str, used: set[str]) -> None:
    """Drop cached features this run did not use (old pixels of regenerated or re-preprocessed images)."""
    cache = FeatureCache(cache_dir, cache_name, model_fingerprint(model))
    stale = set(cache.rows) - used
    if stale:
        for k in stale:
            del cache.rows[k]
        cache.save()
        log.info("feature cache: dropped %d stale entries", len(stale))


# ----------------------------------------------------------------------------- the stage


def run(
    manifest: str | Path | pd.DataFrame,
    shard_index: str | Path,
    generated_manifest: str | Path | pd.DataFrame | None,
    generated_dir: str | Path | None,
    reference_csv: str | Path,
    out_dir: str | Path,
    cfg: ClassifyStageConfig | Mapping | None = None,
) -> pd.DataFrame:
    """Train the heads with and without generated hybrids and score them against ``reference_csv``.

    Writes ``out_dir/classify.json``, ``out_dir/classify.parquet`` (one row per head and training
    set: the three recalls, the challenge score, thresholds, weights) and
    ``out_dir/predictions/<head>_<train_set>.txt`` (the challenge's format, filenames as in the
    reference CSV); returns the table. Reference rows without an image in the manifest or shards
    are left out of the scoring, logged and listed in the JSON under ``skipped``.
    """
    cfg = cfg if isinstance(cfg, ClassifyStageConfig) else ClassifyStageConfig.from_dict(cfg)
    out_dir = Path(out_dir)
    real = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    index = pd.read_parquet(shard_index)
    shard_dir = Path(shard_index).parent
    in_shards = set(index["sample_id"].astype(str))
    skipped: list[dict] = []

    reference = match_reference(real, read_reference(reference_csv), cfg.split)
    ok = reference["sample_id"].notna() & reference["sample_id"].isin(in_shards)
    for r in reference[~ok].itertuples():
        why = "not in the manifest (see the ingest skips)" if pd.isna(r.sample_id) else \
            "not in the shards (see the preprocess skips)"
        skipped.append({"what": "reference row", "id": r.filename, "reason": why})
        log.warning("classify: reference image %s is %s; it is left out of the scoring", r.filename, why)
    reference = reference[ok].reset_index(drop=True)
    if reference.empty:
        raise ValueError(f"none of the images of {reference_csv} are in the manifest's {cfg.split!r} split and "
                         "the shards; check classify.split and classify.reference_csv")

    train = real[real["split"] == "train"]
    missing = train[~train["sample_id"].isin(in_shards)]
    for sid in missing["sample_id"].astype(str):
        skipped.append({"what": "training image", "id": sid, "reason": "not in the shards (see the preprocess skips)"})
    if len(missing):
        log.warning("classify: %d training images are not in the shards; trained without them", len(missing))
    train = train[train["sample_id"].isin(in_shards)]
    index_of = index.set_index("sample_id")
    train_rows = index_of.loc[train["sample_id"]].reset_index()
    test_rows = index_of.loc[reference["sample_id"]].reset_index()

    generated: dict[str, pd.DataFrame] = {}
    if generated_manifest is not None:
        gen = generated_manifest
        if not isinstance(gen, pd.DataFrame):
            generated_dir = generated_dir or Path(gen).parent
            gen = pd.read_parquet(gen)
        gen = gen[gen["kind"] == "global"]
        generated = {d: gen[gen["decoder"] == d] for d in DECODERS if (gen["decoder"] == d).any()}
    log.info("classify: %d training images (%d hybrids), %d test images, generated hybrids %s", len(train),
             int(train["label"].sum()), len(reference), {d: len(g) for d, g in generated.items()} or "none")

    model, weights, cache_name = feature_model(cfg)
    device = resolve_device(cfg.device)
    cache_dir, used = out_dir / "features", set()

    def feats(rows: pd.DataFrame, where: str | Path | None) -> np.ndarray:
        return features_of(model, rows, where, cfg, device, cache_dir, cache_name, used)

    x_train, x_test = feats(train_rows, shard_dir), feats(test_rows, shard_dir)
    x_gen = {d: feats(g, generated_dir) for d, g in generated.items()}
    _prune_cache(model, cache_dir, cache_name, used)

    heads = [h for h in cfg.heads if h != "max"]
    pred_dir = out_dir / "predictions"
    table = run_classification(x_train, train["label"].to_numpy(np.int64), x_gen, x_test,
                               reference["filename"].tolist(), reference, heads=heads, seed=cfg.seed,
                               config=cfg.head, out_dir=pred_dir)
    if "max" in cfg.heads:
        table = pd.concat([table, _max_head(table, pred_dir, reference)], ignore_index=True)
    table["weights"] = weights
    table = table.reindex(columns=RESULT_COLUMNS)

    result = {
        "stage": "classify",
        "weights": weights,
        "model": cfg.model,
        "feature_dim": int(x_train.shape[1]),
        "reference_csv": str(reference_csv),
        "split": cfg.split,
        "counts": {"train": len(train), "train_hybrids": int(train["label"].sum()), "test": len(reference),
                   **{f"generated_{d}": len(g) for d, g in generated.items()}},
        "rows": table.to_dict("records"),
        "skipped": skipped,
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "head"},
                   **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg.head).items()}},
    }
    write_parquet_atomic(table, out_dir / "classify.parquet")
    write_json_atomic(out_dir / "classify.json", result)
    log.info("classify: wrote %s\n%s", out_dir / "classify.json",
             table[["head", "train_set", "major_recall", "minor_recall", "mimic_recall", "challenge_score"]]
             .to_string(index=False))
    return table


def _max_head(table: pd.DataFrame, pred_dir: Path, reference: pd.DataFrame) -> pd.DataFrame:
    """Max(Linear, SGD): per training set, the larger of the two heads' (rounded) scores."""
    rows = []
    for train_set, part in table.groupby("train_set", sort=False):
        a = read_predictions(pred_dir / f"linear_{train_set}.txt").set_index("filename")["score"]
        b = read_predictions(pred_dir / f"sgd_{train_set}.txt").set_index("filename")["score"]
        scores = np.maximum(a, b.reindex(a.index))
        write_predictions(pred_dir / f"max_{train_set}.txt", a.index.tolist(), scores.to_numpy())
        r = challenge_scores(pd.DataFrame({"filename": a.index, "score": scores.to_numpy()}), reference)
        first = part.iloc[0]
        rows.append({"head": "max", "train_set": train_set, "n_train": first["n_train"],
                     "n_generated": first["n_generated"],
                     **{k: r[k] for k in ("major_recall", "minor_recall", "mimic_recall", "challenge_score",
                                          "species_a_threshold", "mimic_threshold")}})
    return pd.DataFrame(rows)
