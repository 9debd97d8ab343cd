"""AnomalyFactory's evaluation: Blaze localisation on the real test images, the paper's strips, and
the generation quality of Boot and Flare (paper 002, Sec. 4.3-4.4, Tables 1-2, Figs. 10-22).

Localisation: per category, every real test image (manifest split test; with ``test_protocol:
eval`` the industrial protocol's base-set anomalies, which generation may have seen, are left out)
goes through Blaze with its edge map from the preprocess shards (the same edges the stages trained
on); Blaze's heatmap H_B is the anomaly map. Metrics (:mod:`hybrid.metrics.localization`): image
AUROC / AP / F1-max from the manifest labels with the image score = max of the heatmap smoothed by a
Gaussian of ``image_sigma`` (0: the raw max; ``image_box`` > 0: the box filter of AnomalyDiffusion),
pixel AUROC / AP / F1-max and AU-PRO (FPR up to ``pro_max_fpr``) over all test pixels, the normal
images' masks all zero. A category whose anomalies lack masks (butterfly hybrids) gets image
metrics only, and a note says why; one without anomalies or normals gets no image metrics, named.

Strips (the paper's supplement figures): per category, for up to ``strip_images`` real normal test
images, the columns "normal image | Flare's selected regions | anomaly edges | anomaly image |
anomaly heatmap | Blaze's normal image | Blaze's heatmap": regions drawn as Flare trains (mixed
semantic / stochastic), edges edited with another image's edges, Flare with feature noise, then
Blaze on Flare's anomaly. A second strip shows real test anomalies: image, ground truth, edges,
Blaze's normal image, Blaze's heatmap.

Generation quality (Tables 1-2): per dataset and category, ``quality.count`` normal training images
(the targets); for each region strategy (``semantic``, ``stochastic``, ``mixed`` = half and half) one
manipulated edge map each, and for each reference source of ``quality.references`` *the same*
(reference, manipulated edge) pairs through Boot and Flare (Flare with feature noise). Reference
sources: ``self`` (the normal image itself, Table 1) or the name of a dataset of the dataset list,
whose normal training images (any category, a seeded fixed list) give the colours to the target's
edited edges (Table 2's columns, "reference color images for FlareG are from"). Scored with the
evaluate stage's networks and settings (``evaluate`` section): Inception Score and cluster LPIPS
(centres: real test anomalies of the category in its dataset, as the evaluate stage picks them),
reported also as LPIPS x 10 as in the paper; means per dataset (Table 2's rows) and over all.
Semantic strategies need the SAM candidate maps; without them those rows are NaN with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import torch

from hybrid.config import check_choices, check_device, check_keys, choice, resolve_device
from hybrid.data.manifest import distinct_categories, read_manifest
from hybrid.io import write_json_atomic, write_parquet_atomic, write_png
from hybrid.manipulate import ManipulateConfig, opencv_threads
from hybrid.metrics.localization import LocalizationMetrics, binary_metrics, image_score
from hybrid.models.generator import Generator
from hybrid.regions import RegionStore, semantic_region
from hybrid.seeds import derive_seed
from hybrid.stages.boot import DECODER, load_af_checkpoint
from hybrid.stages.flare import FlareConfig, anomaly_edges, feature_noise
from hybrid.viz import contact_sheet

log = logging.getLogger(__name__)

MEAN = "(mean)"
METRICS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"]
COLUMNS = ["category", "n_test", "n_test_anomalies", "n_masks", *METRICS, "note"]
STRATEGIES = {"semantic": 1.0, "stochastic": 0.0, "mixed": 0.5}  # share of semantic regions
QUALITY_COLUMNS = ["dataset", "category", "strategy", "reference", "generator", "n_images", "is_mean", "is_std",
                   "lpips", "lpips_x10", "lpips_std", "n_centres", "n_clusters_used", "n_semantic", "note"]
SELF = "self"  # quality.references: the target image is its own reference


@dataclass(frozen=True)
class LocalizeConfig:
    """The ``anomalyfactory.localize`` section (and ``quality``: count, strategies)."""

    batch_size: int = 16
    image_sigma: float = 4.0  # image score: max of the Gaussian-smoothed heatmap (anomalib's habit)
    image_box: int = 0  # > 0: max of the box x box mean filter instead (AnomalyDiffusion: 21)
    pixel_bins: int = 65536
    pro_max_fpr: float = 0.3
    test_protocol: str = choice(("eval", "all"), "eval")  # eval: leave the protocol's base-set anomalies out
    strip_images: int = 4
    noise_std: float = 0.1  # Flare's feature noise in the strips and the generation-quality sets
    seed: int = 0
    device: str = "auto"
    quality_count: int = 16  # normal images per category for Tables 1-2 (0: off); paper: 1,000
    quality_strategies: tuple[str, ...] = choice(tuple(STRATEGIES), ("semantic", "stochastic", "mixed"))
    quality_references: tuple[str, ...] = (SELF,)  # self and / or dataset names (Table 2's reference sources)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality_strategies", tuple(self.quality_strategies))
        object.__setattr__(self, "quality_references", tuple(str(r) for r in self.quality_references))
        if not self.quality_references or len(set(self.quality_references)) < len(self.quality_references):
            raise ValueError(f"anomalyfactory.quality.references {list(self.quality_references)}: give one or more "
                             f"distinct sources ({SELF!r} or dataset names)")
        bad = [s for s in self.quality_strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"anomalyfactory.quality.strategies {bad}: use some of {list(STRATEGIES)}")
        check_choices(self, "anomalyfactory.localize")
        check_device(self.device, "anomalyfactory.localize.device")
        if self.batch_size < 1 or self.pixel_bins < 2 or self.strip_images < 0 or self.quality_count < 0:
            raise ValueError("anomalyfactory.localize: batch_size >= 1, pixel_bins >= 2, strip_images and "
                             "quality count >= 0")
        if self.image_box < 0 or (self.image_box and self.image_box % 2 == 0) or self.image_sigma < 0:
            raise ValueError("anomalyfactory.localize: image_box is 0 or a positive odd size, image_sigma >= 0")

    @classmethod
    def from_dict(cls, d: Mapping | None, quality: Mapping | None = None) -> LocalizeConfig:
        d = dict(check_keys(d, cls, "anomalyfactory.localize",
                            hidden=("quality_count", "quality_strategies", "quality_references")))
        q = dict(quality or {})
        unknown = sorted(set(q) - {"count", "strategies", "references"})
        if unknown:
            raise ValueError(f"unknown anomalyfactory.quality key(s) {unknown}; valid keys are ['count', 'references', "
                             "'strategies']")
        for key in ("count", "strategies", "references"):
            if key in q:
                d[f"quality_{key}"] = q[key]
        return cls(**d)


@dataclass(frozen=True)
class Inputs:
    manifest: Path
    index: Path
    boot: Path
    flare: Path
    blaze: Path
    regions: Path | None = None


@dataclass(frozen=True)
class Outputs:
    json: Path  # results/metrics/localize.json
    table: Path  # results/metrics/localize.parquet
    strips: Path  # results/anomalyfactory/strips/
    quality_json: Path | None = None  # results/metrics/af_generation.json
    quality_table: Path | None = None  # results/metrics/af_generation.parquet


# ----------------------------------------------------------------------------- data


def read_rows(rows: pd.DataFrame, shard_dir: Path, fields: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The stored arrays of index rows (sample_id, shard, index) in row order, and which rows have a mask."""
    rows = rows.reset_index(drop=True)
    out: dict[str, np.ndarray] = {}
    has_mask = np.zeros(len(rows), bool)
    for shard, g in rows.groupby("shard", sort=True):
        pos, idx = g.index.to_numpy(), g["index"].to_numpy().astype(np.int64)
        order = np.argsort(idx)
        with h5py.File(shard_dir / str(shard), "r") as f:
            for k in fields:
                if k not in f:
                    if k in ("image", "edge"):
                        raise ValueError(f"the preprocess shard {shard_dir / str(shard)} has no {k!r} array; "
                                         "Blaze needs the images and their edge maps (preprocess with an edge_model)")
                    continue
                if k not in out:
                    out[k] = np.zeros((len(rows), *f[k].shape[1:]), f[k].dtype)
                out[k][pos[order]] = f[k][idx[order]]
            if "mask" in f:
                have = f["has_mask"].asstr()[idx[order]] == "1" if "has_mask" in f else np.ones(len(g), bool)
                has_mask[pos[order]] = have
    return out, has_mask


