"""The segment stage: downstream anomaly detection and localisation with a segmentation network
trained on generated anomalies (paper 003 Sec. 4.3: Table 2 on MVTec AD, Table 4 and supplement
Table 8 on MVTec 3D-AD).

Per category and per *variant* (the decoders whose generated anomalies train it: AHD, AHE or both;
with or without the generated normal images, AnoHybrid / AnoHybrid+), one model is trained and
tested on the category's real test set:

- Training samples (AnomalyDiffusion's ``MVTec_Anomaly_Detection``): each sample is, with
  probability ``normal_ratio`` (0.5), a normal image with an all-zero mask (the real normal
  training images; AnoHybrid+ adds the generated ``normal`` images to that pool), else a generated
  ``local`` anomaly with its ground-truth ``region`` as the mask. Indices and flips are drawn from
  a generator seeded by (seed, epoch), so a resumed run needs only the step counter.
- Network and loss (``arch: draem``, the default): DRAEM's DiscriminativeSubNetwork with two
  softmax channels, DRAEM's weight init and its focal loss (gamma 2, label smoothing 1e-5), Adam
  at ``lr`` 1e-4 for ``epochs`` x ``epoch_length`` samples (200 x 500, batch 8) with the learning
  rate x0.2 at 80% and 90% of the epochs, inputs in [0, 1] - the recipe of AnomalyDiffusion's
  ``train-localization.py`` that Table 2's "same UNet" follows. ``arch: unet`` is milesial's
  U-Net with one sigmoid logit (the same focal loss on [1 - p, p]). AnomalyDiffusion keeps the
  epoch with the best *test* metrics; this stage keeps the last weights (no test-set selection).
- Input size: the working resolution, resized (bilinear; masks nearest) to ``input_size`` when
  given, or else, for draem, up to the next multiple of 32 (five max-pools). Maps are resized back
  to the working resolution before scoring.
- Test (``test-localization.py``): the real test images of the category (manifest split test; with
  ``test_protocol: eval`` the protocol's base-set anomalies, which the generator may have seen, are
  left out), masks from the preprocess shards' ``mask`` array (normal images: all zero). Pixel
  scores are the anomaly probability map; the image score is the max of its ``image_box`` x
  ``image_box`` mean filter (21, zero padding) - :func:`hybrid.metrics.localization.image_score`.
  Metrics: image AUROC / AP / F1-max from the manifest labels, pixel AUROC / AP / F1-max over every
  test pixel and AU-PRO up to FPR 0.3 (:class:`hybrid.metrics.localization.PixelMetrics`; exact up
  to ``pixel_bins`` bins over [0, 1]).
- Depth (MVTec 3D-AD, Table 4 / 8): when the generated shards hold ``depth_generated`` (AH*, the
  train_depth stage) a second, 1-channel model per variant learns from it (same regions; normals:
  the real depth, ``depth_sensor`` where the preprocess shards hold it, else ``depth``; AnoHybrid+
  adds the generated normals' ``depth_generated``) and is tested on the real test depth of the same
  array; ``rgb+depth`` scores the mean of the two probability maps. ``depth: auto`` does this when
  the arrays exist, ``true`` requires them, ``false`` never.

Nothing is dropped silently: a category without generated anomalies for a variant, without real
test anomalies, or (``missing_masks: skip``) with test anomalies that lack masks gets no row but an
entry in ``skipped`` with the reason, and each mean row names the categories it leaves out.
``missing_masks: error`` (the default) fails naming the category and the images.

Resumable like the train stage: each model trains in ``work_root/<key>/<category>/<variant>/<modality>/``
(key = hash of the training settings and the input shards' fingerprints), writes ``ckpt-<step>/``
every ``checkpoint_every`` steps (weights, optimizer, step) and ``final/`` when done; a rerun loads
finished models and resumes unfinished ones at their last checkpoint, to the same weights.
Outputs: ``segment.json`` / ``segment.parquet`` (one row per category, variant and modality plus
``(mean)`` rows; the metric settings next to the numbers), ``models/<category>/<variant>/<modality>/``
(``Segmenter.save_pretrained``; hard links to the work folder's files where possible) and
``strips/<category>.png`` (test images, ground truth and every model's heatmap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hybrid.config import PRECISIONS, check_choices, check_device, check_keys, choice, resolve_device
from hybrid.data.manifest import read_manifest
from hybrid.io import atomic_dir, write_json_atomic, write_parquet_atomic, write_png
from hybrid.metrics.localization import PixelMetrics, binary_metrics, image_score
from hybrid.models.unet import DiscriminativeSubNetwork, Segmenter, UNet, draem_weights_init
from hybrid.seeds import derive_seed
from hybrid.viz import contact_sheet

log = logging.getLogger(__name__)

ARCHS = ("draem", "unet")
DECODER_SETS = {"AHD": ("AHD",), "AHE": ("AHE",), "both": ("AHD", "AHE")}
MODALITIES = ("rgb", "depth", "rgb+depth")
MEAN = "(mean)"
METRICS = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"]
COLUMNS = ["category", "variant", "decoders", "plus_normals", "train_set", "modality", "n_train_anomalies",
           "n_train_normals", "n_generated_normals", "n_test", "n_test_anomalies", *METRICS, "steps", "note"]
# Settings that decide the trained weights (the work folder's key); the rest only change scoring.
TRAINING_KEYS = ("arch", "base_width", "input_size", "epochs", "epoch_length", "batch_size", "lr", "lr_milestones",
                 "lr_gamma", "normal_ratio", "focal_gamma", "flip_lr", "flip_tb", "seed")


@dataclass(frozen=True)
class SegmentConfig:
    """The ``segment`` config section. Defaults: AnomalyDiffusion's localisation recipe (see module doc)."""

    arch: str = choice(ARCHS, "draem")  # draem (DRAEM DiscriminativeSubNetwork, AnomalyDiffusion) | unet (U-Net)
    base_width: int = 64
    variants: tuple[str, ...] = choice(tuple(DECODER_SETS), ("AHD", "AHE", "both"))  # decoders whose anomalies train
    plus_normals: tuple[bool, ...] = (False, True)  # false: AnoHybrid; true: + generated normals (AnoHybrid+)
    depth: str | bool = choice(("auto", True, False), "auto")  # also a depth model from depth_generated (MVTec 3D-AD)
    input_size: int | None = None  # None: the working resolution (draem: rounded up to a multiple of 32)
    epochs: int = 200
    epoch_length: int = 500  # training samples per epoch
    batch_size: int = 8
    lr: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs where the lr is multiplied by lr_gamma
    lr_gamma: float = 0.2
    normal_ratio: float = 0.5  # share of normal training samples
    focal_gamma: float = 2.0
    flip_lr: float = 0.0  # augmentation: probability of a left-right flip (AnomalyDiffusion: none)
    flip_tb: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda[:N]
    precision: str = choice(PRECISIONS, "auto")  # auto: bf16 autocast on cuda, fp32 on cpu
    eval_batch_size: int = 16
    image_box: int = 21  # image score = max of the box x box mean filter of the map; 0: use image_sigma
    image_sigma: float = 0.0  # with image_box 0: Gaussian smoothing before the max (0 = the raw max)
    pixel_bins: int = 65536
    pro_max_fpr: float = 0.3
    test_protocol: str = choice(("eval", "all"), "eval")  # eval: leave out the protocol's base-set test anomalies
    missing_masks: str = choice(("error", "skip"), "error")  # test anomalies without a mask: skip = the category
    strip_images: int = 8  # test images per category on the strip
    checkpoint_every: int = 500  # steps
    log_every: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "plus_normals", tuple(bool(p) for p in self.plus_normals))
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in self.lr_milestones))
        if isinstance(self.depth, str) and self.depth.lower() in ("true", "false"):
            object.__setattr__(self, "depth", self.depth.lower() == "true")
        check_choices(self, "segment")
        check_device(self.device, "segment.device")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"segment.variants {list(self.variants)}: give distinct entries of {list(DECODER_SETS)}")
        if not self.plus_normals or len(set(self.plus_normals)) != len(self.plus_normals):
            raise ValueError(f"segment.plus_normals {list(self.plus_normals)}: give false, true or both, once each")
        for key in ("base_width", "epochs", "epoch_length", "batch_size", "eval_batch_size", "pixel_bins",
                    "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"segment.{key}={getattr(self, key)} must be at least 1")
        if self.input_size is not None and (self.input_size < 8 or (self.arch == "draem" and self.input_size % 32)):
            raise ValueError(f"segment.input_size={self.input_size}: draem needs a multiple of 32 (five max-pools), "
                             "unet at least 8; or null for the working resolution")
        if not (0 <= self.normal_ratio <= 1 and 0 <= self.flip_lr <= 1 and 0 <= self.flip_tb <= 1):
            raise ValueError("segment.normal_ratio, flip_lr and flip_tb are probabilities in [0, 1]")
        if self.image_box < 0 or (self.image_box and self.image_box % 2 == 0) or self.image_sigma < 0:
            raise ValueError(f"segment.image_box={self.image_box} must be 0 or a positive odd size, image_sigma >= 0")
        if not 0 < self.pro_max_fpr <= 1 or self.lr <= 0 or self.lr_gamma <= 0:
            raise ValueError("segment: pro_max_fpr in (0, 1], lr and lr_gamma > 0")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> SegmentConfig:
        return cls(**check_keys(d, cls, "segment"))

    def training(self) -> dict:
        return {k: getattr(self, k) for k in TRAINING_KEYS}


@dataclass(frozen=True)
class Inputs:
    manifest: Path  # results/manifest.parquet
    index: Path  # results/shards/index.parquet (the preprocess shards beside it)
    generated: Path  # results/generated/manifest.parquet (the generated shards beside it)


@dataclass(frozen=True)
class Outputs:
    json: Path  # results/metrics/segment.json
    table: Path  # results/metrics/segment.parquet
    models: Path  # results/segment/models/
    strips: Path  # results/segment/strips/


# ----------------------------------------------------------------------------- data


def read_arrays(rows: pd.DataFrame, shard_dir: Path, fields: Sequence[str]) -> tuple[dict, dict]:
    """Arrays of index rows (sample_id, shard, index), in row order: ``{field: (N, ...)}`` for every field
    some shard holds (zeros where a shard lacks it) and ``{field: (N,) bool}`` saying which rows have it
    (``mask`` follows the preprocess shards' ``has_mask`` strings)."""
    rows = rows.reset_index(drop=True)
    arrays: dict[str, np.ndarray] = {}
    present = {k: np.zeros(len(rows), bool) for k in fields}
    for shard, g in rows.groupby("shard", sort=True):
        pos = g.index.to_numpy()
        idx = g["index"].to_numpy().astype(np.int64)
        order = np.argsort(idx)
        with h5py.File(shard_dir / str(shard), "r") as f:
            for k in fields:
                if k not in f:
                    continue
                if k not in arrays:
                    arrays[k] = np.zeros((len(rows), *f[k].shape[1:]), f[k].dtype)
                arrays[k][pos[order]] = f[k][idx[order]]
                have = np.ones(len(g), bool)
                if k == "mask" and "has_mask" in f:
                    have = f["has_mask"].asstr()[idx[order]] == "1"
                present[k][pos[order]] = have
    return arrays, present


@dataclass
class Pool:
    """Training images of one kind: (N, H, W, 3) uint8 or (N, H, W) uint16, masks (N, H, W) (None = zeros)."""

    images: np.ndarray
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p is not None and len(p)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def to_input(images: np.ndarray) -> torch.Tensor:
    """Stored images -> float (N, C, H, W) in [0, 1]: RGB uint8 / 255, depth uint16 / 65535."""
    a = torch.from_numpy(np.ascontiguousarray(images))
    scale = 65535.0 if images.dtype == np.uint16 else 255.0
    x = a.float() / scale
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]


