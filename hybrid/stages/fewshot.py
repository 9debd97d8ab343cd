"""The fewshot stage: do generated normal images help a few-shot PatchCore?

Per category and per shot count ``k`` (``fewshot.shots``, e.g. 1, 2, 4, 8 and ``all``):

1. The k real normal images: a seeded permutation of the category's rows matched by
   ``fewshot.select`` (default split train, label 0), and its first k. The draws are nested (the
   1-shot image is among the 2 shots, ...) and never touch the test set: a ``select`` that matches
   any row of ``fewshot.test_select`` is an error. A k larger than the category's normal images is
   an error naming ``fewshot.shots`` and the category (no silent skip: lower the shots, or leave the
   category out with ``fewshot.categories``).
2. Generated normals made from those same k images: the generate stage's ``normal`` kind (global
   generation with reference and target alike) on pairs drawn by its own random pairing
   (:func:`hybrid.planning.pair_samples`) among the k images; k = 1 pairs the image with itself.
   ``generated_per_shot`` x k images (capped at ``max_generated``), one per decoder of each pair, each
   pair with its own seed (``feature_noise`` adds AnomalyFactory's diversity noise). The generator is
   the trained checkpoint (``train_generator: false``, the only setting for now): the *full model*,
   trained on all normal training images of the run, not only on the k shots; every row says so.
3. PatchCore (:mod:`hybrid.models.patchcore`, backbone ``fewshot.backbone``, ResNet-18 as in the
   published table below) fitted on the k real images alone ("PatchCore") and on them plus the
   generated normals ("PatchCore + generated normals"), scored on the category's test rows
   (``fewshot.test_select``, default split test, as the published table; ``test_protocol: eval``
   leaves out the industrial protocol's base-set anomalies, as the segment stage does): image
   AUROC / AP / F1-max from PatchCore's image scores and the manifest labels; pixel AUROC / AP /
   F1-max and AU-PRO
   (:class:`hybrid.metrics.localization.PixelMetrics`) from its anomaly maps, over the test images
   whose ground truth is known (normal images, and anomalies with a mask; an anomaly without one
   counts for the image metrics only, and ``n_test_no_mask`` says how many).

Every row names the backbone and its weights (``real: <file>`` or ``random stand-in (seed s)``:
``weights: auto`` without the file gives the stand-in, ``real`` fails with the model store's
message). :data:`PUBLISHED_PATCHCORE` holds the published PatchCore numbers the report puts beside
ours, only when the run's dataset is MVTec AD (the manifest's ``dataset`` column: the industrial
demo's categories share MVTec's names but not its images).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from hybrid.config import PRECISIONS, WEIGHT_MODES, check_choices, check_device, check_keys, choice, resolve_device
from hybrid.data.manifest import matches
from hybrid.io import write_json_atomic, write_parquet_atomic
from hybrid.models.resnet import ARCHS, LAYERS
from hybrid.seeds import derive_seed

log = logging.getLogger(__name__)

ALL = "all"
METHODS = ("PatchCore", "PatchCore + generated normals")
SETTINGS = ("one-shot", "few-shot", "full-shot")
FULL_MODEL = "full model"

# PatchCore (ResNet-18) image AUROC on MVTec AD, one-shot / few-shot / full-shot, as published in
# the README of "Text-Guided Variational Image Generation for Industrial Anomaly Detection and
# Segmentation" (CVPR 2024; ../shared/papers/001_*.txt, "Results" tables, row "PatchCore |
# ResNet-18"). That README names the metric nowhere and does not say how many shots "few-shot" is;
# its numbers are image-level AUROC in the anomalib sense, by the values. Only these numbers are copied.
PUBLISHED_PATCHCORE = {
    "source": "README of 'Text-Guided Variational Image Generation for Industrial Anomaly Detection and "
              "Segmentation' (CVPR 2024), Results tables, PatchCore / ResNet-18",
    "backbone": "resnet18",
    "metric": "image_auroc",
    "one-shot": {"mean": 0.839, "carpet": 0.936, "grid": 0.649, "leather": 1.000, "tile": 0.993, "wood": 0.989,
                 "bottle": 1.000, "cable": 0.899, "capsule": 0.636, "hazelnut": 0.917, "metal_nut": 0.888,
                 "pill": 0.720, "screw": 0.538, "toothbrush": 0.787, "transistor": 0.718, "zipper": 0.915},
    "few-shot": {"mean": 0.914, "carpet": 0.964, "grid": 0.723, "leather": 1.000, "tile": 0.998, "wood": 0.995,
                 "bottle": 1.000, "cable": 0.956, "capsule": 0.930, "hazelnut": 0.993, "metal_nut": 0.991,
                 "pill": 0.889, "screw": 0.666, "toothbrush": 0.695, "transistor": 0.989, "zipper": 0.924},
    "full-shot": {"mean": 0.978, "carpet": 0.967, "grid": 0.943, "leather": 1.000, "tile": 0.999, "wood": 0.997,
                  "bottle": 1.000, "cable": 0.988, "capsule": 0.972, "hazelnut": 1.000, "metal_nut": 1.000,
                  "pill": 0.925, "screw": 0.961, "toothbrush": 0.957, "transistor": 1.000, "zipper": 0.957},
}

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


@dataclass
class FewShotConfig:
    """The ``fewshot`` config section (``enabled`` is the workflow's: which layouts run the rule)."""

    shots: list[int | str] = field(default_factory=lambda: [1, 2, 4, 8, ALL])
    seed: int = 0
    select: dict[str, object] = field(default_factory=lambda: {"split": "train", "label": 0})
    test_select: dict[str, object] = field(default_factory=lambda: {"split": "test"})
    test_protocol: str = choice(("all", "eval"), "all")  # eval: leave out the industrial protocol's base-set anomalies
    categories: list[str] | None = None  # None or [] = every category with test rows
    backbone: str = choice(tuple(ARCHS), "resnet18")
    layers: list[str] = choice(LAYERS, default_factory=lambda: ["layer2", "layer3"])
    weights: str = choice(WEIGHT_MODES, "auto")
    coreset_ratio: float = 0.1
    num_neighbors: int = 9
    train_generator: bool = False  # true (a generator trained on the k shots alone) is not implemented yet
    generated_per_shot: int = 4  # generated normal images per real shot
    max_generated: int = 256  # at most this many generated images per (category, k)
    feature_noise: float = 0.0  # std of AnomalyFactory's feature noise for the generated normals
    batch_size: int = 16  # PatchCore batches
    generate_batch_size: int = 8
    device: str = "auto"
    precision: str = choice(PRECISIONS, "auto")  # of the generator

    def __post_init__(self) -> None:
        if not self.shots:
            raise ValueError("fewshot.shots is empty; list shot counts such as [1, 2, 4, 8, all]")
        for k in self.shots:
            if k != ALL and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"fewshot.shots {self.shots!r}: each entry is a positive integer or 'all'")
        if len(set(map(str, self.shots))) != len(self.shots):
            raise ValueError(f"fewshot.shots {self.shots!r} repeats an entry")
        if self.train_generator:
            raise ValueError("fewshot.train_generator: true (a generator trained on the k shots alone) is not "
                             "implemented yet; use false (generated normals from the run's trained checkpoint)")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"fewshot.coreset_ratio {self.coreset_ratio} must lie in (0, 1]")
        if self.num_neighbors < 1 or self.batch_size < 1 or self.generate_batch_size < 1:
            raise ValueError("fewshot.num_neighbors, batch_size and generate_batch_size must be >= 1")
        if self.generated_per_shot < 0 or self.max_generated < 0 or self.feature_noise < 0:
            raise ValueError("fewshot.generated_per_shot, max_generated and feature_noise must be >= 0")
        if not self.layers:
            raise ValueError("fewshot.layers is empty; PatchCore uses e.g. [layer2, layer3]")
        check_choices(self, "fewshot")
        check_device(self.device, "fewshot.device")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> FewShotConfig:
        d = check_keys(d, cls, "fewshot", extra=["enabled"])
        d.pop("enabled", None)
        return cls(**d)

    @property
    def generator_label(self) -> str:
        return FULL_MODEL