def to_model(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, H, W) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3) or (N, H, W)."""
    a = x.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte()
    return a.permute(0, 2, 3, 1).numpy() if a.shape[1] == 3 else a[:, 0].numpy()


@torch.no_grad()
def run_blaze(blaze: Generator, images: torch.Tensor, edges: torch.Tensor, batch_size: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Blaze's normal image (N, 3, H, W) in [-1, 1] and heatmap (N, H, W) in [0, 1]."""
    normals, heats = [], []
    for lo in range(0, len(images), batch_size):
        cond = blaze.inputs({"target_image": images[lo:lo + batch_size].to(device),
                             "target_edge": edges[lo:lo + batch_size].to(device)})
        out = blaze(cond)[DECODER]
        normals.append(out["image"].float().cpu())
        heats.append(out["mask"][:, 0].float().cpu())
    return torch.cat(normals), torch.cat(heats)


@torch.no_grad()
def run_generator(G: Generator, images: torch.Tensor, edges: torch.Tensor, noise_std: float, seed: int,
                  batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boot's or Flare's fused image and heatmap for (reference image, edited edge) pairs."""
    outs, heats = [], []
    for k, lo in enumerate(range(0, len(images), batch_size)):
        cond = G.inputs({"reference_image": images[lo:lo + batch_size].to(device),
                         "target_edge": edges[lo:lo + batch_size].to(device)})
        noise = feature_noise(G, len(cond), *cond.shape[-2:], noise_std, derive_seed(seed, k), device)
        out = G(cond, noise)[DECODER]
        outs.append(out["image"].float().cpu())
        heats.append(out["mask"][:, 0].float().cpu())
    return torch.cat(outs), torch.cat(heats)


def edit_batch(images: torch.Tensor, edges: torch.Tensor, ids: Sequence[str], pool: Mapping[str, torch.Tensor],
               store: RegionStore | None, semantic_share: float, man: ManipulateConfig,
               manipulations: tuple[str, ...], max_regions: int, seed: int) -> dict:
    """Edited edges, regions and whether each was semantic, for each (image, edge) of a batch; the
    replace / merge edges come from a random image of ``pool`` (another image than the target's)."""
    edited, regions, semantic, names = [], [], [], []
    with opencv_threads(1):  # one pair's OpenCV calls at a time: its thread pool would spin between them
        for i in range(len(images)):
            rng = np.random.default_rng([seed, i])
            sem = None
            if rng.random() < semantic_share and store is not None:
                labels = store.get(ids[i])
                if labels is not None and labels.shape == tuple(images.shape[-2:]):
                    sem = semantic_region(labels, rng, max_regions)
            choices = [k for k, s in enumerate(pool["sample_id"]) if s != ids[i]] or list(range(len(pool["sample_id"])))
            j = choices[int(rng.integers(len(choices)))]
            ref = {"image": pool["image"][j], "edge": pool["edge"][j]}
            e, r, used, m = anomaly_edges(images[i], edges[i], ref, sem, rng, man, manipulations)
            edited.append(e)
            regions.append(r.float())
            semantic.append(used)
            names.append(m)
    return {"edge": torch.stack(edited), "region": torch.stack(regions), "semantic": np.array(semantic),
            "manipulation": names}


# ----------------------------------------------------------------------------- strips


def heatmap_rgb(amap: np.ndarray) -> np.ndarray:
    """A [0, 1] map as an RGB JET heatmap on a fixed scale (blue 0, red 1)."""
    return cv2.applyColorMap((np.clip(amap, 0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def overlay(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The image with the region tinted red and outlined."""
    out = image.astype(np.float32).copy()
    m = region.astype(bool)
    out[m] = 0.5 * out[m] + 0.5 * np.array([255, 0, 0], np.float32)
    edge = m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    out[edge] = (255, 255, 0)
    return out.round().astype(np.uint8)


FLARE_COLUMNS = ["normal image", "Flare: regions", "Flare: anomaly edges", "Flare: anomaly image",
                 "Flare: heatmap", "Blaze: normal image", "Blaze: heatmap"]
TEST_COLUMNS = ["test image", "ground truth", "edges", "Blaze: normal image", "Blaze: heatmap"]


def cell(image: np.ndarray) -> int:
    return int(min(max(image.shape[1], 96), 160))


# ----------------------------------------------------------------------------- the stage


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"


def _plain(v: object) -> object:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def score(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, has_mask: np.ndarray,
          cfg: LocalizeConfig) -> tuple[dict, list[str], int]:
    """The seven metrics of one category (NaN with a reason where one cannot be computed)."""
    out = dict.fromkeys(METRICS, math.nan)
    notes = []
    n_anom, n_norm = int(labels.sum()), int((labels == 0).sum())
    kw = {"sigma": cfg.image_sigma, "box": cfg.image_box or None}
    scores = image_score(torch.from_numpy(maps), **kw).numpy()
    masked = has_mask & (labels == 1)
    if n_anom and masked[labels == 1].all():
        metrics = LocalizationMetrics(bins=cfg.pixel_bins, pro=True, max_fpr=cfg.pro_max_fpr, **kw)
        gt = np.where(labels[:, None, None] == 1, masks > 127, False)
        for lo in range(0, len(maps), 64):
            metrics.update(maps[lo:lo + 64], gt[lo:lo + 64], scores[lo:lo + 64], labels[lo:lo + 64])
        try:
            pixel = metrics.pixels.compute()
            out.update(pixel)
        except ValueError as e:
            notes.append(f"no pixel metrics: {e}")
    elif n_anom:
        notes.append(f"no pixel metrics: {int((~masked & (labels == 1)).sum())} of {n_anom} test anomalies have no "
                     "ground-truth mask (e.g. butterfly hybrids)")
    if n_anom and n_norm:
        out.update({f"image_{k}": v for k, v in binary_metrics(scores, labels).items()})
    else:
        notes.append(f"no image metrics: {n_anom} anomalous and {n_norm} normal test images (both are needed)")
    return out, notes, int(masked.sum())


def run(inputs: Inputs, outputs: Outputs, cfg: LocalizeConfig | Mapping | None = None,
        flare_cfg: Mapping | None = None, manipulate_cfg: Mapping | None = None, sam_cfg: Mapping | None = None,
        evaluate_cfg: Mapping | None = None, threads: int = 1) -> dict:
    """Localise with Blaze, write the strips and (``quality_count`` > 0) the generation-quality table."""
    cfg = cfg if isinstance(cfg, LocalizeConfig) else LocalizeConfig.from_dict(cfg)
    fc = FlareConfig.from_dict(flare_cfg)
    inputs = Inputs(*(Path(p) if p else None for p in dataclasses.astuple(inputs)))
    outputs = Outputs(*(Path(p) if p else None for p in dataclasses.astuple(outputs)))
    torch.set_num_threads(max(1, threads))
    device = resolve_device(cfg.device)
    blaze, _ = load_af_checkpoint(inputs.blaze, "blaze", "the localize stage")
    flare, _ = load_af_checkpoint(inputs.flare, "flare", "the localize stage")
    boot, _ = load_af_checkpoint(inputs.boot, "boot", "the localize stage")
    for G in (blaze, flare, boot):
        G.to(device).eval()
    man = ManipulateConfig.from_dict({**(manipulate_cfg or {}), "manipulations": list(fc.manipulations)})
    max_regions = int((sam_cfg or {}).get("max_regions", 3))
    store = RegionStore(inputs.regions) if inputs.regions else None
    if store is not None and not store.available:
        log.warning("localize: no SAM candidate maps in %s (%s): stochastic regions only", inputs.regions, store.note)
        store = None
    shard_dir = Path(inputs.index).parent
    manifest = read_manifest(inputs.manifest)
    index = pd.read_parquet(inputs.index)
    real = manifest.merge(index, on="sample_id")
    real = real.assign(category=real["category"].astype(str))
    # localisation is per category; a name two datasets share is scored apart as "dataset / category"
    test = real.assign(category=distinct_categories(real))[real["split"] == "test"]
    left_base = 0
    if cfg.test_protocol == "eval" and "protocol" in test.columns:
        base = (test["protocol"].astype("string") == "base").fillna(False).astype(bool)
        left_base = int(base.sum())
        test = test[~base]
    normals = real[(real["split"] == "train") & (real["label"] == 0)]
    pool_rows = normals.sample(n=min(64, len(normals)), random_state=cfg.seed) if len(normals) else test.head(8)
    pool_arrays, _ = read_rows(pool_rows, shard_dir, ["image", "edge"])
    pool = {"image": to_model(pool_arrays["image"]), "edge": to_model(pool_arrays["edge"]),
            "sample_id": pool_rows["sample_id"].astype(str).tolist()}
    semantic_share = fc.region_mix if store is not None else 0.0
    log.info("localize: Blaze %s on %d test images of %d categories (%d base-set anomalies left out); device %s",
             inputs.blaze, len(test), test["category"].nunique(), left_base, device)

    rows, strips = [], {}
    for category in sorted(test["category"].unique()):
        t = test[test["category"] == category].sort_values("sample_id").reset_index(drop=True)
        arrays, has_mask = read_rows(t, shard_dir, ["image", "edge", "mask"])
        labels = t["label"].astype(int).to_numpy()
        images, edges = to_model(arrays["image"]), to_model(arrays["edge"])
        recon, heat = run_blaze(blaze, images, edges, cfg.batch_size, device)
        masks = arrays.get("mask", np.zeros(arrays["image"].shape[:3], np.uint8))
        metrics, notes, n_masks = score(heat.numpy(), masks, labels, has_mask, cfg)
        rows.append({"category": category, "n_test": len(t), "n_test_anomalies": int(labels.sum()), "n_masks": n_masks,
                     **metrics, "note": "; ".join(notes)})
        log.info("localize: %s: image AUROC %s, pixel AUROC %s, AU-PRO %s%s", category,
                 *(f"{metrics[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")),
                 f" ({'; '.join(notes)})" if notes else "")
        strips[category] = _strips(category, t, arrays, labels, has_mask, images, edges, recon, heat, flare, blaze,
                                   pool, store, semantic_share, man, fc, max_regions, cfg, device, outputs.strips)

    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    if not table.empty:
        mean = {"category": MEAN, "n_test": int(table["n_test"].sum()),
                "n_test_anomalies": int(table["n_test_anomalies"].sum()), "n_masks": int(table["n_masks"].sum()),
                **{k: table[k].mean() for k in METRICS},
                "note": f"mean over the categories with the metric (of {len(table)})"}
        table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True).reindex(columns=COLUMNS)
    for c in ("n_test", "n_test_anomalies", "n_masks"):
        table[c] = table[c].astype("Int64")
    result = {
        "stage": "localize",
        "blaze": str(inputs.blaze), "flare": str(inputs.flare), "boot": str(inputs.boot),
        "metric_settings": {
            "image_score": (f"max of the {cfg.image_box}x{cfg.image_box} mean filter of the heatmap" if cfg.image_box
                            else f"max of the heatmap smoothed by a Gaussian of sigma {cfg.image_sigma}"),
            "pixel": f"all test pixels at the working resolution; {cfg.pixel_bins} bins over [0, 1]",
            "aupro": f"MVTec AD AU-PRO, 8-connected regions, FPR up to {cfg.pro_max_fpr}, normalised",
            "test_protocol": cfg.test_protocol, "base_anomalies_left_out": left_base,
            "edges": "the preprocess shards' edge maps (as in training)",
        },
        "regions": {"semantic_share": semantic_share, "store": store.status if store else "off"},
        "rows": [{k: _plain(v) for k, v in r.items()} for r in table.astype(object).where(table.notna(), None)
                 .to_dict("records")],
        "strips": strips,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    if outputs.quality_json is not None:
        quality = generation_quality(real, index, shard_dir, boot, flare, pool, inputs.regions, fc, man, max_regions,
                                     cfg, evaluate_cfg, device)
        write_parquet_atomic(quality["table"], outputs.quality_table)
        write_json_atomic(outputs.quality_json, {k: v for k, v in quality.items() if k != "table"})
        result["quality"] = str(outputs.quality_json)
    write_parquet_atomic(table, outputs.table)
    write_json_atomic(outputs.json, result)
    log.info("localize: wrote %s (%d rows)", outputs.json, len(table))
    return result


def _strips(category: str, t: pd.DataFrame, arrays: dict, labels: np.ndarray, has_mask: np.ndarray,
            images: torch.Tensor, edges: torch.Tensor, recon: torch.Tensor, heat: torch.Tensor, flare: Generator,
            blaze: Generator, pool: dict, store: RegionStore | None, semantic_share: float, man: ManipulateConfig,
            fc: FlareConfig, max_regions: int, cfg: LocalizeConfig, device: torch.device, out_dir: Path) -> dict:
    """The two strips of a category (see the module doc); returns {"flare_blaze": path, "test": path}."""
    out: dict[str, str] = {}
    if cfg.strip_images == 0:
        return out
    norm = np.flatnonzero(labels == 0)[:cfg.strip_images]
    if len(norm):
        ids = t["sample_id"].astype(str).to_numpy()[norm]
        e = edit_batch(images[norm], edges[norm], list(ids), pool, store, semantic_share, man, fc.manipulations,
                       max_regions, derive_seed(cfg.seed, 7))
        anomaly, fheat = run_generator(flare, images[norm], e["edge"], cfg.noise_std, derive_seed(cfg.seed, 8),
                                       cfg.batch_size, device)
        bnormal, bheat = run_blaze(blaze, anomaly, e["edge"], cfg.batch_size, device)
        tiles = []
        base = arrays["image"][norm]
        for k in range(len(norm)):
            tiles += [base[k], overlay(base[k], e["region"][k, 0].numpy() > 0.5), to_uint8(e["edge"][k:k + 1])[0],
                      to_uint8(anomaly[k:k + 1])[0], heatmap_rgb(fheat[k].numpy()), to_uint8(bnormal[k:k + 1])[0],
                      heatmap_rgb(bheat[k].numpy())]
        labels_ = [c + (" (semantic)" if c == "Flare: regions" and e["semantic"][k] else "")
                   for k in range(len(norm)) for c in FLARE_COLUMNS]
        path = out_dir / f"{_safe(category)}.png"
        write_png(path, contact_sheet(tiles, labels_, cols=len(FLARE_COLUMNS), cell=cell(base[0])))
        out["flare_blaze"] = str(path)
    anom = np.flatnonzero(labels == 1)[:cfg.strip_images]
    if len(anom):
        tiles, names = [], []
        for k in anom:
            gt = arrays["mask"][k] if has_mask[k] and "mask" in arrays else None
            tiles += [arrays["image"][k], gt if gt is not None else np.full(arrays["image"].shape[1:3], 128, np.uint8),
                      arrays["edge"][k], to_uint8(recon[k:k + 1])[0], heatmap_rgb(heat[k].numpy())]
            defect = t.at[int(k), "defect"] if "defect" in t.columns and pd.notna(t.at[int(k), "defect"]) else "anomaly"
            names += [str(defect), "ground truth" if gt is not None else "no mask", *TEST_COLUMNS[2:]]
        path = out_dir / f"{_safe(category)}-test.png"
        write_png(path, contact_sheet(tiles, names, cols=len(TEST_COLUMNS), cell=cell(arrays["image"][0])))
        out["test"] = str(path)
    return out


# ----------------------------------------------------------------------------- Tables 1-2


def generation_quality(real: pd.DataFrame, index: pd.DataFrame, shard_dir: Path, boot: Generator, flare: Generator,
                       pool: dict, regions: Path | None, fc: FlareConfig, man: ManipulateConfig, max_regions: int,
                       cfg: LocalizeConfig, evaluate_cfg: Mapping | None, device: torch.device) -> dict:
    """IS and cluster LPIPS of Boot and Flare on the same (reference, manipulated edge) pairs, per
    dataset, category, region strategy and reference source (Tables 1-2; see the module doc)."""
    from hybrid.metrics.kid import inception_pool
    from hybrid.stages.evaluate import (
        EvaluateConfig,
        _fit,
        _score,
        inception_network,
        lpips_network,
        metric_settings,
        pool_to_logits,
        read_images,
        sample_centres,
    )

    ecfg = EvaluateConfig.from_dict({k: v for k, v in (evaluate_cfg or {}).items() if k != "kinds"})
    store = RegionStore(regions) if regions else None
    have_sem = store is not None and store.available
    rows: list[dict] = []
    if cfg.quality_count == 0:
        return {"stage": "af_generation", "rows": [], "table": pd.DataFrame(columns=QUALITY_COLUMNS),
                "note": "anomalyfactory.quality.count is 0"}
    inception, is_weights = inception_network(ecfg)
    metric, lpips_weights = lpips_network(ecfg)
    manifest = real.drop(columns=["shard", "index"])
    real = real if "dataset" in real.columns else real.assign(dataset="")
    real = real.assign(dataset=real["dataset"].astype(str))
    normals = real[(real["split"] == "train") & (real["label"] == 0)]
    unknown = [r for r in cfg.quality_references if r != SELF and r not in set(normals["dataset"])]
    if unknown:
        raise ValueError(f"anomalyfactory.quality.references names {unknown}: no normal training images of such a "
                         f"dataset; the manifest's datasets are {sorted(set(real['dataset']))} (or use {SELF!r})")
    for (dataset, category), cat_rows in normals.groupby(["dataset", "category"], sort=True):
        cat_rows = cat_rows.sort_values("sample_id")
        pick = cat_rows.sample(n=min(cfg.quality_count, len(cat_rows)), random_state=cfg.seed).sort_values("sample_id")
        arrays, _ = read_rows(pick, shard_dir, ["image", "edge"])
        images, edges = to_model(arrays["image"]), to_model(arrays["edge"])
        ids = pick["sample_id"].astype(str).tolist()
        own = manifest if manifest["dataset"].astype(str).nunique() < 2 else manifest[manifest["dataset"] == dataset]
        centre_rows, centre_note = sample_centres(own, index, category, ecfg.n_centres, ecfg.seed)
        centres = (_fit(read_images(centre_rows, shard_dir), arrays["image"].shape[1:3]) if len(centre_rows) >= 2
                   else None)
        references = {}  # source -> reference images, one per target: the same for every strategy and generator
        for source in cfg.quality_references:
            if source == SELF:
                references[source] = images
                continue
            src = normals[normals["dataset"] == source]
            others = src[~src["sample_id"].astype(str).isin(ids)]  # not the targets themselves, where it can
            src = (others if len(others) else src).sort_values("sample_id")
            rng = np.random.default_rng([cfg.seed, 13, *map(ord, f"{source}|{dataset}|{category}")])
            take = src.iloc[rng.choice(len(src), size=len(pick), replace=len(src) < len(pick))]
            ref_arrays, _ = read_rows(take, shard_dir, ["image"])
            references[source] = to_model(_fit(ref_arrays["image"], arrays["image"].shape[1:3]))
        for strategy in cfg.quality_strategies:
            share = STRATEGIES[strategy]
            if share > 0 and not have_sem:
                for source in cfg.quality_references:
                    for gen in ("boot", "flare"):
                        rows.append({"dataset": dataset, "category": category, "strategy": strategy,
                                     "reference": source, "generator": gen, "n_images": 0,
                                     "note": "no SAM candidate maps (anomalyfactory.flare.region_mix is 0, or the SAM "
                                             "weights were absent): semantic regions unavailable"})
                continue
            e = edit_batch(images, edges, ids, pool, store if have_sem else None, share, man, fc.manipulations,
                           max_regions, derive_seed(cfg.seed, 11, sum(map(ord, strategy))))
            for source, ref_images in references.items():
                for gen, G, noise in (("boot", boot, 0.0), ("flare", flare, cfg.noise_std)):
                    out, _ = run_generator(G, ref_images, e["edge"], noise, derive_seed(cfg.seed, 12), cfg.batch_size,
                                           device)
                    gen_images = to_uint8(out)
                    feats = inception_pool(gen_images, inception, batch_size=ecfg.batch_size, device=device,
                                           progress=False)
                    r = _score(pool_to_logits(feats, inception), gen_images, centres, metric, ecfg, device)
                    note = "; ".join(filter(None, [centre_note, None if centres is not None else
                                                   f"no cluster LPIPS: {len(centre_rows)} real test anomalies of "
                                                   f"{category!r} (2 needed as centres)"]))
                    lp = r.get("lpips", math.nan)
                    rows.append({"dataset": dataset, "category": category, "strategy": strategy, "reference": source,
                                 "generator": gen, **r, "lpips_x10": 10 * lp if lp is not None else math.nan,
                                 "n_semantic": int(e["semantic"].sum()), "note": note})
                    log.info("af_generation: %s%s / %s / references %s / %s: IS %.3f, LPIPS x10 %s",
                             f"{dataset} / " if dataset else "", category, strategy, source, gen, r["is_mean"],
                             f"{10 * lp:.3f}" if lp is not None and not math.isnan(lp) else "n/a")
    table = pd.DataFrame(rows).reindex(columns=QUALITY_COLUMNS)
    means = []  # per dataset (Table 2's rows), then over every category
    groups = ([(d, table[table["dataset"] == d]) for d in sorted(set(table["dataset"]))]
              if table["dataset"].nunique() > 1 else [])
    for dataset, sub in [*groups, ("(all)", table)]:
        for (strategy, source, gen), part in sub.groupby(["strategy", "reference", "generator"], sort=False):
            means.append({"dataset": dataset, "category": MEAN, "strategy": strategy, "reference": source,
                          "generator": gen,
                          "n_images": int(part["n_images"].fillna(0).sum()), "is_mean": part["is_mean"].mean(),
                          "lpips": part["lpips"].mean(), "lpips_x10": part["lpips_x10"].mean(),
                          "note": f"mean over {int(part['is_mean'].notna().sum())} categories"})
    table = pd.concat([table, pd.DataFrame(means)], ignore_index=True).reindex(columns=QUALITY_COLUMNS)
    for c in ("n_images", "n_centres", "n_clusters_used", "n_semantic"):
        table[c] = table[c].astype("Int64")
    return {"stage": "af_generation", "weights": {"inception_score": is_weights, "lpips": lpips_weights},
            "settings": metric_settings(ecfg), "count": cfg.quality_count,
            "strategies": list(cfg.quality_strategies), "references": list(cfg.quality_references),
            "pairs": "target = a normal training image, its edge map edited in the drawn regions; reference = the "
            "image itself (self) or a normal training image of the named dataset; the same pairs go through Boot and "
            "Flare",
            "rows": [{k: _plain(v) for k, v in r.items()} for r in table.astype(object).where(table.notna(), None)
                     .to_dict("records")], "table": table}
