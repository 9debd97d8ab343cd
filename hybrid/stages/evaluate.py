"""The evaluate stage: IS, cluster LPIPS and KID of the generated images (paper 003, Tables 1, 3, 5).

Per category and per decoder (AHD, AHE, and both together when there are two), on the generated
images of the configured kinds (``auto``: local anomalies for industrial data, whose manifest
names defect types, as the papers score them; global hybrids and local anomalies otherwise;
generated normal images are left out by default). IS follows torch-fidelity
(:mod:`hybrid.metrics.inception_score`); cluster LPIPS (:mod:`hybrid.metrics.cluster_lpips`)
uses as centres ``n_centres`` real anomalies (or hybrids) of the category, drawn with ``seed``
from the test split of the real shards (paper: 100): with the industrial protocol, from the eval
anomalies only (``protocol == "eval"``; the base third fed generation). KID (torch-fidelity's
definition, :mod:`hybrid.metrics.kid`) compares the generated images with all those real
anomalies, on the same Inception pool features as IS. Every row carries the metric settings
(``settings``) next to its numbers, so two runs can be compared.

Feature networks (``weights``): ``real`` loads the registered files through the model store and
fails with its message when one is missing; ``random`` uses seeded random-weight stand-ins for
Inception and the LPIPS backbone (the LPIPS linear layers stay real when their file is present,
else random positive); ``auto`` takes the real file where the store finds it and a stand-in, with a
warning, where it does not. Every row records which weights produced each number. Nothing is
dropped silently: a (category, decoder) that cannot be scored gets a row with NaN and the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from hybrid.config import WEIGHT_MODES, check_choices, check_device, check_keys, choice, resolve_device
from hybrid.data.manifest import read_manifest
from hybrid.data.shards import ShardDataset
from hybrid.io import write_json_atomic, write_parquet_atomic
from hybrid.metrics.cluster_lpips import cluster_lpips, lpips_features
from hybrid.metrics.inception_score import inception_score
from hybrid.metrics.kid import inception_pool, kid_from_features
from hybrid.metrics.lpips import LPIPS, NETS, load_lpips
from hybrid.models import store
from hybrid.models.generator import DECODERS
from hybrid.models.inception import InceptionV3Compat, load_inception
from hybrid.planning import KINDS

log = logging.getLogger(__name__)

STAND_IN = "random stand-in (numbers not comparable to papers)"
MIN_CENTRES = 2  # fewer real anomalies than this: no cluster LPIPS for the category
MEAN = "(mean)"  # the category name of the rows that average over categories
COLUMNS = ["category", "decoder", "n_images", "is_mean", "is_std", "is_splits", "lpips", "lpips_std",
           "n_centres", "n_clusters_used", "kid_mean", "kid_std", "n_real", "is_weights", "lpips_weights", "settings",
           "note"]


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` config section (plus ``paths``: store name -> explicit weights file)."""

    weights: str = choice(WEIGHT_MODES, "auto")
    device: str = "auto"  # auto | cpu | cuda[:N]
    batch_size: int = 16
    # generated kinds scored; auto: [local] industrial, else [global, local]
    kinds: tuple[str, ...] | str = choice(KINDS, "auto", alone=("auto",))
    is_splits: int = 10
    is_seed: int = 2020
    lpips_net: str = choice(tuple(NETS), "vgg")
    lpips_cap: int = 50
    lpips_min_size: int = 2
    n_centres: int = 100
    seed: int = 0
    cache_gib: float = 4.0
    kid_subsets: int = 100  # torch-fidelity defaults
    kid_subset_size: int = 1000  # capped at the smaller set
    kid_seed: int = 2020
    paths: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.kinds, list):
            object.__setattr__(self, "kinds", tuple(self.kinds))
        check_choices(self, "evaluate")
        check_device(self.device, "evaluate.device")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError(f"evaluate: kid_subsets ({self.kid_subsets}) must be >= 1 and kid_subset_size "
                             f"({self.kid_subset_size}) >= 2")
        if self.n_centres < MIN_CENTRES or self.is_splits < 1 or self.batch_size < 1:
            raise ValueError(f"evaluate: n_centres ({self.n_centres}) must be >= {MIN_CENTRES}, "
                             f"is_splits ({self.is_splits}) and batch_size ({self.batch_size}) >= 1")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> EvaluateConfig:
        d = check_keys(d, cls, "evaluate")
        d["paths"] = dict(d.get("paths") or {})
        return cls(**d)