def setting(k: int | str) -> str:
    """The seed README's row names: 1 shot = one-shot, all = full-shot, else few-shot."""
    return "full-shot" if k == ALL else "one-shot" if int(k) == 1 else "few-shot"


# ----------------------------------------------------------------------------- the draw
def candidates(rows: pd.DataFrame, cfg: FewShotConfig) -> dict[str, list[str]]:
    """Sorted ids of each category's rows matched by ``fewshot.select``; error if any is a test row."""
    chosen = matches(rows, cfg.select, "fewshot.select")
    test = matches(rows, cfg.test_select, "fewshot.test_select")
    clash = rows.loc[chosen & test, "sample_id"].astype(str).tolist()
    if clash:
        raise ValueError(f"fewshot.select {cfg.select} matches {len(clash)} rows of the test set "
                         f"(fewshot.test_select {cfg.test_select}), e.g. {clash[:3]}; the k shots must never "
                         "come from test images: select training images (split: train, label: 0)")
    sub = rows[chosen]
    cats = sub["category"].astype(str)
    return {c: sorted(sub.loc[cats == c, "sample_id"].astype(str)) for c in sorted(cats.unique())}


def draw_shots(ids: Sequence[str], k: int | str, seed: int, category: str) -> list[str]:
    """The k shots of a category: the first k of a permutation seeded by (seed, category), so
    draws for growing k are nested; ``all`` = every id (in permutation order)."""
    order = np.random.default_rng([seed, zlib.crc32(str(category).encode())]).permutation(len(ids))
    if k == ALL:
        return [ids[i] for i in order]
    if int(k) > len(ids):
        raise ValueError(f"fewshot.shots asks for {k} normal training images of category {category!r}, but "
                         f"it has only {len(ids)} (rows of fewshot.select); lower fewshot.shots (or use 'all'), "
                         "or leave the category out with fewshot.categories")
    return [ids[i] for i in order[:int(k)]]


