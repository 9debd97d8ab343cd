"""The generate stage: global hybrids, local anomalies and normal images from a trained AnomalyHybrid.

Every output comes from a (reference, target) pair: the generator sees the reference RGB with the
target's depth and edge maps, and each decoder (AHD, AHE) gives an image and its fusion mask M
(paper 003, Sec. 3.5, Fig. 2). Three kinds:

- ``global``: the target's maps unchanged: hybrids such as butterflies from two parent subspecies.
- ``local``: the target's maps manipulated inside a region first (:mod:`hybrid.manipulate`); the
  region is stored as the ground-truth anomaly mask.
- ``normal``: as global, with reference and target alike (same category and ``match`` columns),
  to enlarge the normal set (AnoHybrid+).

With a depth-level checkpoint (AnomalyHybrid*, ``depth_checkpoint``), every generated RGB image is
turned into aligned depth-level outputs (paper 003, Sec. 3.1, Fig. 2b): AH* sees the generated
image as its target image and, as its reference depth and edge, the pair target's *unmanipulated*
maps, so the depth anomaly lands where the RGB anomaly is. Its AHD output is stored as
``depth_generated`` (uint16) and its AHE output as ``edge_generated`` (uint8), beside the image.
``feature_noise`` adds AnomalyFactory's diversity noise (paper 002, Sec. 3.3) to the encoded
features, drawn from each pair's seed.

Industrial protocol (paper 003, Sec. 3.5 and 4.1): ``local.source: base`` pairs base-set anomalies
(the manifest's ``protocol == "base"`` rows: the first third of each defect type's test anomalies)
of one category and defect type, and the region is the union of their real ground-truth masks
(the reference's after flip / resize / crop, :func:`hybrid.manipulate.mask_region`); every
output records its ``defect``. ``count`` pairs per category are spread over its defect types in
turn. A defect type with a single base image pairs it with itself (its mask and its moved mask).

Pairs per kind: ``random`` (reference and target drawn from the same category and equal
``match`` columns), ``groups`` (all pairs between two filtered groups of the manifest, both
directions) or ``explicit`` ([reference_id, target_id] lists). Each pair carries its own seed, so
outputs do not depend on the batch size. Shards are written whole under a temporary name and carry
a fingerprint of their pairs, the checkpoint, the input shards and the settings, so a rerun keeps
the finished ones. ``hybrid generate`` (see :func:`add_cli`) does the same for two image files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from hybrid.config import check_keys, resolve_device
from hybrid.data.manifest import matches
from hybrid.data.shards import ShardDataset, read_attrs, shard_is_current, shard_name, to_unit, write_shard
from hybrid.io import atomic_path, write_parquet_atomic
from hybrid.manipulate import MANIPULATED, ManipulateConfig, check_manipulation, local_anomaly
from hybrid.models.generator import Generator
from hybrid.planning import KINDS, Job, PairingConfig, _rng, _seed, plan_jobs, safe_name  # noqa: F401
from hybrid.viz import contact_sheet

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["sample_id", "shard", "index", "pair_id", "reference_id", "target_id", "decoder",
                    "manipulation", "category", "defect", "kind", "label"]
_STRINGS = ["sample_id", "pair_id", "reference_id", "target_id", "decoder", "manipulation", "category", "defect",
            "kind"]


@dataclass
class GenerateConfig:
    """The generate section: which kinds, from which samples, how many, on what device."""

    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    select: dict[str, object] = field(default_factory=lambda: {"split": "train", "label": 0})
    pairings: dict[str, PairingConfig] = field(default_factory=lambda: {k: PairingConfig() for k in KINDS})
    manipulate: ManipulateConfig = field(default_factory=ManipulateConfig)
    batch_size: int = 8
    workers: int = 0  # DataLoader processes that read pairs and draw the manipulations
    shard_size: int = 1024
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16
    sheet_rows: int = 4  # pairs per kind on each category's contact sheet
    feature_noise: float = 0.0  # std of the noise added to the encoded features (AnomalyFactory)
    chunks: int = 1  # the workflow's scatter: this many jobs, each writing a range of shards, then a gather

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"generate.kinds {bad} unknown; use some of {list(KINDS)}")
        if self.precision not in ("auto", "fp32", "bf16") or self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"generate device {self.device!r} / precision {self.precision!r}: use device "
                             "auto|cpu|cuda and precision auto|fp32|bf16")
        if self.batch_size < 1 or self.shard_size < 1 or self.sheet_rows < 0 or self.workers < 0 or self.chunks < 1:
            raise ValueError("generate.batch_size, shard_size and chunks must be >= 1, sheet_rows and workers >= 0")
        if self.feature_noise < 0:
            raise ValueError(f"generate.feature_noise {self.feature_noise} must be >= 0 (a standard deviation)")

    @classmethod
    def from_dict(cls, d: Mapping) -> GenerateConfig:
        """From the config section, where each kind's pairing sits under its own key."""
        d = dict(d)
        pairings = {k: PairingConfig.from_dict(d.pop(k, {}) or {}, k) for k in KINDS}
        manipulate = ManipulateConfig.from_dict(d.pop("manipulate", {}) or {})
        check_keys(d, cls, "generate", extra=KINDS, hidden=("pairings",))
        return cls(**d, pairings=pairings, manipulate=manipulate)