def resize(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode=mode, **({"align_corners": False} if mode != "nearest" else {}))


def epoch_plan(seed: int, epoch: int, n: int, n_normal: int, n_anomaly: int, cfg: SegmentConfig) -> dict:
    """The ``n`` training samples of one epoch: ``normal`` (bool), ``index`` into its pool, flips."""
    rng = np.random.default_rng([seed, epoch, 7])
    ratio = cfg.normal_ratio if n_normal and n_anomaly else float(n_normal > 0)
    normal = rng.random(n) < ratio
    draw = rng.integers(0, 2**62, n)
    index = np.where(normal, draw % max(n_normal, 1), draw % max(n_anomaly, 1))
    return {"normal": normal, "index": index, "flip_lr": rng.random(n) < cfg.flip_lr,
            "flip_tb": rng.random(n) < cfg.flip_tb}


def make_batch(normals: Pool, anomalies: Pool, plan: dict, lo: int, hi: int, size: int) -> tuple[torch.Tensor, ...]:
    """(x (B, C, S, S) in [0, 1], y (B, 1, S, S) in {0, 1}) for plan entries lo..hi."""
    images, masks = [], []
    for j in range(lo, hi):
        pool = normals if plan["normal"][j] else anomalies
        k = int(plan["index"][j])
        im = pool.images[k]
        m = pool.masks[k] if pool.masks is not None else np.zeros(im.shape[:2], np.uint8)
        if plan["flip_lr"][j]:
            im, m = im[:, ::-1], m[:, ::-1]
        if plan["flip_tb"][j]:
            im, m = im[::-1], m[::-1]
        images.append(np.ascontiguousarray(im))
        masks.append(np.ascontiguousarray(m))
    x = resize(to_input(np.stack(images)), size)
    y = resize(torch.from_numpy(np.stack(masks) > 127).float()[:, None], size, "nearest")
    return x, y