# ----------------------------------------------------------------------------- data
class ShardImages:
    """uint8 images (and masks) of the preprocess shards by sample id, read with h5py."""

    def __init__(self, index_df: pd.DataFrame, shard_dir: Path) -> None:
        self.index = index_df.assign(sample_id=index_df["sample_id"].astype(str)).set_index("sample_id")
        self.shard_dir = shard_dir
        self._files: dict[str, h5py.File] = {}

    def _file(self, shard: str) -> h5py.File:
        if shard not in self._files:
            self._files[shard] = h5py.File(self.shard_dir / shard, "r")
        return self._files[shard]

    def images(self, ids: Sequence[str]) -> np.ndarray:
        return np.stack([self._file(self.index.at[s, "shard"])["image"][int(self.index.at[s, "index"])]
                         for s in ids])

    def mask(self, sample_id: str) -> np.ndarray | None:
        """The stored ground-truth mask (uint8) or None where the shard has none for this sample."""
        f = self._file(self.index.at[sample_id, "shard"])
        i = int(self.index.at[sample_id, "index"])
        if "mask" not in f:
            return None
        if "has_mask" in f and f["has_mask"].asstr()[i] != "1":
            return None
        return f["mask"][i]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


@dataclass
class TestSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) 0/1 from the manifest
    masks: np.ndarray  # (N, H, W) bool; zeros for normal images
    known: np.ndarray  # (N,) bool: ground truth known at pixel level

    @property
    def no_mask(self) -> int:
        return int((~self.known).sum())