# ----------------------------------------------------------------------------- the generator
def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        log.info("generate: bf16 autocast is only used on CUDA; running fp32 on %s", device)
        return "fp32"
    return precision


def load_generator(checkpoint: str | Path, device: torch.device, level: str = "rgb") -> Generator:
    """The checkpoint's generator of ``level`` (rgb or depth) on ``device``, in eval mode."""
    from hybrid.train import load_checkpoint

    what = "generate's checkpoint" if level == "rgb" else "generate's depth-level checkpoint"
    G = load_checkpoint(checkpoint, level=level, purpose=what)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return G.to(device, memory_format=fmt).eval()


def conditions(reference: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], manipulation: str,
               seed: int, cfg: ManipulateConfig,
               masks: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The named maps of one pair: ``reference_*`` as given, ``target_edge``/``target_depth`` as fed
    (manipulated inside the region for a local anomaly) and ``region`` (1, H, W) bool.

    Items hold ``image`` (3, H, W) and ``edge``/``depth`` (1, H, W) in [-1, 1]. ``manipulation``:
    "none" (global / normal) or a manipulation name, drawn with ``np.random.default_rng(seed)``.
    ``masks`` (target, reference) (H, W): the region comes from these real defect masks.
    """
    if manipulation == "none":
        maps = {k: v for k, v in target.items() if k in MANIPULATED}
        region = torch.zeros(1, *target["image"].shape[-2:], dtype=torch.bool)
    else:
        maps, region = local_anomaly(target, reference, manipulation, np.random.default_rng(seed), cfg, masks)
    return {**{f"reference_{k}": v for k, v in reference.items()}, **{f"target_{k}": v for k, v in maps.items()},
            "region": region.cpu()}


def feature_noise(G: Generator, seed: int, std: float, height: int, width: int) -> torch.Tensor:
    """AnomalyFactory's diversity noise for one pair: N(0, std^2) of the encoded features' shape,
    drawn from the pair's seed (so an output does not depend on its batch)."""
    g = torch.Generator().manual_seed(_seed(seed, 7))
    return torch.randn(G.feature_shape(height, width), generator=g) * std


@torch.inference_mode()
def run_generator(G: Generator, batch: Mapping[str, torch.Tensor], precision: str = "fp32") -> dict:
    """Each decoder's ``{"image": (B, 3, H, W) in [-1, 1], "mask": (B, 1, H, W)}`` as CPU float
    tensors, for stacked named maps (``conditions`` of several pairs); bf16 autocast if asked.
    A ``feature_noise`` entry (B, C, h, w) is added to the encoded features."""
    out = _forward(G, batch, precision)
    return {d: {"image": o["image"].float().clamp(-1, 1).cpu(), "mask": o["mask"].float().clamp(0, 1).cpu()}
            for d, o in out.items()}


def _forward(G: Generator, batch: Mapping[str, torch.Tensor], precision: str) -> dict:
    """G on its device over stacked named maps (+ ``feature_noise``), bf16 autocast if asked."""
    device = next(G.parameters()).device
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = G.inputs(batch).to(device, memory_format=fmt, non_blocking=True)
    noise = batch.get("feature_noise")
    noise = noise.to(device, non_blocking=True) if noise is not None else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = G(x, noise)
    return out


def generate_batch(G: Generator, references: Sequence[Mapping[str, torch.Tensor]],
                   targets: Sequence[Mapping[str, torch.Tensor]], manipulations: Sequence[str],
                   seeds: Sequence[int], cfg: ManipulateConfig, precision: str = "fp32",
                   noise: float = 0.0, G_star: Generator | None = None) -> dict:
    """:func:`conditions` of each pair, stacked, plus :func:`run_generator`'s outputs per decoder:
    ``{"target_edge", "target_depth", "region", ..., "AHD": {"image", "mask"}, "AHE": {...}}``;
    with ``G_star`` each decoder's entry also holds ``depth_generated`` / ``edge_generated``."""
    items = [conditions(r, t, m, s, cfg) for r, t, m, s in zip(references, targets, manipulations, seeds, strict=True)]
    for it, t, s in zip(items, targets, seeds):
        if noise:
            it["feature_noise"] = feature_noise(G, s, noise, *t["image"].shape[-2:])
        if G_star is not None:
            it |= {f"source_{k}": t[k] for k in ("depth", "edge")}
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    out = run_generator(G, batch, precision)
    if G_star is not None:
        add_depth_level(G_star, batch, out, precision)
    return {**batch, **out}


def add_depth_level(G_star: Generator, batch: Mapping[str, torch.Tensor], out: dict, precision: str) -> None:
    """AH* on each decoder's generated image (paper 003, Fig. 2b): target_image = that image,
    reference depth / edge = the pair target's unmanipulated maps (``source_depth`` /
    ``source_edge``); adds ``depth_generated`` (AH*'s AHD) and ``edge_generated`` (its AHE)."""
    for d, o in out.items():
        star = run_generator(G_star, {"target_image": o["image"], "reference_depth": batch["source_depth"],
                                      "reference_edge": batch["source_edge"]}, precision)
        if "AHD" in star:
            o["depth_generated"] = star["AHD"]["image"]
        if "AHE" in star:
            o["edge_generated"] = star["AHE"]["image"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), or (B, H, W) for one channel."""
    return _uint8_tensor(x).numpy()


def _uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`to_uint8` as a tensor on ``x``'s device (a view with channels last)."""
    a = x.float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8).permute(0, 2, 3, 1)
    return a[..., 0] if a.shape[-1] == 1 else a