# ----------------------------------------------------------------------------- feature networks


def resolve_weights(name: str, mode: str, paths: Mapping[str, str]) -> Path | None:
    """The real file of ``name``, or None for a random stand-in (:func:`hybrid.models.store.resolve_mode`)."""
    return store.resolve_mode(name, mode, paths.get(name))


@torch.no_grad()
def seeded_init(model: nn.Module, seed: int, gain: float = 2.0) -> nn.Module:
    """Deterministic He-normal convolutions and linear layers, zero biases (BatchNorm stays identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(gain / m.weight[0].numel()))
            if m.bias is not None:
                m.bias.zero_()
    return model


def random_inception(seed: int = 0) -> InceptionV3Compat:
    """Inception-v3-compat with seeded random weights; the last layer is scaled x10 so that the
    softmax over 1008 classes is not flat (else every IS would read 1.000)."""
    model = seeded_init(InceptionV3Compat(), seed)
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    return model.eval()


def inception_network(cfg: EvaluateConfig) -> tuple[nn.Module, str]:
    """The IS network and the label of its weights."""
    path = resolve_weights("inception_is", cfg.weights, cfg.paths)
    if path is None:
        return random_inception(cfg.seed), STAND_IN
    return load_inception(path), f"real: {path.name}"


def lpips_network(cfg: EvaluateConfig) -> tuple[LPIPS, str]:
    """LPIPS with real or stand-in backbone; real linear layers wherever their file is present."""
    spec = NETS[cfg.lpips_net]
    backbone = resolve_weights(spec["backbone"], cfg.weights, cfg.paths)
    linear = (resolve_weights(spec["linear"], cfg.weights, cfg.paths) if cfg.weights != "random"
              else store.present(spec["linear"], cfg.paths))
    if backbone is not None and linear is not None:
        model = load_lpips(cfg.lpips_net, backbone, linear)
        return model, f"real: {backbone.name} + {spec['linear']} ({linear.name})"
    model = LPIPS(cfg.lpips_net)
    if backbone is None:
        seeded_init(model.features_net, cfg.seed)
    else:
        model.load_backbone(torch.load(backbone, map_location="cpu", weights_only=True))
    if linear is None:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            for w in model.lins.weights():
                w.copy_(torch.rand(w.shape, generator=g) * 0.1)  # LPIPS needs non-negative weights
    else:
        model.load_linear(torch.load(linear, map_location="cpu", weights_only=True))
    parts = [f"backbone {'real: ' + backbone.name if backbone else 'random'}",
             f"linear {'real: ' + linear.name if linear else 'random positive'}"]
    return model.eval(), f"{STAND_IN}: {', '.join(parts)}"


# ----------------------------------------------------------------------------- data


def read_inputs(generated_manifest: str | Path | pd.DataFrame, manifest: str | Path | pd.DataFrame,
                shard_index: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Path]:
    """The generated manifest, the ingest manifest, the preprocess index and its shard folder, as the
    stages that score generated images against real ones read them (frames are taken as given)."""
    gen = generated_manifest if isinstance(generated_manifest, pd.DataFrame) else pd.read_parquet(generated_manifest)
    real = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    return gen, real, pd.read_parquet(shard_index), Path(shard_index).parent


def read_images(rows: pd.DataFrame, shard_dir: str | Path) -> np.ndarray:
    """uint8 (N,H,W,3) images of index rows (sample_id, shard, index) from the shards in ``shard_dir``."""
    if rows.empty:
        return np.zeros((0, 0, 0, 3), np.uint8)
    ds = ShardDataset(rows[["sample_id", "shard", "index"]], fields=("image",), shard_dir=shard_dir, raw=True)
    try:
        return np.stack([ds[i]["image"] for i in range(len(ds))])
    finally:
        ds.close()


def real_anomalies(manifest: pd.DataFrame, index: pd.DataFrame, category: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real test anomalies of ``category`` (manifest rows), the eval part only when the manifest
    carries the industrial protocol split, and their index rows (sorted by sample id)."""
    real = manifest[(manifest["category"] == category) & (manifest["split"] == "test") & (manifest["label"] == 1)]
    if "protocol" in real.columns and (real["protocol"] == "eval").any():
        real = real[real["protocol"] == "eval"]
    return real, index[index["sample_id"].isin(real["sample_id"])].sort_values("sample_id").reset_index(drop=True)