def load_test(rows: pd.DataFrame, data: ShardImages, category: str, what: str) -> TestSet:
    ids = rows["sample_id"].astype(str).tolist()
    labels = rows["label"].astype(int).to_numpy()
    if not ids or labels.min() == labels.max():
        raise ValueError(f"fewshot: category {category!r} has {int((labels == 0).sum())} normal and "
                         f"{int((labels == 1).sum())} anomalous test images ({what}); image AUROC needs both")
    images = data.images(ids)
    masks = np.zeros(images.shape[:3], bool)
    known = np.ones(len(ids), bool)
    for i, (s, y) in enumerate(zip(ids, labels)):
        if y == 1:
            m = data.mask(s)
            if m is None:
                known[i] = False
            else:
                masks[i] = m > 127
    return TestSet(images, labels, masks, known)


# ----------------------------------------------------------------------------- generated normals
class Generated:
    """Normal images from the trained generator, for pairs among a set of real images."""

    def __init__(self, checkpoint: str | Path, index_df: pd.DataFrame, shard_dir: Path, cfg: FewShotConfig,
                 device: torch.device) -> None:
        from hybrid.pipeline import load_generator, resolve_precision
        from hybrid.stages.generate import Samples

        self.G = load_generator(checkpoint, device)
        self.precision = resolve_precision(cfg.precision, device)
        self.samples = Samples(index_df, shard_dir)
        self.cfg = cfg
        self.checkpoint = str(checkpoint)

    def pairs(self, shots: Sequence[str], category: str, k_label: str, n_pairs: int) -> list[tuple[str, str]]:
        """(reference, target) pairs among ``shots``: the generate stage's random pairing; one shot
        is paired with itself."""
        from hybrid.planning import PairingConfig, pair_samples

        if n_pairs == 0:
            return []
        if len(shots) == 1:
            return [(shots[0], shots[0])] * n_pairs
        rows = pd.DataFrame({"sample_id": list(shots), "category": category})
        seed = _seed(self.cfg.seed, zlib.crc32(k_label.encode()))
        return [(r, t) for r, t, _ in pair_samples(rows, PairingConfig(count=n_pairs, pairing="random"), seed)]

    def images(self, shots: Sequence[str], category: str, k_label: str, n_images: int) -> np.ndarray:
        """``n_images`` generated normal images (uint8 (n, H, W, 3)), pairs in order, decoders in order."""
        from hybrid.manipulate import ManipulateConfig
        from hybrid.pipeline import generate_batch, to_uint8

        decoders = list(self.G.decoder_names)
        pairs = self.pairs(shots, category, k_label, math.ceil(n_images / len(decoders)))
        out: list[np.ndarray] = []
        bs = self.cfg.generate_batch_size
        for lo in range(0, len(pairs), bs):
            chunk = pairs[lo:lo + bs]
            seeds = [_seed(self.cfg.seed, zlib.crc32(category.encode()), zlib.crc32(k_label.encode()), lo + i)
                     for i in range(len(chunk))]
            res = generate_batch(self.G, [self.samples[r] for r, _ in chunk], [self.samples[t] for _, t in chunk],
                                 ["none"] * len(chunk), seeds, ManipulateConfig(), self.precision,
                                 self.cfg.feature_noise)
            per_decoder = [to_uint8(res[d]["image"]) for d in decoders]
            for i in range(len(chunk)):
                out += [imgs[i] for imgs in per_decoder]
        return np.stack(out[:n_images]) if out else np.zeros((0, 1, 1, 3), np.uint8)

    def close(self) -> None:
        self.samples.data.close()


def _seed(*parts: int | str) -> int:
    return derive_seed(*parts, bits=32)