def _depth_uint16(x: torch.Tensor) -> np.ndarray:
    return _depth_int32(x).numpy().astype(np.uint16)


def _depth_int32(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 1, H, W) -> (B, H, W) int32 in 0..65535 (stored as uint16), on ``x``'s device."""
    return x[:, 0].float().clamp(-1, 1).add_(1).mul_(32767.5).round_().to(torch.int32)


# ----------------------------------------------------------------------------- the stage
def part_range(n: int, part: int, parts: int) -> range:
    """The ``part``-th (0-based) of ``parts`` contiguous ranges that split ``range(n)`` evenly."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: need 0 <= part < parts")
    return range(part * n // parts, (part + 1) * n // parts)


def generate(checkpoint: str | Path, index: str | Path, manifest: pd.DataFrame, out_dir: str | Path,
             cfg: GenerateConfig, depth_checkpoint: str | Path | None = None,
             part: tuple[int, int] | None = None, gather: bool = False) -> pd.DataFrame:
    """Write ``out_dir/shard-*.h5``, ``out_dir/manifest.parquet`` and ``out_dir/sheets/<category>.png``.

    ``index`` is the preprocess stage's index.parquet (its shards beside it); ``manifest`` the
    ingest manifest (for categories and the ``select`` / group filters). ``depth_checkpoint``: an
    AnomalyHybrid* checkpoint (train_depth) that adds aligned ``depth_generated`` /
    ``edge_generated`` maps to every image. Returns the generated manifest. Shards whose
    fingerprint matches are kept.

    ``part`` = (k, K): write only the k-th of K contiguous ranges of shards (one job of the
    workflow's scatter, ``generate.chunks``) and return their rows. ``gather``: after the K parts,
    write no shard (each must be there) and write the manifest and the sheets as one job would;
    the parts' device and precision are theirs (a gather on a CPU node does not redo GPU shards).
    """
    index = Path(index)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_df = pd.read_parquet(index)
    shard_dir = index.parent
    rows = manifest.merge(index_df[["sample_id"]], on="sample_id")
    jobs = plan_jobs(rows, cfg)
    if not jobs:
        raise ValueError(f"generate: no pairs to generate from {len(rows)} preprocessed samples (select "
                         f"{cfg.select}, kinds {cfg.kinds}); check generate.select, the counts and the pairings")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    decoders = json.loads((Path(checkpoint) / "config.json").read_text())["model"].get("decoders", ["AHD", "AHE"])
    per_shard = max(1, cfg.shard_size // len(decoders))
    chunks = [jobs[i:i + per_shard] for i in range(0, len(jobs), per_shard)]
    mine = part_range(len(chunks), *part) if part is not None else range(len(chunks))
    star_depth = None
    if depth_checkpoint is not None:
        load_generator(depth_checkpoint, torch.device("cpu"), level="depth")  # the level, before any work
        star_depth = json.loads((Path(depth_checkpoint) / "config.json").read_text()).get("data", {}).get(
            "depth_field", "depth")
    if gather:
        missing = [shard_name(i) for i in range(len(chunks)) if not (out_dir / shard_name(i)).exists()]
        if missing:
            raise FileNotFoundError(f"generate gather: {len(missing)} shards are missing in {out_dir} "
                                    f"({', '.join(missing[:5])}); rerun the generate_chunk jobs that write them")
        todo: list[int] = []
    else:
        base = _fingerprint(checkpoint, shard_dir, index_df, cfg, device, precision)
        if depth_checkpoint is not None:
            base = _fingerprint(depth_checkpoint, shard_dir, index_df, cfg, device, precision, base)
        prints = [hashlib.sha256((base + json.dumps([dataclasses.astuple(j) for j in c])).encode()).hexdigest()
                  for c in chunks]
        todo = [i for i in mine if not shard_is_current(out_dir / shard_name(i), prints[i])]
    log.info("generate: %d pairs (%s) x %d decoders in %d shards (%s%d to write, %d kept) on %s, %s",
             len(jobs), ", ".join(f"{k} {sum(j.kind == k for j in jobs)}" for k in cfg.kinds), len(decoders),
             len(chunks), f"part {part[0] + 1} of {part[1]}: shards {mine.start}-{mine.stop - 1}, " if part else "",
             len(todo), len(mine) - len(todo), device, precision)
    samples = Samples(index_df, shard_dir, star_depth)
    if todo:
        G = load_generator(checkpoint, device)
        G_star = load_generator(depth_checkpoint, device, "depth") if depth_checkpoint is not None else None
        attrs = {k: v for k, v in read_attrs(shard_dir / index_df["shard"].iloc[0]).items()
                 if k in ("resolution", "fit", "edge_model", "depth_source")}
        attrs["checkpoint"] = str(checkpoint)
        if depth_checkpoint is not None:
            attrs["depth_checkpoint"] = str(depth_checkpoint)
        bar = tqdm(total=sum(len(chunks[i]) for i in todo) * len(decoders), desc="generate", unit="img")
        _write_shards([(out_dir / shard_name(i), chunks[i], {**attrs, "fingerprint": prints[i]}) for i in todo],
                      G, samples, cfg, precision, bar, G_star)
        bar.close()
    if part is not None:
        samples.data.close()
        if not len(mine):
            return pd.DataFrame(columns=MANIFEST_COLUMNS)
        return read_generated([out_dir / shard_name(i) for i in mine])
    for stale in out_dir.glob("shard-*.h5"):
        if int(stale.stem.split("-")[1]) >= len(chunks):
            stale.unlink()
    result = read_generated([out_dir / shard_name(i) for i in range(len(chunks))])
    write_parquet_atomic(result, out_dir / "manifest.parquet")
    for c in result["category"].unique():
        write_sheet(out_dir / "sheets" / f"{safe_name(c)}.png", result[result["category"] == c], out_dir,
                    samples, cfg.sheet_rows)
    samples.data.close()
    log.info("generate: %d images in %s", len(result), out_dir)
    return result


class Samples:
    """The preprocess stage's samples by sample id: ``samples[id]`` gives model-range tensors
    (image (3, H, W), edge / depth (1, H, W) in [-1, 1]), ``samples.raw(id)`` the stored arrays.

    ``star_depth``: the shard array AH* learned its depth from (``depth`` or ``depth_sensor``);
    given, items also hold ``star_depth`` (the pair target's reference depth for AH*)."""

    def __init__(self, index_df: pd.DataFrame, shard_dir: Path, star_depth: str | None = None) -> None:
        with h5py.File(shard_dir / index_df["shard"].iloc[0], "r") as f:
            fields = [k for k in ("image", "edge", "depth") if k in f]
            if star_depth is not None:
                needed = ["edge", star_depth]
                if any(k not in f for k in needed):
                    raise ValueError(f"the depth-level checkpoint needs the shards' {needed} arrays, but "
                                     f"{shard_dir / index_df['shard'].iloc[0]} has {sorted(f)}; preprocess with "
                                     "an edge model and the depth it was trained on")
                fields += [star_depth] if star_depth not in fields else []
        self.star_depth = star_depth
        self.data = ShardDataset(index_df, fields, shard_dir, raw=True)
        self.pos = {s: i for i, s in enumerate(index_df["sample_id"])}
        self._where = list(zip(index_df["shard"].astype(str), index_df["index"].astype(int)))
        self._arrays: dict[tuple[str, str], h5py.Dataset] = {}
        self._pid = os.getpid()

    def _array(self, shard: str, name: str) -> h5py.Dataset:
        """The shard's dataset ``name``, opened once per process (DataLoader workers get their own)
        and without a chunk cache: each sample is one chunk, read when asked (an open dataset's
        default 1 MiB cache, kept for every input shard, would grow with the data set)."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        a = self._arrays.get((shard, name))
        if a is None:
            access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            access.set_chunk_cache(0, 0, 1.0)
            a = h5py.Dataset(h5py.h5d.open(self.data._file(shard).id, name.encode(), access))
            self._arrays[shard, name] = a
        return a

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def raw(self, sample_id: str) -> dict:
        shard, j = self._where[self.pos[sample_id]]
        return {"sample_id": str(sample_id), **{k: self._array(shard, k)[j] for k in self.data.fields}}

    def mask(self, sample_id: str) -> np.ndarray:
        """The sample's ground-truth mask (H, W) bool; a clear error when the shards hold none."""
        row = self.data.index.iloc[self.pos[sample_id]]
        f = self.data._file(row["shard"])
        has = f["has_mask"].asstr()[int(row["index"])] == "1" if "has_mask" in f else "mask" in f
        if "mask" not in f or not has:
            raise ValueError(f"base-set anomaly {sample_id} has no ground-truth mask in {row['shard']}; defect-aware "
                             "local anomalies take their regions from the masks (check the dataset's mask files, "
                             "or use generate.local.source: select)")
        return f["mask"][int(row["index"])] > 127

    def __getitem__(self, sample_id: str) -> dict[str, torch.Tensor]:
        item = self.raw(sample_id)
        out = {k: _unit(item[k], k) for k in self.data.fields if k in ("image", "edge", "depth")}
        if self.star_depth is not None:
            out["star_depth"] = _unit(item[self.star_depth], self.star_depth)
        return out


def _unit(a: np.ndarray, name: str) -> torch.Tensor:
    """:func:`hybrid.data.shards.to_unit` computed in place on one float copy: the same values."""
    scale = 65535.0 if name.startswith("depth") or a.dtype == np.uint16 else 255.0
    t = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).mul_(2.0 / scale).sub_(1.0)
    return t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)