# ----------------------------------------------------------------------------- model, loss, training


def build_model(cfg: SegmentConfig, in_channels: int) -> Segmenter:
    if cfg.arch == "draem":
        model = DiscriminativeSubNetwork(in_channels, 2, cfg.base_width)
        model.apply(draem_weights_init)
        return model
    return UNet(in_channels, 1, cfg.base_width)


def anomaly_probs(out: torch.Tensor) -> torch.Tensor:
    """Network output -> (B, 2, H, W) class probabilities (softmax of two channels, or [1 - p, p] of
    one sigmoid logit), in float32."""
    out = out.float()
    if out.shape[1] == 1:
        p = torch.sigmoid(out)
        return torch.cat([1 - p, p], dim=1)
    return out.softmax(dim=1)


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """DRAEM's (and AnomalyDiffusion's) focal loss on class probabilities (B, 2, H, W) and a {0, 1}
    target (B, 1, H, W): one-hot clamped to [smooth, 1 - smooth], pt = <one-hot, p> + smooth,
    mean of -(1 - pt)^gamma log pt over pixels (alpha 1 for both classes)."""
    t = target[:, 0] > 0.5
    p_true = torch.where(t, probs[:, 1], probs[:, 0])
    pt = (1 - smooth) * p_true + smooth * (1 - p_true) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def lr_at(cfg: SegmentConfig, epoch: int) -> float:
    """``lr`` x ``lr_gamma`` per milestone passed (MultiStepLR stepped once per epoch)."""
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.lr_milestones)
    return cfg.lr * cfg.lr_gamma ** passed