# ----------------------------------------------------------------------------- scoring
def score(model, test: TestSet) -> dict[str, float]:
    """Image metrics from the model's image scores, pixel metrics and AU-PRO from its maps."""
    from hybrid.metrics.localization import PixelMetrics, binary_metrics

    scores, maps = model.predict(test.images)
    out = {f"image_{k}": v for k, v in binary_metrics(scores, test.labels, "image").items()}
    maps, masks = maps[test.known].numpy(), test.masks[test.known]
    if masks.any() and (~masks).any():
        lo, hi = float(maps.min()), float(maps.max())
        pix = PixelMetrics(lo=lo, hi=hi if hi > lo else lo + 1.0)
        for i in range(0, len(maps), 16):
            pix.update(maps[i:i + 16], masks[i:i + 16])
        out |= pix.compute()
    else:
        out |= {k: float("nan") for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")}
    return out


def run(index: str | Path, manifest: pd.DataFrame, checkpoint: str | Path | None, out_json: str | Path,
        out_table: str | Path, cfg: FewShotConfig, paths: Mapping[str, str] | None = None,
        threads: int | None = None) -> pd.DataFrame:
    """Write ``out_json`` (rows, weights, generator, draws, published numbers) and ``out_table``
    (the rows as parquet); return the rows. ``checkpoint``: the trained generator (None: no
    generated normals, only the PatchCore rows); ``weights``: model-store paths by name (models.paths)."""
    from hybrid.models.patchcore import PatchCore
    from hybrid.models.resnet import load_resnet

    if threads:
        torch.set_num_threads(max(1, threads))
    index = Path(index)
    index_df = pd.read_parquet(index)
    shard_dir = index.parent
    rows = manifest.merge(index_df[["sample_id"]], on="sample_id")
    pool = candidates(rows, cfg)
    test_rows = rows[matches(rows, cfg.test_select, "fewshot.test_select")]
    if cfg.test_protocol == "eval":
        if "protocol" in test_rows.columns:
            base = test_rows["protocol"].astype("string").eq("base").fillna(False).astype(bool)
            log.info("fewshot: test_protocol eval leaves out %d base-set anomalies", int(base.sum()))
            test_rows = test_rows[~base]
        else:
            log.warning("fewshot: test_protocol eval, but the manifest has no protocol column; nothing left out")
    cats = sorted(set(test_rows["category"].astype(str)))
    if cfg.categories:
        unknown = sorted(set(cfg.categories) - set(cats))
        if unknown:
            raise ValueError(f"fewshot.categories {unknown} have no test rows (fewshot.test_select "
                             f"{cfg.test_select}); categories with test rows: {cats}")
        cats = [c for c in cats if c in cfg.categories]
    if not cats:
        raise ValueError(f"fewshot: fewshot.test_select {cfg.test_select} matches no preprocessed sample")
    missing = [c for c in cats if c not in pool]
    if missing:
        raise ValueError(f"fewshot: categories {missing} have test rows but no normal training images "
                         f"(fewshot.select {cfg.select}); leave them out with fewshot.categories")
    draws = {c: {str(k): draw_shots(pool[c], k, cfg.seed, c) for k in cfg.shots} for c in cats}  # errors first
    datasets = sorted(set(test_rows.loc[test_rows["category"].astype(str).isin(cats), "dataset"].astype(str)))
    published = PUBLISHED_PATCHCORE if datasets == ["mvtec_ad"] else None

    device = resolve_device(cfg.device)
    backbone = load_resnet(cfg.backbone, cfg.weights, path=(paths or {}).get(cfg.backbone), seed=cfg.seed)
    log.info("fewshot: %s backbone (%s), layers %s, coreset ratio %g, on %s; categories %s, shots %s",
             cfg.backbone, backbone.weights_label, cfg.layers, cfg.coreset_ratio, device, cats, cfg.shots)
    use_generated = checkpoint is not None and cfg.generated_per_shot > 0 and cfg.max_generated > 0
    gen = Generated(checkpoint, index_df, shard_dir, cfg, device) if use_generated else None
    generator = f"{FULL_MODEL} ({checkpoint}; trained on every normal training image of the run)" if gen else "none"
    data = ShardImages(index_df, shard_dir)
    out: list[dict] = []
    skipped: list[dict] = []
    try:
        for c in cats:
            part = test_rows[test_rows["category"].astype(str) == c]
            labels = part["label"].astype(int)
            if part.empty or labels.min() == labels.max():  # e.g. a plain folder: no normal test images
                why = (f"{int((labels == 0).sum())} normal and {int((labels == 1).sum())} anomalous test images "
                       f"(fewshot.test_select {cfg.test_select}); image AUROC needs both")
                log.warning("fewshot: category %s skipped: %s", c, why)
                skipped.append({"category": c, "reason": why})
                continue
            test = load_test(part, data, c, f"fewshot.test_select {cfg.test_select}")
            log.info("fewshot: %s: %d test images (%d anomalous, %d without a mask), %d normal training images",
                     c, len(test.labels), int(test.labels.sum()), test.no_mask, len(pool[c]))
            for k in cfg.shots:
                shots = draws[c][str(k)]
                real = data.images(shots)
                sets = {METHODS[0]: (real, 0)}
                if gen is not None:
                    n = min(cfg.generated_per_shot * len(shots), cfg.max_generated)
                    t0 = time.perf_counter()
                    fake = gen.images(shots, c, str(k), n)
                    log.info("fewshot: %s, k=%s: %d generated normals in %.1f s", c, k, len(fake),
                             time.perf_counter() - t0)
                    sets[METHODS[1]] = (np.concatenate([real, fake]), len(fake))
                for method, (train, n_gen) in sets.items():
                    t0 = time.perf_counter()
                    model = PatchCore(backbone, tuple(cfg.layers), cfg.coreset_ratio, cfg.num_neighbors,
                                      device=device, seed=cfg.seed, batch_size=cfg.batch_size).fit(train)
                    fit_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    metrics = score(model, test)
                    row = {"dataset": ",".join(datasets), "category": c, "shots": str(k), "k": len(shots),
                           "setting": setting(k), "method": method,
                           "n_real": len(shots), "n_generated": n_gen,
                           "generator": generator if n_gen else "none",
                           "backbone": cfg.backbone, "backbone_weights": backbone.weights_label,
                           **metrics, "n_test": len(test.labels), "n_test_anomalous": int(test.labels.sum()),
                           "n_test_no_mask": test.no_mask, "memory_bank": int(model.memory_bank.shape[0]),
                           "fit_s": round(fit_s, 3), "predict_s": round(time.perf_counter() - t0, 3),
                           "seed": cfg.seed}
                    out.append(row)
                    log.info("fewshot: %s, k=%s, %s: image AUROC %.3f, pixel AUROC %.3f, AU-PRO %.3f "
                             "(bank %d, fit %.1f s)", c, k, method, row["image_auroc"], row["pixel_auroc"],
                             row["aupro"], row["memory_bank"], fit_s)
                    del model
    finally:
        data.close()
        if gen is not None:
            gen.close()
    table = pd.DataFrame(out)
    write_parquet_atomic(table, out_table)
    write_json_atomic(out_json, {
        "rows": _plain(out), "backbone": cfg.backbone, "layers": list(cfg.layers),
        "weights": backbone.weights_label, "generator": generator, "train_generator": cfg.train_generator,
        "shots": [str(k) for k in cfg.shots], "seed": cfg.seed, "categories": cats,
        "draws": draws, "datasets": datasets, "published": published,
        "published_note": None if published else f"the published PatchCore numbers are for MVTec AD; this run's "
                                                   f"dataset is {', '.join(datasets)}",
        "skipped": skipped})
    log.info("fewshot: %d rows to %s and %s", len(out), out_json, out_table)
    return table


def _plain(rows: list[dict]) -> list[dict]:
    """JSON-safe rows: numpy scalars as Python numbers, NaN as null."""
    def one(v):
        if isinstance(v, (np.floating, float)):
            return None if math.isnan(float(v)) else float(v)
        if isinstance(v, np.integer):
            return int(v)
        return v
    return [{k: one(v) for k, v in r.items()} for r in rows]