class PairConditions(torch.utils.data.Dataset):
    """The :func:`conditions` of each job, so a DataLoader prepares them in worker processes.

    ``encoded``: items also hold the fed maps and the region as the shards store them
    (``stored_region``, ``stored_edge`` uint8 (H, W), ``stored_depth`` int32 (H, W), the uint16
    values), so the workers, not the main process, convert them."""

    def __init__(self, jobs: Sequence[Job], samples: Samples, cfg: ManipulateConfig,
                 G: Generator | None = None, noise: float = 0.0, encoded: bool = False) -> None:
        self.jobs, self.samples, self.cfg, self.G, self.noise = list(jobs), samples, cfg, G, noise
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.jobs[i]
        ref, tgt = self.samples[j.reference_id], self.samples[j.target_id]
        star_depth = tgt.pop("star_depth", None)
        ref.pop("star_depth", None)
        masks = (self.samples.mask(j.target_id), self.samples.mask(j.reference_id)) if j.defect else None
        item = conditions(ref, tgt, j.manipulation, j.seed, self.cfg, masks)
        if star_depth is not None:  # AH*'s reference maps: the target's unmanipulated depth and edge
            item |= {"source_depth": star_depth, "source_edge": tgt["edge"]}
        if self.noise:
            item["feature_noise"] = feature_noise(self.G, j.seed, self.noise, *tgt["image"].shape[-2:])
        if self.encoded:
            item["stored_region"] = item["region"][0].to(torch.uint8) * 255
            if "target_edge" in item:
                item["stored_edge"] = _uint8_tensor(item["target_edge"][None])[0]
            if "target_depth" in item:
                item["stored_depth"] = _depth_int32(item["target_depth"][None])[0]
        return item