def model_seed(seed: int, *names: str) -> int:
    return derive_seed(seed, *names, bits=32)


class Budget:
    """At most ``steps`` training steps in this call (None: no limit), then stop as if killed."""

    def __init__(self, steps: int | None) -> None:
        self.left = steps

    def spent(self) -> bool:
        return self.left is not None and self.left <= 0

    def spend(self) -> None:
        if self.left is not None:
            self.left -= 1


class Stopped(Exception):
    """The step budget of :class:`Budget` ran out (a test's stand-in for a killed job)."""


def _write_dir(path: Path, write) -> None:
    """Write a directory under a temporary name with ``write(tmp)``, then rename it onto ``path``."""
    with atomic_dir(path) as tmp:
        write(tmp)


def _latest(work: Path) -> Path | None:
    done = sorted(p for p in work.glob("ckpt-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def train_model(normals: Pool, anomalies: Pool, in_channels: int, size: int, cfg: SegmentConfig,
                device: torch.device, precision: str, work: Path, seed: int, budget: Budget,
                what: str) -> Segmenter:
    """Train one model (or load it from ``work/final``, or resume at ``work``'s last checkpoint)."""
    final = work / "final"
    if (final / "model.safetensors").exists():
        log.info("segment: %s: finished model found in %s", what, final)
        return Segmenter.from_pretrained(final, device)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(seed)
    model = build_model(cfg, in_channels).to(device, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    ckpt = _latest(work)
    if ckpt is not None:
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log.info("segment: %s: resumed from %s at step %d", what, ckpt, step)
    per_epoch = math.ceil(cfg.epoch_length / cfg.batch_size)
    total = cfg.epochs * per_epoch
    log.info("segment: %s: %d steps (%d epochs x %d, batch %d) from %d normal and %d anomalous images at %d px, "
             "%s, %.2fM parameters", what, total, cfg.epochs, per_epoch, cfg.batch_size, len(normals),
             len(anomalies), size, device, sum(p.numel() for p in model.parameters()) / 1e6)

    def checkpoint(at: int) -> None:
        def write(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      tmp / "model.safetensors")
            torch.save({"step": at, "optimizer": opt.state_dict()}, tmp / "state.pt")
        _write_dir(work / f"ckpt-{at:08d}", write)
        for old in work.glob("ckpt-*"):
            if old.name < f"ckpt-{at:08d}":
                shutil.rmtree(old, ignore_errors=True)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    plan, plan_epoch, t0, seen = None, -1, time.perf_counter(), 0
    while step < total:
        if budget.spent():
            raise Stopped(f"{what}: stopped at step {step} of {total} by the step budget")
        epoch, k = divmod(step, per_epoch)
        if epoch != plan_epoch:
            plan, plan_epoch = epoch_plan(seed, epoch, cfg.epoch_length, len(normals), len(anomalies), cfg), epoch
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch)
        lo, hi = k * cfg.batch_size, min((k + 1) * cfg.batch_size, cfg.epoch_length)
        x, y = make_batch(normals, anomalies, plan, lo, hi, size)
        x = x.to(device, memory_format=fmt, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast:
            out = model(x)
        loss = focal_loss(anomaly_probs(out), y, cfg.focal_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, seen = step + 1, seen + len(x)
        if step % cfg.log_every == 0 or step == total:
            rate, t0, seen = seen / (time.perf_counter() - t0), time.perf_counter(), 0
            log.info("segment: %s: step %d/%d epoch %d lr %.3g focal %.5f %.1f img/s", what, step, total, epoch,
                     opt.param_groups[0]["lr"], loss.item(), rate)
        if step % cfg.checkpoint_every == 0 or step == total:
            checkpoint(step)
        budget.spend()
    _write_dir(final, lambda tmp: model.save_pretrained(tmp))
    return model.eval()


@torch.no_grad()
def predict(model: Segmenter, images: np.ndarray, size: int, cfg: SegmentConfig, device: torch.device,
            precision: str) -> np.ndarray:
    """(N, R, R) float32 anomaly probabilities of stored images (R = their resolution)."""
    model.eval()
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    res = images.shape[1]
    out = np.zeros((len(images), res, images.shape[2]), np.float32)
    for lo in range(0, len(images), cfg.eval_batch_size):
        x = resize(to_input(images[lo:lo + cfg.eval_batch_size]), size).to(device, memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            raw = model(x)
        p = anomaly_probs(raw)[:, 1:]
        p = F.interpolate(p, size=images.shape[1:3], mode="bilinear", align_corners=False) if p.shape[-1] != res else p
        out[lo:lo + len(x)] = p[:, 0].clamp(0, 1).cpu().numpy()
    return out


def score(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, cfg: SegmentConfig) -> tuple[dict, list[str]]:
    """The seven metrics of one category's test set (NaN with a reason where one cannot be computed)."""
    out = dict.fromkeys(METRICS, math.nan)
    notes = []
    scores = image_score(torch.from_numpy(maps), sigma=cfg.image_sigma, box=cfg.image_box or None)
    try:
        out.update({f"image_{k}": v for k, v in binary_metrics(scores.numpy(), labels).items()})
    except ValueError as e:
        notes.append(f"no image metrics: {e}")
    pixels = PixelMetrics(bins=cfg.pixel_bins, pro=True, max_fpr=cfg.pro_max_fpr)
    for lo in range(0, len(maps), 64):
        pixels.update(maps[lo:lo + 64], masks[lo:lo + 64])
    try:
        out.update(pixels.compute())
    except ValueError as e:
        notes.append(f"no pixel metrics: {e}")
    return out, notes


# ----------------------------------------------------------------------------- strips


def heatmap(amap: np.ndarray) -> np.ndarray:
    """An anomaly map (0..1) as an RGB JET heatmap on a fixed scale (blue 0, red 1)."""
    return cv2.applyColorMap((np.clip(amap, 0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def strip_picks(labels: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` test indices, anomalies first (evenly spread), then about a quarter normals."""
    anom, norm = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    k_norm = min(len(norm), max(1, n // 4)) if n > 1 else 0
    k_anom = min(len(anom), n - k_norm)
    k_norm = min(len(norm), n - k_anom)

    def spread(a: np.ndarray, k: int) -> np.ndarray:
        return a[np.linspace(0, len(a) - 1, k).round().astype(int)] if k else a[:0]
    return np.concatenate([spread(anom, k_anom), spread(norm, k_norm)])


def write_strip(path: Path, images: np.ndarray, masks: np.ndarray, names: list[str],
                maps: dict[str, np.ndarray]) -> None:
    """One PNG: a column per test image; rows image, ground truth, then each model's anomaly map (JET,
    blue 0 to red 1)."""
    tiles, labels = list(images), list(names)
    tiles += [m for m in masks]
    labels += ["ground truth"] * len(masks)
    for name, m in maps.items():
        tiles += [heatmap(a) for a in m]
        labels += [name] * len(m)
    sheet = contact_sheet(tiles, labels, cols=len(images), cell=int(min(max(images.shape[1], 128), 192)))
    write_png(path, sheet)


# ----------------------------------------------------------------------------- the stage


def safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)) or "_"


def variant_name(decoders: str, plus: bool) -> str:
    return f"{decoders}+normals" if plus else decoders


def train_set_name(decoders: str, plus: bool) -> str:
    """Paper 003 Table 2's names: AnoHybrid (both decoders), AnoHybrid+ (and generated normals)."""
    base = "AnoHybrid" if decoders == "both" else f"AnoHybrid ({decoders} only)"
    return base.replace("AnoHybrid", "AnoHybrid+", 1) if plus else base


def _fingerprints(shard_dir: Path, shards: Sequence[str]) -> list[str]:
    out = []
    for s in sorted(set(shards)):
        p = shard_dir / s
        with h5py.File(p, "r") as f:
            fp = f.attrs.get("fingerprint")
        if fp is None:
            st = p.stat()
            fp = f"{s}|{st.st_size}|{st.st_mtime_ns}"
        out.append(str(fp))
    return out


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision if device.type == "cuda" else "fp32"


def _plain(v: object) -> object:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v.item() if hasattr(v, "item") else v


def run(inputs: Inputs, outputs: Outputs, cfg: SegmentConfig | Mapping | None = None,
        work_root: str | Path = "results/segment/work", threads: int = 1, max_steps: int | None = None) -> dict:
    """Train and test every (category, variant, modality); write the outputs; return the JSON content.

    ``max_steps`` stops after that many training steps in this call, raising :class:`Stopped` with
    only the work folder's checkpoints written (as a killed job would leave them)."""
    cfg = cfg if isinstance(cfg, SegmentConfig) else SegmentConfig.from_dict(cfg)
    torch.set_num_threads(max(1, threads))
    inputs = Inputs(*(Path(p) for p in (inputs.manifest, inputs.index, inputs.generated)))
    outputs = Outputs(*(Path(p) for p in (outputs.json, outputs.table, outputs.models, outputs.strips)))
    outputs.strips.mkdir(parents=True, exist_ok=True)  # an output even when every category is skipped
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    real_dir, gen_dir = inputs.index.parent, inputs.generated.parent
    manifest = read_manifest(inputs.manifest)
    index = pd.read_parquet(inputs.index)
    real = manifest.merge(index, on="sample_id")
    gen = pd.read_parquet(inputs.generated)
    gen = gen.assign(category=gen["category"].astype(str), decoder=gen["decoder"].astype(str),
                     kind=gen["kind"].astype(str))

    with h5py.File(real_dir / str(index["shard"].iloc[0]), "r") as f:
        real_fields = set(f.keys())
        resolution = int(f.attrs.get("resolution", f["image"].shape[1]))
    gen_fields: set[str] = set()
    for s in sorted(set(gen["shard"].astype(str))):
        with h5py.File(gen_dir / s, "r") as f:
            gen_fields = set(f.keys()) if not gen_fields else gen_fields & set(f.keys())
    depth_field = "depth_sensor" if "depth_sensor" in real_fields else "depth" if "depth" in real_fields else None
    have_depth = "depth_generated" in gen_fields and depth_field is not None
    if cfg.depth is True and not have_depth:
        raise ValueError("segment.depth: true needs depth-level anomalies (the generated shards' depth_generated "
                         "array: enable train_depth, which makes generate add them) and real depth in the preprocess "
                         f"shards; the generated shards hold {sorted(gen_fields)}, the preprocess shards "
                         f"{sorted(real_fields)}. Set segment.depth: auto or false")
    use_depth = have_depth and cfg.depth is not False
    modalities = ["rgb", "depth", "rgb+depth"] if use_depth else ["rgb"]
    size = cfg.input_size or (math.ceil(resolution / 32) * 32 if cfg.arch == "draem" else resolution)
    key = hashlib.sha256(json.dumps({
        "training": cfg.training(), "device": device.type, "precision": precision, "resolution": resolution,
        "size": size, "depth_field": depth_field if use_depth else None,
        "real": _fingerprints(real_dir, real["shard"].astype(str)),
        "generated": _fingerprints(gen_dir, gen["shard"].astype(str)),
        "ids": hashlib.sha256("\n".join(sorted(gen["sample_id"].astype(str))).encode()).hexdigest(),
    }, sort_keys=True, default=str).encode()).hexdigest()[:16]
    work_root = Path(work_root)
    work = work_root / key
    log.info("segment: %s (base width %d) at %d px (working resolution %d) on %s, %s; modalities %s; depth %s; "
             "work folder %s", cfg.arch, cfg.base_width, size, resolution, device, precision, modalities,
             f"from the real shards' {depth_field!r} and depth_generated" if use_depth else
             "not used (no depth_generated in the generated shards)" if cfg.depth == "auto" else "off", work)

    test_all = real[real["split"] == "test"]
    left_base = 0
    if cfg.test_protocol == "eval" and "protocol" in test_all.columns:
        base = test_all["protocol"].astype("string") == "base"
        left_base = int(base.fillna(False).sum())
        test_all = test_all[~base.fillna(False).astype(bool)]
    local = gen[gen["kind"] == "local"]
    categories = sorted(set(test_all.loc[test_all["label"] == 1, "category"].astype(str)) | set(local["category"]))
    variants = [(d, p) for d in cfg.variants for p in cfg.plus_normals]

    rows, skipped, strips, models = [], [], {}, {}
    budget = Budget(max_steps)
    tmp_models = Path(tempfile.mkdtemp(prefix=".models.", suffix=".partial", dir=_mkdir(outputs.models.parent)))
    try:
        for category in categories:
            result = _category(category, real, test_all, gen, cfg, variants, modalities, depth_field, size, device,
                               precision, work, budget, real_dir, gen_dir, tmp_models, outputs.strips)
            rows += result["rows"]
            skipped += result["skipped"]
            if result.get("strip"):
                strips[category] = str(result["strip"])
            models.update({k: str(outputs.models / v) for k, v in result["models"].items()})
        _publish_models(tmp_models, outputs.models)
    finally:
        shutil.rmtree(tmp_models, ignore_errors=True)

    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    table = pd.concat([table, _means(table, categories, skipped)], ignore_index=True).reindex(columns=COLUMNS)
    for c in ("n_train_anomalies", "n_train_normals", "n_generated_normals", "n_test", "n_test_anomalies", "steps"):
        table[c] = table[c].astype("Int64")
    table["plus_normals"] = table["plus_normals"].astype("boolean")
    per_epoch = math.ceil(cfg.epoch_length / cfg.batch_size)
    result = {
        "stage": "segment",
        "arch": cfg.arch,
        "model": {"arch": cfg.arch, "base_width": cfg.base_width, "input_size": size, "resolution": resolution,
                  "note": ("DRAEM DiscriminativeSubNetwork, 2-channel softmax (AnomalyDiffusion's localisation net)"
                           if cfg.arch == "draem" else "milesial U-Net, one sigmoid logit")},
        "training": {**cfg.training(), "steps": cfg.epochs * per_epoch, "loss": f"focal (gamma {cfg.focal_gamma})",
                     "device": device.type, "precision": precision},
        "metric_settings": {
            "image_score": (f"max of the {cfg.image_box}x{cfg.image_box} mean filter (zero padding) of the anomaly "
                            "map" if cfg.image_box else f"max of the anomaly map smoothed by a Gaussian of sigma "
                                                        f"{cfg.image_sigma}"),
            "image_box": cfg.image_box, "image_sigma": cfg.image_sigma, "image_labels": "manifest label",
            "pixel": f"all test pixels at the working resolution {resolution}; {cfg.pixel_bins} bins over [0, 1]",
            "aupro": f"MVTec AD AU-PRO, 8-connected regions, FPR up to {cfg.pro_max_fpr}, normalised",
            "rgb+depth": "mean of the rgb and depth probability maps, then the same image score",
            "test_protocol": cfg.test_protocol, "base_anomalies_left_out": left_base,
        },
        "modalities": modalities,
        "depth_field": depth_field if use_depth else None,
        "rows": [{k: _plain(v) for k, v in r.items()} for r in table.astype(object).where(table.notna(), None)
                 .to_dict("records")],
        "skipped": skipped,
        "models": models,
        "strips": strips,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
    }
    write_parquet_atomic(table, outputs.table)
    write_json_atomic(outputs.json, result)
    for other in work_root.iterdir() if work_root.is_dir() else []:  # runs of other settings: superseded
        if other.is_dir() and other != work:
            shutil.rmtree(other, ignore_errors=True)
    log.info("segment: wrote %s (%d rows, %d skipped)", outputs.json, len(table), len(skipped))
    return result


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _publish_models(tmp: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` with hard links to ``src``'s files (copies where links are not possible)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)


def _skip(category: str, variant: str, modality: str, reason: str) -> dict:
    log.warning("segment: skipped %s / %s / %s: %s", category, variant, modality, reason)
    return {"category": category, "variant": variant, "modality": modality, "reason": reason}


def _category(category: str, real: pd.DataFrame, test_all: pd.DataFrame, gen: pd.DataFrame, cfg: SegmentConfig,
              variants: list, modalities: list[str], depth_field: str | None, size: int, device: torch.device,
              precision: str, work: Path, budget: Budget, real_dir: Path, gen_dir: Path, tmp_models: Path,
              strips_dir: Path) -> dict:
    out: dict = {"rows": [], "skipped": [], "models": {}}
    test = test_all[test_all["category"].astype(str) == category].sort_values("sample_id").reset_index(drop=True)
    labels = test["label"].astype(int).to_numpy()
    if not (labels == 1).any():
        out["skipped"].append(_skip(category, "all", "all", f"no real test anomalies of category {category!r} in the "
                                    "shards (after the test protocol); nothing to localise"))
        return out
    gcat = gen[gen["category"] == category].sort_values("sample_id")
    kinds, decoders = gcat["kind"].to_numpy(), gcat["decoder"].to_numpy()
    # "both" = every decoder the generator has: one (AHE) when it was built without depth
    made = [d for d in DECODER_SETS["both"] if ((kinds == "local") & (decoders == d)).any()]
    sets = {**DECODER_SETS, "both": tuple(made) or DECODER_SETS["both"]}
    trainable = []
    for dec, plus in variants:
        variant = variant_name(dec, plus)
        missing = [d for d in sets[dec] if not ((kinds == "local") & (decoders == d)).any()]
        if missing:
            reason = (f"no generated local anomalies of category {category!r} from decoder(s) {missing} (the generated "
                      f"manifest has {int((kinds == 'local').sum())} local anomalies of it); generate skipped it or "
                      "its decoders differ")
            out["skipped"] += [_skip(category, variant, m, reason) for m in modalities]
        elif plus and not ((kinds == "normal") & np.isin(decoders, sets[dec])).any():
            out["skipped"] += [_skip(category, variant, m, f"no generated normal images of category {category!r} "
                                     f"from decoder(s) {list(sets[dec])}; AnoHybrid+ needs them "
                                     "(generate.kinds: normal)") for m in modalities]
        else:
            trainable.append((dec, plus))
    if not trainable:
        return out
    depth_fields = [depth_field] if "depth" in modalities else []
    arrays, present = read_arrays(test, real_dir, ["image", "mask", *depth_fields])
    lacking = test.loc[(labels == 1) & ~present["mask"], "sample_id"].astype(str).tolist()
    if lacking:
        shown = ", ".join(lacking[:10]) + (f", ... ({len(lacking) - 10} more)" if len(lacking) > 10 else "")
        why = (f"{len(lacking)} test anomalies of category {category!r} have no ground-truth mask in the preprocess "
               f"shards: {shown}")
        if cfg.missing_masks == "error":
            raise ValueError(f"segment: {why}. Pixel metrics need every anomaly's mask: restore the mask files and "
                             "rerun ingest and preprocess, or set segment.missing_masks: skip to leave the category "
                             "out (listed in segment.json and the report)")
        out["skipped"].append(_skip(category, "all", "all", why))
        return out
    test_masks = arrays.get("mask", np.zeros((len(test), *arrays["image"].shape[1:3]), np.uint8)) > 127
    test_masks[~present["mask"]] = False
    test_depth = arrays.get(depth_field) if depth_fields else None
    if depth_fields and not present[depth_field].all():
        out["skipped"] += [_skip(category, "all", m, f"the preprocess shards hold no {depth_field!r} for some test "
                                 f"images of {category!r}") for m in ("depth", "rgb+depth")]
        modalities, test_depth = ["rgb"], None

    normal_rows = real[(real["category"].astype(str) == category) & (real["split"] == "train") & (real["label"] == 0)]
    normal_rows = normal_rows.sort_values("sample_id")
    n_arrays, n_present = read_arrays(normal_rows, real_dir, ["image", *([depth_field] if test_depth is not None
                                                                          else [])])
    g_fields = ["image", "region", *(["depth_generated"] if test_depth is not None else [])]
    g_arrays, _ = read_arrays(gcat, gen_dir, g_fields)
    if len(normal_rows) == 0:
        log.warning("segment: %s has no real normal training images; the normal pool is %s", category,
                    "the generated normals only" if any(p for _, p in trainable) else "empty")

    picks = strip_picks(labels, cfg.strip_images)
    strip_maps: dict[str, np.ndarray] = {}
    for dec, plus in trainable:
        variant = variant_name(dec, plus)
        sel_a = (kinds == "local") & np.isin(decoders, sets[dec])
        sel_n = (kinds == "normal") & np.isin(decoders, sets[dec]) if plus else np.zeros(len(gcat), bool)
        maps: dict[str, np.ndarray] = {}
        counts = {"n_train_anomalies": int(sel_a.sum()), "n_train_normals": len(normal_rows),
                  "n_generated_normals": int(sel_n.sum()), "n_test": len(test), "n_test_anomalies": int(labels.sum())}
        for modality in [m for m in modalities if m != "rgb+depth"]:
            if modality == "rgb":
                normals = Pool(_cat([n_arrays.get("image"), g_arrays["image"][sel_n]]))
                anomalies = Pool(g_arrays["image"][sel_a], g_arrays["region"][sel_a])
                test_images, channels = arrays["image"], 3
            else:
                normals = Pool(_cat([n_arrays.get(depth_field), g_arrays["depth_generated"][sel_n]]))
                anomalies = Pool(g_arrays["depth_generated"][sel_a], g_arrays["region"][sel_a])
                test_images, channels = test_depth, 1
            folder = work / safe(category) / safe(variant) / modality
            what = f"{category} / {variant} / {modality}"
            model = train_model(normals, anomalies, channels, size, cfg, device, precision, folder,
                                model_seed(cfg.seed, category, variant, modality), budget, what)
            maps[modality] = predict(model, test_images, size, cfg, device, precision)
            dest = tmp_models / safe(category) / safe(variant) / modality
            _link_tree(folder / "final", dest)
            out["models"][f"{category}/{variant}/{modality}"] = str(Path(safe(category)) / safe(variant) / modality)
            del model
        if "rgb+depth" in modalities:
            maps["rgb+depth"] = (maps["rgb"] + maps["depth"]) / 2
        per_epoch = math.ceil(cfg.epoch_length / cfg.batch_size)
        for modality, m in maps.items():
            metrics, notes = score(m, test_masks, labels, cfg)
            out["rows"].append({"category": category, "variant": variant, "decoders": dec, "plus_normals": plus,
                                "train_set": train_set_name(dec, plus), "modality": modality, **counts, **metrics,
                                "steps": cfg.epochs * per_epoch, "note": "; ".join(notes)})
            log.info("segment: %s / %s / %s: image AUROC %.3f AP %.3f F1 %.3f | pixel AUROC %.3f AP %.3f F1 %.3f | "
                     "AU-PRO %.3f", category, variant, modality, *(metrics[k] for k in METRICS))
            strip_maps[f"{variant} {modality}"] = m[picks]
    if strip_maps and len(picks):
        names = [str(test.at[int(i), "defect"]) if "defect" in test and pd.notna(test.at[int(i), "defect"])
                 else ("anomaly" if labels[i] else "normal") for i in picks]
        path = strips_dir / f"{safe(category)}.png"
        _mkdir(strips_dir)
        write_strip(path, arrays["image"][picks], (test_masks[picks] * 255).astype(np.uint8), names, strip_maps)
        out["strip"] = path
    return out


def _means(table: pd.DataFrame, categories: list[str], skipped: list[dict]) -> pd.DataFrame:
    """One ``(mean)`` row per (variant, modality): the mean over the categories with numbers; its note
    names every category left out and why."""
    means = []
    if table.empty:
        return pd.DataFrame(columns=COLUMNS)
    for (variant, modality), part in table.groupby(["variant", "modality"], sort=False):
        scored = set(part.loc[part["pixel_auroc"].notna() | part["image_auroc"].notna(), "category"])
        out = [c for c in categories if c not in scored]
        reasons = []
        for c in out:
            why = next((s["reason"] for s in skipped if s["category"] == c and s["variant"] in (variant, "all")
                        and s["modality"] in (modality, "all")), "no metrics (see its row)")
            reasons.append(f"{c}: {why}")
        first = part.iloc[0]
        note = f"mean over {len(scored)} of {len(categories)} categories"
        if reasons:
            note += "; left out: " + " | ".join(reasons)
        means.append({"category": MEAN, "variant": variant, "decoders": first["decoders"],
                      "plus_normals": first["plus_normals"], "train_set": first["train_set"], "modality": modality,
                      **{k: part[k].mean() for k in METRICS}, "n_test": int(part["n_test"].sum()),
                      "n_test_anomalies": int(part["n_test_anomalies"].sum()), "note": note})
    return pd.DataFrame(means)