def sample_centres(manifest: pd.DataFrame, index: pd.DataFrame, category: str, n: int,
                   seed: int) -> tuple[pd.DataFrame, str]:
    """Up to ``n`` real test anomalies of ``category`` that are in the shards (seeded; the eval part
    under the industrial protocol), and a note."""
    real, rows = real_anomalies(manifest, index, category)
    note = ""
    if len(rows) < len(real):
        note = f"{len(real) - len(rows)} real test anomalies of {category} are not in the shards (see preprocess skips)"
    if len(rows) > n:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        rows = rows.iloc[pick].reset_index(drop=True)
    return rows, note


def _fit(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (N,H,W,3) images to ``size`` (H, W) when they differ (area / bilinear)."""
    if images.shape[1:3] == size:
        return images
    interp = cv2.INTER_AREA if images.shape[1] > size[0] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(im, (size[1], size[0]), interpolation=interp) for im in images])


# ----------------------------------------------------------------------------- the stage
def resolve_kinds(kinds: tuple[str, ...] | str, manifest: pd.DataFrame) -> tuple[str, ...]:
    """``auto``: local anomalies for industrial data (the manifest names defect types), as the
    papers score them (Tables 1, 5); global hybrids and local anomalies otherwise."""
    if kinds != "auto":
        return tuple(kinds)
    anomalies = manifest[manifest["label"] == 1]
    industrial = "defect" in manifest.columns and anomalies["defect"].notna().any()
    return ("local",) if industrial else ("global", "local")


def metric_settings(cfg: EvaluateConfig) -> str:
    """The settings every number depends on, written next to it."""
    return (f"IS splits={cfg.is_splits} seed={cfg.is_seed}; LPIPS net={cfg.lpips_net} cap={cfg.lpips_cap} "
            f"min_size={cfg.lpips_min_size} centres={cfg.n_centres} seed={cfg.seed}; KID subsets={cfg.kid_subsets} "
            f"subset_size={cfg.kid_subset_size} seed={cfg.kid_seed}")


def pool_to_logits(pool: np.ndarray, model: InceptionV3Compat) -> np.ndarray:
    """IS's ``logits_unbiased`` from the pool features (the fc layer without bias), so one Inception
    pass serves both IS and KID."""
    w = model.fc.weight.detach().cpu()
    return torch.from_numpy(pool.astype(np.float32)).mm(w.T).numpy()




def _nan_to_none(obj: object) -> object:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _score(logits: np.ndarray, images: np.ndarray, centres: np.ndarray | None, metric: LPIPS,
           cfg: EvaluateConfig, device: torch.device, centre_feats: list[torch.Tensor] | None = None,
           gen_feats: list[torch.Tensor] | None = None) -> dict:
    """IS (from Inception logits) and cluster LPIPS of one set of generated images (no LPIPS
    when ``centres`` is None). Precomputed LPIPS features are used instead of recomputing them."""
    splits = min(cfg.is_splits, len(logits))
    is_mean, is_std = inception_score(logits, splits=splits, seed=cfg.is_seed)
    out = {"n_images": len(logits), "is_mean": is_mean, "is_std": is_std, "is_splits": splits}
    if centres is not None:
        c = cluster_lpips(images, centres, metric, cap=cfg.lpips_cap,
                          min_size=cfg.lpips_min_size, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                          cache_bytes=int(cfg.cache_gib * 2**30), centre_features=centre_feats,
                          generated_features=gen_feats, progress=False)
        used = [v for v in c["per_cluster"] if not math.isnan(v)]
        out.update(lpips=c["score"], lpips_std=float(np.std(used)) if used else math.nan,
                   n_centres=len(centres), n_clusters_used=c["n_clusters_used"])
    return out


def run(generated_manifest: str | Path | pd.DataFrame, generated_dir: str | Path,
        manifest: str | Path | pd.DataFrame, shard_index: str | Path, out_dir: str | Path,
        cfg: EvaluateConfig | Mapping | None = None) -> dict:
    """Score the generated images; write ``out_dir/evaluate.json`` and ``out_dir/evaluate.parquet``.

    Returns the JSON content: ``rows`` (one per category and decoder, plus ``(mean)`` rows over
    categories), ``weights`` (per metric), ``centres`` (per category: the real sample ids used),
    ``skipped`` (what was not scored, and why) and ``config``.
    """
    cfg = cfg if isinstance(cfg, EvaluateConfig) else EvaluateConfig.from_dict(cfg)
    gen, real, index, shard_dir = read_inputs(generated_manifest, manifest, shard_index)
    device = resolve_device(cfg.device)
    kinds = resolve_kinds(cfg.kinds, real)
    left_out = gen[~gen["kind"].isin(kinds)]
    gen = gen[gen["kind"].isin(kinds)]
    if gen.empty:
        raise ValueError(f"no generated images of kinds {list(kinds)} in the generated manifest "
                         f"(it has kinds {sorted(left_out['kind'].unique())}); set evaluate.kinds")
    log.info("evaluate: %d generated images (%s); %d of kinds %s left out", len(gen),
             ", ".join(f"{k} {n}" for k, n in gen["kind"].value_counts().sort_index().items()), len(left_out),
             sorted(left_out["kind"].unique()))

    inception, is_weights = inception_network(cfg)
    metric, lpips_weights = lpips_network(cfg)
    log.info("Inception Score weights: %s; LPIPS (%s) weights: %s", is_weights, cfg.lpips_net, lpips_weights)

    rows, skipped, centres_used = [], [], {}
    for category in sorted(gen["category"].astype(str).unique()):
        g = gen[gen["category"] == category].reset_index(drop=True)
        images = read_images(g, generated_dir)
        pool = inception_pool(images, inception, batch_size=cfg.batch_size, device=device, progress=False)
        logits = pool_to_logits(pool, inception)
        centre_rows, note = sample_centres(real, index, category, cfg.n_centres, cfg.seed)
        _, real_rows = real_anomalies(real, index, category)
        real_pool = None
        if len(real_rows) >= 2:
            real_images = _fit(read_images(real_rows, shard_dir), images.shape[1:3])
            real_pool = inception_pool(real_images, inception, batch_size=cfg.batch_size, device=device,
                                       progress=False)
        else:
            why = f"{len(real_rows)} real test anomalies of category {category!r} in the shards; KID needs 2"
            skipped.append({"category": category, "decoder": "all", "metric": "kid", "reason": why})
            note = "; ".join(filter(None, [note, f"KID skipped: {why}"]))
        centres = centre_feats = gen_feats = None
        if len(centre_rows) < MIN_CENTRES:
            why = (f"{len(centre_rows)} real test anomalies of category {category!r} in the shards; cluster LPIPS "
                   f"needs at least {MIN_CENTRES} as centres")
            skipped.append({"category": category, "decoder": "all", "metric": "lpips", "reason": why})
            log.warning("evaluate: no cluster LPIPS for %s: %s", category, why)
            note = "; ".join(filter(None, [note, f"LPIPS skipped: {why}"]))
        else:
            # Features once per category, shared by AHD, AHE and both: the centres always, the
            # generated images when they fit in cache_gib (else cluster_lpips recomputes per subset).
            centres = _fit(read_images(centre_rows, shard_dir), images.shape[1:3])
            centre_feats = lpips_features(metric.to(device), centres, None, cfg.batch_size, device)
            per_image = sum(f[0].numel() * f.element_size() for f in centre_feats)
            if len(images) * per_image <= cfg.cache_gib * 2**30:
                gen_feats = [f.cpu() for f in lpips_features(metric, images, None, cfg.batch_size, device)]
        centres_used[category] = centre_rows["sample_id"].astype(str).tolist()
        found = set(g["decoder"].astype(str))
        present = [d for d in DECODERS if d in found] + sorted(found - set(DECODERS))
        for decoder in present + (["both"] if len(present) > 1 else []):
            sel = np.ones(len(g), bool) if decoder == "both" else (g["decoder"] == decoder).to_numpy()
            log.info("evaluate: %s / %s: %d images, %s centres", category, decoder, int(sel.sum()),
                     len(centre_rows) if centres is not None else "no")
            sub_feats = None if gen_feats is None else [f[torch.from_numpy(np.flatnonzero(sel))] for f in gen_feats]
            r = _score(logits[sel], images[sel], centres, metric, cfg, device, centre_feats, sub_feats)
            r.update(kid_mean=math.nan, kid_std=math.nan, n_real=len(real_rows))
            if real_pool is not None and sel.sum() >= 2:
                r["kid_mean"], r["kid_std"] = kid_from_features(pool[sel], real_pool, cfg.kid_subsets,
                                                                cfg.kid_subset_size, seed=cfg.kid_seed)
            row_note = note
            if centres is not None and math.isnan(r["lpips"]):
                why = f"no cluster reached lpips_min_size={cfg.lpips_min_size} members"
                skipped.append({"category": category, "decoder": decoder, "metric": "lpips", "reason": why})
                row_note = "; ".join(filter(None, [note, why]))
            rows.append({"category": category, "decoder": decoder, **r, "is_weights": is_weights,
                         "lpips_weights": lpips_weights, "settings": metric_settings(cfg), "note": row_note})
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    means = []
    for decoder, part in table.groupby("decoder", sort=False):
        means.append({"category": MEAN, "decoder": decoder, "n_images": int(part["n_images"].sum()),
                      "is_mean": part["is_mean"].mean(), "is_std": math.nan, "lpips": part["lpips"].mean(),
                      "lpips_std": math.nan, "kid_mean": part["kid_mean"].mean(), "kid_std": math.nan,
                      "n_real": int(part["n_real"].sum()), "is_weights": is_weights, "lpips_weights": lpips_weights,
                      "settings": metric_settings(cfg),
                      "note": f"mean over {len(part)} categories (LPIPS over {int(part['lpips'].notna().sum())}, "
                              f"KID over {int(part['kid_mean'].notna().sum())})"})
    table = pd.concat([table, pd.DataFrame(means)], ignore_index=True).reindex(columns=COLUMNS)
    for c in ("n_images", "is_splits", "n_centres", "n_clusters_used", "n_real"):
        table[c] = table[c].astype("Int64")

    result = {
        "stage": "evaluate",
        "weights": {"inception_score": is_weights, "lpips": lpips_weights},
        "lpips_net": cfg.lpips_net,
        "kinds": list(kinds),
        "settings": metric_settings(cfg),
        "kinds_left_out": {str(k): int(n) for k, n in left_out["kind"].value_counts().items()},
        "rows": [{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in r.items()}
                 for r in table.to_dict("records")],
        "centres": centres_used,
        "skipped": skipped,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    out_dir = Path(out_dir)
    write_parquet_atomic(table, out_dir / "evaluate.parquet")
    write_json_atomic(out_dir / "evaluate.json", _nan_to_none(result))
    log.info("evaluate: wrote %s (%d rows, %d skipped)", out_dir / "evaluate.json", len(table), len(skipped))
    return result