# Shard arrays in the order they are written; "edge" / "depth" are the fed maps.
_ARRAYS = ("image", "mask", "region", "edge", "depth", "depth_generated", "edge_generated")
_DTYPES = {"depth": np.uint16, "depth_generated": np.uint16}


@torch.inference_mode()
def _encode(G: Generator, batch: Mapping[str, torch.Tensor], precision: str,
            G_star: Generator | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Each decoder's outputs as the shards store them, computed on G's device (asynchronously on
    a GPU): ``image`` uint8 (B, H, W, C), ``mask`` uint8 (B, H, W), with AH* ``depth_generated``
    int32 (B, H, W) (the uint16 values) and ``edge_generated`` uint8 (B, H, W). The same numbers as
    :func:`run_generator` (+ :func:`add_depth_level`) followed by :func:`to_uint8`: the same
    elementwise operations, on the device instead of the host."""
    device = next(G.parameters()).device
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    out = _forward(G, batch, precision)
    star_maps = None
    if G_star is not None:
        star_maps = {k: batch[f"source_{k}"].to(device, non_blocking=True) for k in ("depth", "edge")}
    result = {}
    for d, o in out.items():
        enc = {"image": _uint8_tensor(o["image"]).contiguous(),
               "mask": o["mask"][:, 0].float().clamp(0, 1).mul_(255).round_().to(torch.uint8)}
        if G_star is not None:
            image = o["image"].float().clamp(-1, 1)
            xs = G_star.inputs({"target_image": image, "reference_depth": star_maps["depth"],
                                "reference_edge": star_maps["edge"]}).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                star = G_star(xs)
            if "AHD" in star:
                enc["depth_generated"] = _depth_int32(star["AHD"]["image"].float().clamp(-1, 1))
            if "AHE" in star:
                enc["edge_generated"] = _uint8_tensor(star["AHE"]["image"].float().clamp(-1, 1)).contiguous()
        result[d] = enc
    return result


class _Shard:
    """One output shard filled a batch at a time: preallocated arrays, rows pair-major (each pair's
    decoders in turn), and the string columns, known from the jobs up front."""

    def __init__(self, path: Path, jobs: list[Job], attrs: dict, decoders: list[str]) -> None:
        self.path, self.jobs, self.attrs, self.decoders = path, jobs, attrs, decoders
        self.filled = 0  # pairs
        self.arrays: dict[str, np.ndarray] = {}
        self.strings: dict[str, list[str]] = {k: [] for k in _STRINGS}
        for j in jobs:
            for d in decoders:
                for key, value in (("sample_id", f"{j.pair_id}-{d}"), ("pair_id", j.pair_id),
                                   ("reference_id", j.reference_id), ("target_id", j.target_id), ("decoder", d),
                                   ("manipulation", j.manipulation), ("category", j.category),
                                   ("defect", j.defect), ("kind", j.kind)):
                    self.strings[key].append(value)

    def fill(self, per_decoder: Mapping[str, Mapping[str, np.ndarray]], fed: Mapping[str, np.ndarray]) -> int:
        """Store the next batch: ``per_decoder[d][name]`` (B, ...) and the fed maps ``fed[name]``
        (B, ...), shared by the decoders of a pair. Returns the batch's pair count."""
        nd = len(self.decoders)
        first = per_decoder[self.decoders[0]]
        b = len(first["image"])
        if not self.arrays:
            present = {**first, **fed}
            for name in _ARRAYS:
                if name in present:
                    shape = (len(self.jobs) * nd, *present[name].shape[1:])
                    self.arrays[name] = np.empty(shape, _DTYPES.get(name, np.uint8))
        rows = slice(self.filled * nd, (self.filled + b) * nd)
        for name, a in self.arrays.items():
            view = a[rows].reshape(b, nd, *a.shape[1:])
            if name in fed:
                view[:] = fed[name][:, None]
            else:
                for k, d in enumerate(self.decoders):
                    view[:, k] = per_decoder[d][name]
        self.filled += b
        return b

    @property
    def full(self) -> bool:
        return self.filled == len(self.jobs)

    def write(self) -> None:
        write_shard(self.path, self.arrays, self.strings, self.attrs)
        log.info("generate: wrote %s (%d images)", self.path.name, len(self.strings["sample_id"]))


def _write_shards(shards: list[tuple[Path, list[Job], dict]], G: Generator, samples: Samples, cfg: GenerateConfig,
                  precision: str, bar: tqdm, G_star: Generator | None = None) -> None:
    """Generate and write ``shards`` ((path, jobs, attrs) each). One DataLoader reads the pairs of
    all of them (workers start once); each shard's jobs are cut into batches of
    ``cfg.batch_size`` as a shard of its own would be (so outputs never depend on which shards are
    written together). Outputs are encoded on the device; on a GPU, the copy back of one batch
    overlaps the next batch's work. A finished shard is written in a background thread while the
    next one is generated (one write in flight, so at most two shards are held)."""
    cuda = next(G.parameters()).device.type == "cuda"
    jobs = [j for _, js, _ in shards for j in js]
    batches, start = [], 0
    for _, js, _ in shards:
        batches += [list(range(start + k, start + min(k + cfg.batch_size, len(js))))
                    for k in range(0, len(js), cfg.batch_size)]
        start += len(js)
    data = PairConditions(jobs, samples, cfg.manipulate, G, cfg.feature_noise, encoded=True)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.workers, pin_memory=cuda)
    todo = iter(shards)
    shard = _Shard(*next(todo), G.decoder_names)
    writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    writing: Future | None = None
    held = None  # the previous batch: its encoded outputs (copies to the host in flight) and fed maps

    def store(item: tuple) -> None:
        nonlocal shard, writing
        outputs, fed, ready = item
        if ready is not None:
            ready.synchronize()
        n = shard.fill({d: {k: v.numpy() for k, v in o.items()} for d, o in outputs.items()}, fed)
        bar.update(n * len(shard.decoders))
        if shard.full:
            if writing is not None:
                writing.result()  # one write at a time; raises its error here
            writing = writer.submit(shard.write)
            nxt = next(todo, None)
            shard = _Shard(*nxt, G.decoder_names) if nxt is not None else None

    try:
        for batch in loader:
            outputs = _encode(G, batch, precision, G_star)
            ready = None
            if cuda:  # copy back into pinned memory without waiting; the event says when it is there
                outputs = {d: {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                               for k, v in o.items()} for d, o in outputs.items()}
                ready = torch.cuda.Event()
                ready.record()
            fed = {"region": batch["stored_region"].numpy()}
            for name in ("edge", "depth"):
                if f"stored_{name}" in batch:
                    fed[name] = batch[f"stored_{name}"].numpy()
            if held is not None:
                store(held)
            held = (outputs, fed, ready)
        if held is not None:
            store(held)
        if writing is not None:
            writing.result()
    finally:
        writer.shutdown(wait=True)  # a write in progress finishes (whole, under its temporary name)


def _fingerprint(checkpoint: str | Path, shard_dir: Path, index_df: pd.DataFrame, cfg: GenerateConfig,
                 device: torch.device, precision: str, salt: str = "") -> str:
    """Hash of what every output depends on besides its pair: manipulation settings, feature noise,
    device type, precision, the checkpoint (config and weight file identity) and the input shards'
    identities."""
    ckpt = Path(checkpoint)
    h = hashlib.sha256(salt.encode() + json.dumps(dataclasses.asdict(cfg.manipulate), sort_keys=True).encode())
    if cfg.feature_noise:
        h.update(f"noise {cfg.feature_noise}|".encode())
    h.update(f"{device.type}|{precision}|".encode())
    h.update((ckpt / "config.json").read_bytes())
    for p in [ckpt / "model.safetensors", *(shard_dir / s for s in sorted(index_df["shard"].unique()))]:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(pd.util.hash_pandas_object(index_df, index=False).values.tobytes())
    return h.hexdigest()



def read_generated(shards: Sequence[Path]) -> pd.DataFrame:
    """The generated manifest: one row per image, from the shards' string datasets."""
    frames = []
    for p in shards:
        with h5py.File(p, "r") as f:
            n = len(f["sample_id"])
            df = pd.DataFrame({k: f[k].asstr()[:] if k in f else [""] * n for k in _STRINGS})
        frames.append(df.assign(shard=p.name, index=np.arange(len(df), dtype=np.int64)))
    df = pd.concat(frames, ignore_index=True)
    df["label"] = (df["kind"] != "normal").astype("int8")
    df["defect"] = df["defect"].replace("", None)
    return df[MANIFEST_COLUMNS].astype({c: "string" for c in _STRINGS})


def write_sheet(path: Path, rows: pd.DataFrame, out_dir: Path, samples: Samples, pairs_per_kind: int) -> None:
    """A PNG of one category: per pair, reference | target | fed edge, depth | region | per decoder
    image and mask M; ``pairs_per_kind`` pairs of each kind."""
    rows = rows.reset_index(drop=True)
    with h5py.File(out_dir / rows["shard"].iloc[0], "r") as f:
        fields = [k for k in ("image", "mask", "region", "edge", "depth") if k in f]
    gen = ShardDataset(rows, fields, out_dir, raw=True)
    images: list[np.ndarray] = []
    labels: list[str] = []
    cols = 1
    for kind in KINDS:
        for pair in list(dict.fromkeys(rows.loc[rows["kind"] == kind, "pair_id"]))[:pairs_per_kind]:
            idx = np.flatnonzero((rows["pair_id"] == pair).to_numpy())
            items = [gen[int(i)] for i in idx]
            first = rows.iloc[idx[0]]
            row = [samples.raw(first["reference_id"])["image"], samples.raw(first["target_id"])["image"]]
            names = ["reference", f"target ({kind})"]
            for k in ("edge", "depth"):
                if k in items[0]:
                    row.append(items[0][k])
                    names.append(f"fed {k}")
            row.append(items[0]["region"])
            names.append(f"region ({first['manipulation']})")
            for i, item in zip(idx, items):
                d = rows.at[int(i), "decoder"]
                row += [item["image"], item["mask"]]
                names += [d, f"{d} M"]
            images += [a.astype(np.float32) / 65535 if a.dtype == np.uint16 else a for a in row]
            labels += names
            cols = max(cols, len(row))
    gen.close()
    if images:
        sheet = contact_sheet(images, labels, cols=cols, cell=128)
        with atomic_path(path) as tmp:
            Image.fromarray(sheet).save(tmp, format="PNG")


# ----------------------------------------------------------------------------- one-off use
DEFAULT_DATA = {"resolution": 256, "fit": "stretch", "edge_model": "canny", "depth_source": "depth_anything_small"}


def compute_maps(images: np.ndarray, edge_model: str, depth_source: str, device: torch.device,
                 weights: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Edge (uint8 (B, H, W)) and Depth Anything depth (uint16) of uint8 RGB images, encoded as the
    preprocess stage stores them; "none" skips a map. Sensor depth comes from files, not here."""
    from hybrid.models.depth import load_depth_anything, predict_depth, to_uint16
    from hybrid.models.edges import make_edge_detector

    weights = dict(weights or {})
    out: dict[str, np.ndarray] = {}
    if edge_model != "none":
        e = make_edge_detector(edge_model, device, weights.get(edge_model))(images).float().clamp(0, 1)
        out["edge"] = (e * 255).round().to(torch.uint8).numpy()
    if depth_source.startswith("depth_anything"):
        model = load_depth_anything(weights.get(depth_source, depth_source), device)
        out["depth"] = to_uint16(predict_depth(model, torch.from_numpy(images).to(device)).numpy())
    elif depth_source != "none":
        raise ValueError(f"depth source {depth_source!r} reads depth files: pass --reference-depth and "
                         "--target-depth, or choose --depth-source depth_anything_small")
    return out


def generate_one(checkpoint: str | Path, reference: str | Path, target: str | Path, out: str | Path,
                 manipulation: str = "none", seed: int = 0, edge_model: str | None = None,
                 depth_source: str | None = None, reference_depth: str | Path | None = None,
                 target_depth: str | Path | None = None, device: str = "auto",
                 cfg: ManipulateConfig | None = None, weights: Mapping[str, str] | None = None,
                 depth_checkpoint: str | Path | None = None, feature_noise: float = 0.0) -> dict[str, Path]:
    """Generate from two image files into ``out``: ``<decoder>.png``, ``<decoder>_mask.png``,
    ``region.png``, the fed ``target_edge.png`` / ``target_depth.png`` and ``sheet.png``; with a
    ``depth_checkpoint`` (AH*) also ``<decoder>_depth.png`` / ``<decoder>_edge.png``, the aligned
    depth-level anomaly of each generated image.

    Resolution, fit, edge model and depth source come from the checkpoint's config.json ``data``
    entry when recorded (else 256, stretch, canny, depth_anything_small); the arguments override
    them. ``manipulation``: none (a global hybrid), random (one of ``cfg.manipulations``) or a name.
    Sensor depth (depth source sensor / dataset) is read from ``reference_depth`` / ``target_depth``.
    """
    from hybrid.data.images import read_image
    from hybrid.models.depth import sensor_nearness, to_uint16

    cfg = cfg or ManipulateConfig()
    if manipulation == "random":
        manipulation = cfg.manipulations[int(np.random.default_rng(seed).integers(len(cfg.manipulations)))]
    elif manipulation != "none":
        check_manipulation(manipulation)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the outputs")
    if not (Path(checkpoint) / "config.json").exists():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint directory (no config.json); point --checkpoint "
                                "at a train stage's checkpoint/ folder, e.g. results/train/checkpoint")
    data = {**DEFAULT_DATA, **json.loads((Path(checkpoint) / "config.json").read_text()).get("data", {})}
    size = int(data["resolution"])
    dev = resolve_device(device)
    G = load_generator(checkpoint, dev)
    needs_depth = any(c.endswith("_depth") for c in G.conditions)
    needs_edge = any(c.endswith("_edge") for c in G.conditions)
    edge_model = edge_model or (data["edge_model"] if needs_edge else "none")
    depth_source = one_off_depth_source(depth_source, data["depth_source"], needs_depth,
                                        (reference_depth, target_depth), weights)
    images = np.stack([read_image(p, size, data["fit"]) for p in (reference, target)])
    maps = compute_maps(images, edge_model, depth_source if depth_source.startswith("depth_anything") else "none",
                        dev, weights)
    if depth_source in ("sensor", "dataset"):
        maps["depth"] = to_uint16(np.stack([sensor_nearness(p, (size, size)) for p in (reference_depth, target_depth)]))
    elif depth_source == "flat":
        maps["depth"] = np.full((2, size, size), 32768, np.uint16)
    items = [{"image": to_unit(images[i], "image"), **{k: to_unit(v[i], k) for k, v in maps.items()}} for i in (0, 1)]
    G_star = load_generator(depth_checkpoint, dev, "depth") if depth_checkpoint is not None else None
    if G_star is not None and not {"edge", "depth"} <= set(maps):
        raise ValueError("the depth-level checkpoint needs the target's edge and depth maps; give the edge model "
                         "and depth source (or depth files) they were trained with")
    result = generate_batch(G, [items[0]], [items[1]], [manipulation], [seed], cfg,
                            resolve_precision("auto", dev), feature_noise, G_star)
    files: dict[str, np.ndarray] = {}
    for d in G.decoder_names:
        files[d] = to_uint8(result[d]["image"])[0]
        files[f"{d}_mask"] = to_uint8(result[d]["mask"] * 2 - 1)[0]
        for k in ("depth", "edge"):
            if f"{k}_generated" in result[d]:
                files[f"{d}_{k}"] = to_uint8(result[d][f"{k}_generated"])[0]
    files["region"] = result["region"][0, 0].numpy().astype(np.uint8) * 255
    fed = [f"target_{k}" for k in MANIPULATED if f"target_{k}" in result]
    files |= {name: to_uint8(result[name])[0] for name in fed}
    order = ["reference", "target", *fed, "region",
             *(n for d in G.decoder_names for n in (d, f"{d}_mask", f"{d}_depth", f"{d}_edge") if n in files)]
    sheet = contact_sheet([{"reference": images[0], "target": images[1], **files}[n] for n in order],
                          [n if n != "region" else f"region ({manipulation})" for n in order],
                          cols=len(order), cell=min(max(size, 128), 256))
    written = {}
    for name, a in {**files, "sheet": sheet}.items():
        path = Path(out) / f"{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(a).save(tmp, format="PNG")
        written[name] = path
    return written


ONE_OFF_DEPTH = ("depth_anything_small", "depth_anything_base", "depth_anything_large", "sensor", "dataset", "flat",
                 "none")


def one_off_depth_source(asked: str | None, trained: str, needed: bool, files: tuple, weights: Mapping | None) -> str:
    """The depth source of a one-off generation: what the user asked for, else the checkpoint's.
    When that cannot run here, one message lists every option; a flat depth is used only when asked."""
    if not needed:
        return "none"
    if asked is not None and asked not in ONE_OFF_DEPTH:
        raise ValueError(f"--depth-source {asked!r}: use one of {', '.join(ONE_OFF_DEPTH)}")
    source = asked or ("sensor" if all(files) else trained)
    options = ("give --reference-depth and --target-depth files (xyz / depth TIFFs), or --depth-source "
               "depth_anything_small (Depth Anything V2 weights; `hybrid models fetch depth_anything_small`), or "
               "--depth-source flat (a constant depth: AHD then sees no structure)")
    if source == "none":
        raise ValueError(f"this checkpoint was trained with depth (from {trained!r}) and needs a depth map: {options}")
    if source in ("sensor", "dataset") and not all(files):
        raise ValueError(f"this checkpoint learned from depth files (depth source {trained!r}), and none were given: "
                         f"{options}")
    if source.startswith("depth_anything"):
        from hybrid.autoconf import weights_present

        if not weights_present(source, dict(weights or {})):
            from hybrid.models.store import offline

            if offline():
                raise ValueError(f"the depth source {source!r} needs its weights, which are not here (offline): "
                                 f"{options}")
    if source == "flat":
        log.warning("generate: a flat depth map stands in for the depth this checkpoint learned from (%s)", trained)
    return source


def cmd_generate(args: argparse.Namespace) -> None:
    try:
        cfg = ManipulateConfig.from_dict(json.loads(args.manipulate)) if args.manipulate else None
    except json.JSONDecodeError as e:
        raise ValueError(f"--manipulate is not valid JSON ({e.msg} at character {e.pos}): give an object such as "
                         '\'{"area": [0.02, 0.1]}\'') from None
    files = generate_one(args.checkpoint, args.reference, args.target, args.out, args.manipulation, args.seed,
                         args.edge_model, args.depth_source, args.reference_depth, args.target_depth,
                         args.device, cfg, depth_checkpoint=args.depth_checkpoint, feature_noise=args.feature_noise)
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``generate``: one global hybrid or local anomaly from two image files."""
    p = subparsers.add_parser("generate", help="generate a hybrid or a local anomaly from a reference and a "
                              "target image with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="the train stage's checkpoint directory")
    p.add_argument("--reference", required=True, help="image giving the appearance")
    p.add_argument("--target", required=True, help="image giving the structure (depth and edges)")
    p.add_argument("--out", required=True, help="folder for the outputs")
    p.add_argument("--manipulation", default="none",
                   help="none (global hybrid), random, merge, remove, replace or tps (local anomaly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth-checkpoint", default=None,
                   help="a depth-level (AnomalyHybrid*) checkpoint: also write each output's aligned depth and edge")
    p.add_argument("--feature-noise", type=float, default=0.0,
                   help="std of the noise added to the encoded features for diversity (AnomalyFactory)")
    p.add_argument("--edge-model", default=None, help="override the checkpoint's (pidinet, canny, ...)")
    p.add_argument("--depth-source", default=None, choices=ONE_OFF_DEPTH,
                   help="override the checkpoint's: depth_anything_small|_base|_large (estimated), sensor (the "
                        "depth files), flat (a constant depth, only on request), none")
    p.add_argument("--reference-depth", default=None, help="sensor depth file (xyz tiff) of the reference")
    p.add_argument("--target-depth", default=None, help="sensor depth file (xyz tiff) of the target")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--manipulate", default=None,
                   help='region and manipulation settings as JSON, e.g. \'{"area": [0.02, 0.1]}\'')
    p.set_defaults(func=cmd_generate)
    return p
