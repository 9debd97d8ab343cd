"""The preprocess stage: manifest -> resized images, edge maps and depth maps in HDF5 shards.

Decoding runs in DataLoader workers; edges (PiDiNet or Canny) and depth (Depth Anything V2, or
the dataset's own sensor depth) are computed in batches on the chosen device. Each shard is
written whole under a temporary name, and carries a fingerprint of its inputs and settings, so an
interrupted run resumes at the first shard that is missing or stale.

Where the maps are computed (``maps_at``):

- ``working`` (default): on the image already fitted to the working resolution.
- ``original`` (the paper, 004 Sec. 6.2): on the decoded original, then fitted to the working
  resolution with the image's own fit (stretch / crop / pad), so image and maps stay pixel
  aligned. The stored image is that same original fitted with area interpolation. Edge
  probabilities (float, 0..1) are area-resized and then quantised to uint8; Depth Anything's
  float nearness is upsampled to the original size (bicubic, as ``post_process_depth_estimation``),
  area-resized (a box average: no overshoot; bilinear where an image is smaller than the working
  size) and only then min-max encoded to uint16, as the working path encodes its final map.
  "Original" is bounded by ``maps_max_pixels``: a larger image is decoded at the smallest JPEG
  DCT scale that fits and/or area-resized to fit (``hybrid.data.images.read_capped``); files
  above ``max_pixels`` are refused in both modes. Originals are batched by size: images of one
  height x width run together (at most ``batch_size`` images and ``maps_batch_pixels`` pixels a
  batch), an image whose size is alone runs alone.

Sensor depth (the manifest's ``depth_path``: MVTec 3D-AD xyz, the demo's height maps) is read at
its own size and fitted like the image, whatever ``maps_at`` says. It fills ``depth`` when
``depth_source`` is sensor/dataset, and ``depth_sensor`` beside the pseudo depth when
``sensor_depth`` asks for it (AnomalyHybrid learns from pseudo depth, AH* from sensor depth).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hybrid.config import check_choices, check_device, check_keys, choice, resolve_device
from hybrid.data.images import FITS, ImageError, fit, probe, read_capped, read_image, read_mask
from hybrid.data.shards import ShardSet, build_index, part_range, says_what_is_kept, shard_name, write_shard
from hybrid.io import write_parquet_atomic
from hybrid.maps import EDGE_MODELS, MapComputer
from hybrid.models.depth import sensor_nearness, to_uint16

log = logging.getLogger(__name__)

DEPTH_SOURCES = ("depth_anything_small", "depth_anything_base", "depth_anything_large", "sensor", "dataset", "none")
SENSOR_SOURCES = ("sensor", "dataset")
MAPS_AT = ("working", "original")
SENSOR_DEPTH = ("auto", True, False)
BAD_IMAGES = ("error", "skip")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASK_MISMATCH = ("resize", "error")
# Settings that change how fast, never what: left out of the shard fingerprint.
_RUNTIME_KEYS = ("device", "batch_size", "workers", "maps_batch_pixels", "chunks", "compile")  # speed only


@dataclass
class PreprocessConfig:
    resolution: int = 256
    fit: str = choice(FITS, "stretch")  # see hybrid.data.images.fit
    shard_size: int = 1024
    bad_images: str = choice(BAD_IMAGES, "error")  # skip: skipped files are listed in skipped.csv and the log
    max_pixels: int = 200_000_000
    edge_model: str = choice(EDGE_MODELS, "pidinet")  # config `auto` is resolved by hybrid.autoconf first
    depth_source: str = choice(DEPTH_SOURCES, "depth_anything_small")  # likewise
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = choice(PRECISIONS, "auto")  # auto: bf16 depth on cuda, fp32 elsewhere
    compile: bool = False  # torch.compile PiDiNet and Depth Anything (falls back to eager if compiling fails)
    batch_size: int = 16
    workers: int = 2
    paths: dict[str, str] = field(default_factory=dict)  # store name -> explicit weights (models.paths)
    maps_at: str = choice(MAPS_AT, "working")  # see the module docstring
    maps_max_pixels: int = 4_194_304  # maps_at original: larger images are reduced to this (2048^2)
    maps_batch_pixels: int = 16_777_216  # maps_at original: pixels per batch of originals (16 x 1024^2)
    sensor_depth: str | bool = choice(SENSOR_DEPTH, "auto")  # also store depth_sensor (see sensor_depth_wanted)
    mask_mismatch: str = choice(MASK_MISMATCH, "resize")  # a mask of another size than its image: resize (warns)
    chunks: int = 1  # the workflow's scatter: this many jobs, each writing a range of shards, then a gather

    def __post_init__(self) -> None:
        if isinstance(self.sensor_depth, str) and self.sensor_depth.lower() in ("true", "false"):
            self.sensor_depth = self.sensor_depth.lower() == "true"  # from a --config override
        check_choices(self, "preprocess")
        check_device(self.device, "preprocess.device")
        if self.maps_max_pixels < self.resolution ** 2:
            raise ValueError(f"preprocess.maps_max_pixels: {self.maps_max_pixels} is below the working size "
                             f"{self.resolution}x{self.resolution}; maps at 'original' size would be smaller than "
                             "the working ones (raise it, or use maps_at: working)")
        if self.maps_batch_pixels < 1:
            raise ValueError(f"preprocess.maps_batch_pixels: {self.maps_batch_pixels} must be at least 1")
        if self.chunks < 1:
            raise ValueError(f"preprocess.chunks: {self.chunks} must be at least 1 (1 = one job)")

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        if d and "weights" in d:
            raise ValueError("preprocess: the store name -> weights file overrides are called `paths` now (as in "
                             "every stage; the workflow passes models.paths); rename `weights` to `paths`")
        return cls(**check_keys(d, cls, "preprocess"))


def sensor_depth_wanted(manifest: pd.DataFrame, cfg: PreprocessConfig) -> bool:
    """Whether the shards get a ``depth_sensor`` array (sensor depth beside ``depth``).

    ``false``: never. ``true``: always, and every row needs a ``depth_path`` (the error names the
    rows without). ``auto``: when every row has a ``depth_path`` (MVTec 3D-AD, a demo or
    Heliconius run with depth files) and ``depth`` is not itself the sensor depth already.
    """
    if cfg.sensor_depth is False:
        return False
    has = manifest["depth_path"].notna() if "depth_path" in manifest else pd.Series(False, index=manifest.index)
    if cfg.sensor_depth is True:
        if not has.all():
            missing = manifest.loc[~has, "sample_id"].astype(str).tolist()
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
            raise ValueError(
                f"preprocess.sensor_depth: true needs a sensor depth file for every image, but {len(missing)} "
                f"of {len(manifest)} manifest rows have no depth_path: {shown}. Ingest a layout with depth "
                "(mvtec_3d; heliconius with depth_dir), or set preprocess.sensor_depth: auto (stored only when "
                "every image has one) or false")
        return True
    return len(manifest) > 0 and bool(has.all()) and cfg.depth_source not in SENSOR_SOURCES


def sensor_map(path: str, size: int, how: str) -> np.ndarray:
    """Sensor nearness (float32) read at its own size and fitted to ``size`` like the image."""
    if how == "stretch":  # one area resize straight to the square, as it always was
        return sensor_nearness(path, (size, size))
    return fit(sensor_nearness(path, None), size, how)


class _Decoded(Dataset):
    """Decodes one manifest row: fitted RGB, mask and sensor depth (as ``depth`` when it is the
    depth source, as ``depth_sensor`` when stored beside it), and with ``maps_at: original`` the
    capped original for the map models. Errors come back as data so the main process decides
    between failing and skipping (exceptions from workers lose type)."""

    def __init__(self, rows: pd.DataFrame, cfg: PreprocessConfig, sensor_depth: bool,
                 store_sensor: bool = False) -> None:
        self.rows = rows.to_dict("records")  # a row by position: pandas' iloc took about 0.09 ms per item
        self.cfg = cfg
        self.sensor_depth = sensor_depth
        self.store_sensor = store_sensor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        c = self.cfg
        out: dict = {"sample_id": r["sample_id"], "error": None, "path": r["image_path"]}
        try:
            if c.maps_at == "original":
                out["original"] = read_capped(r["image_path"], c.maps_max_pixels, c.max_pixels)
                out["image"] = fit(out["original"], c.resolution, c.fit)
            else:
                out["image"] = read_image(r["image_path"], c.resolution, c.fit, c.max_pixels)
            if pd.notna(r["mask_path"]):
                mask = read_mask(r["mask_path"])
                info = probe(r["image_path"], c.max_pixels)  # the header: the image's true size
                h, w = info.height, info.width
                if mask.shape != (h, w):
                    why = (f"mask {r['mask_path']} is {mask.shape[1]}x{mask.shape[0]} but its image is {w}x{h}")
                    if c.mask_mismatch == "error":
                        raise ImageError(r["image_path"], f"{why}; fix the mask, or set preprocess.mask_mismatch: "
                                         "resize to stretch it onto the image")
                    out["warning"] = f"{why}; stretched onto the image (preprocess.mask_mismatch: resize)"
                out["mask"] = fit(mask, c.resolution, c.fit, interpolation=cv2.INTER_NEAREST)
            if self.sensor_depth or self.store_sensor:
                if pd.isna(r["depth_path"]):
                    raise ImageError(r["image_path"], "no depth_path for this sample; the depth source "
                                     "'sensor'/'dataset' needs one per image (or choose depth_anything_*)")
                d = to_uint16(sensor_map(r["depth_path"], c.resolution, c.fit))
                if self.sensor_depth:
                    out["depth"] = d
                if self.store_sensor:
                    out["depth_sensor"] = d
        except (ImageError, OSError, ValueError) as e:
            out["error"] = str(e)
        return out


def _collate(items: list[dict]) -> list[dict]:
    return items


def fingerprint(rows: pd.DataFrame, cfg: PreprocessConfig, sensor_depth: bool = False) -> str:
    """Hash of the settings that shape the output and of every input file's identity (path, size,
    mtime). ``sensor_depth``: whether the shards hold ``depth_sensor`` (``sensor_depth_wanted``).

    Keys added after shards were first written enter the hash only when they change the output
    (maps_at original, a stored depth_sensor), so shards written before them stay current.
    """
    # `paths` is hashed under its former name `weights`, so shards written before the rename stay current.
    settings = {("weights" if k == "paths" else k): v for k, v in asdict(cfg).items()
                if k not in (*_RUNTIME_KEYS, "maps_at", "maps_max_pixels", "sensor_depth")}
    if cfg.maps_at != "working":
        settings |= {"maps_at": cfg.maps_at, "maps_max_pixels": cfg.maps_max_pixels}
    if sensor_depth:
        settings["depth_sensor"] = True
    if cfg.fit != "stretch" and (sensor_depth or cfg.depth_source in SENSOR_SOURCES):
        settings["sensor_fit"] = True  # sensor depth is fitted like the image (it was stretched before)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in rows.itertuples(index=False):
        for p in (r.image_path, r.mask_path, r.depth_path):
            if isinstance(p, str):
                try:
                    st = Path(p).stat()
                    h.update(f"{r.sample_id}|{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{r.sample_id}|{p}|missing\n".encode())
    return h.hexdigest()


def map_computer(cfg: PreprocessConfig, device: torch.device) -> MapComputer:
    """The edge and depth networks of ``cfg`` (shared with :class:`hybrid.pipeline.HybridPipeline`)."""
    return MapComputer(cfg.edge_model, cfg.depth_source, device, cfg.paths, cfg.precision, cfg.compile)


def map_attrs(cfg: PreprocessConfig, maps: MapComputer) -> dict[str, object]:
    """The shard attributes that say how the maps were made (read back by train and generation)."""
    return {
        "edge_model": cfg.edge_model,
        "edge_weights": maps.weight_source(cfg.edge_model) if cfg.edge_model.startswith("pidinet") else "",
        "depth_source": cfg.depth_source,
        "depth_weights": maps.weight_source(cfg.depth_source) if maps.depth is not None else "",
        "maps_at": cfg.maps_at,
        **({"maps_max_pixels": cfg.maps_max_pixels} if cfg.maps_at == "original" else {}),
    }


class _Pending:
    """Decoded items waiting for their maps, grouped by the size the maps run at; a group runs
    as one batch when it is full (``run_full``) or whatever it holds (``run_all``)."""

    def __init__(self, maps: MapComputer, cfg: PreprocessConfig) -> None:
        self.maps, self.cfg = maps, cfg
        self.original = cfg.maps_at == "original"
        self.groups: dict[tuple[int, int], list[dict]] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def add(self, item: dict) -> None:
        key = item["original" if self.original else "image"].shape[:2]
        self.groups.setdefault(key, []).append(item)

    def _batch_len(self, key: tuple[int, int]) -> int:
        if not self.original:
            return self.cfg.batch_size
        return max(1, min(self.cfg.batch_size, self.cfg.maps_batch_pixels // (key[0] * key[1])))

    def run_full(self) -> None:
        for key in list(self.groups):
            items, n = self.groups[key], self._batch_len(key)
            while len(items) >= n:
                self._run(items[:n])
                del items[:n]
            if not items:
                del self.groups[key]

    def run_all(self) -> None:
        for key, items in self.groups.items():
            n = self._batch_len(key)
            for lo in range(0, len(items), n):
                self._run(items[lo:lo + n])
        self.groups = {}

    def _run(self, items: list[dict]) -> None:
        if self.original:
            maps_out = self.maps.at_original(np.stack([it.pop("original") for it in items]), self.cfg.resolution,
                                             self.cfg.fit)
        else:
            maps_out = self.maps(np.stack([it["image"] for it in items]))
        for k, it in enumerate(items):
            for name, arr in maps_out.items():
                it.setdefault(name, arr[k])


SKIPPED_COLUMNS = ["shard", "sample_id", "path", "reason"]


def run(manifest: pd.DataFrame, out_dir: str | Path, cfg: PreprocessConfig,
        auto: list[str] | None = None, part: tuple[int, int] | None = None) -> pd.DataFrame:
    """Write ``out_dir/shard-*.h5``, ``out_dir/index.parquet`` and ``out_dir/skipped.parquet``.

    Returns the index (sample_id, shard, index). Shards whose fingerprint matches are kept.
    ``auto``: what the workflow's ``auto`` settings resolved to (logged and stored in the shards'
    ``auto`` attribute).

    ``part`` = (k, K): write only the k-th of K contiguous ranges of shards (one job of the
    workflow's scatter, ``preprocess.chunks``) and return that range's skipped records (columns
    :data:`SKIPPED_COLUMNS`) instead of the index; :func:`gather` then writes the index and
    skipped.parquet from the K records, exactly as one job would have. A failure leaves the last
    complete shard set in ``out_dir/.published`` and says so.
    """
    with says_what_is_kept(out_dir, "preprocess"):
        return _run(manifest, out_dir, cfg, auto, part)


def _run(manifest: pd.DataFrame, out_dir: str | Path, cfg: PreprocessConfig, auto: list[str] | None,
         part: tuple[int, int] | None) -> pd.DataFrame:
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    sensor = cfg.depth_source in SENSOR_SOURCES
    store_sensor = sensor_depth_wanted(manifest, cfg)
    n_shards = (len(manifest) + cfg.shard_size - 1) // cfg.shard_size
    mine = part_range(n_shards, *part) if part is not None else range(n_shards)
    shards = ShardSet(out_dir, n_shards, "preprocess")
    chunks = {i: manifest.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size] for i in mine}
    prints = {i: fingerprint(c, cfg, store_sensor) for i, c in chunks.items()}
    todo = shards.todo(mine, prints)
    log.info("preprocess: %d images in %d shards (%s%d to write, %d kept) on %s",
             len(manifest), n_shards, f"part {part[0] + 1} of {part[1]}: shards {mine.start}-{mine.stop - 1}, "
             if part is not None else "", len(todo), len(mine) - len(todo), device)
    log.info("preprocess: maps at the %s size%s; depth from %s%s", cfg.maps_at,
             f" (originals above {cfg.maps_max_pixels:,} pixels are reduced to that)" if cfg.maps_at == "original"
             else "", cfg.depth_source,
             "; sensor depth stored as depth_sensor" if store_sensor else "")

    for note in auto or []:
        log.info("preprocess: %s", note)
    skipped: list[dict] = _previous_skips(out_dir, {i for i in mine if i not in todo})
    if todo:
        maps = map_computer(cfg, device)
        if cfg.compile:
            log.info("preprocess.compile: the edge and depth networks run through torch.compile (compiled at the "
                     "first batch of each size)")
        attrs_common = {"resolution": cfg.resolution, "fit": cfg.fit, **map_attrs(cfg, maps),
                        "depth_sensor_source": "sensor" if store_sensor else "", "auto": "; ".join(auto or [])}
        rows = pd.concat([chunks[i] for i in todo])
        loader = DataLoader(_Decoded(rows, cfg, sensor, store_sensor), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, collate_fn=_collate)
        owners = [i for i in todo for _ in range(len(chunks[i]))]  # the shard of each decoded row
        ends = {j for j in range(len(owners)) if j + 1 == len(owners) or owners[j + 1] != owners[j]}
        pending = _Pending(maps, cfg)
        done, acc = 0, []
        bar = tqdm(total=len(rows), desc="preprocess", unit="img")
        # Shards are written in a background thread while the next one is decoded and mapped (one
        # write in flight); its skipped records are known before the write starts.
        writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        writing: Future | None = None
        try:
            for batch in loader:
                for it in batch:
                    if it.get("warning"):
                        log.warning("preprocess: %s", it["warning"])
                    if it["error"] is not None:
                        if cfg.bad_images == "error":
                            raise ImageError(it["path"], it["error"].split(": ", 1)[-1] +
                                             " (or set preprocess.bad_images: skip to leave it out)")
                        log.warning("skipped %s: %s", it["path"], it["error"])
                    else:
                        pending.add(it)
                pending.run_full()
                # Working size: every batch's maps now (one group). Originals wait a while for more
                # images of their size, but a shard is written only once all of its maps are made.
                if (not pending.original or len(pending) >= 2 * cfg.batch_size
                        or any(j in ends for j in range(done, done + len(batch)))):
                    pending.run_all()
                for it in batch:
                    acc.append(it)
                    done += 1
                    shard = owners[done - 1]
                    if done == len(owners) or owners[done] != shard:  # the shard's last row: write it
                        write, skips = _flush(out_dir, shard, acc, prints[shard], attrs_common)
                        skipped += skips
                        if writing is not None:
                            writing.result()  # one write at a time; raises its error here
                        writing = writer.submit(write)
                        acc = []
                bar.update(len(batch))
            if writing is not None:
                writing.result()
        finally:
            writer.shutdown(wait=True)  # a write in progress finishes (whole, under its temporary name)
        bar.close()

    if part is not None:
        log.info("preprocess: part %d of %d done (%d skipped)", part[0] + 1, part[1], len(skipped))
        return pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    return _finish(shards, skipped)


def gather(manifest: pd.DataFrame, out_dir: str | Path, cfg: PreprocessConfig, records: list) -> pd.DataFrame:
    """After the scatter's parts (:func:`preprocess` with ``part``): remove stale shards, write
    skipped.parquet from the parts' ``records`` (DataFrames or parquet paths, in part order) and
    index.parquet from the shards. Every shard must be there (its part finished)."""
    shards = ShardSet(out_dir, (len(manifest) + cfg.shard_size - 1) // cfg.shard_size, "preprocess")
    shards.require("preprocess_chunk")
    frames = [r if isinstance(r, pd.DataFrame) else pd.read_parquet(r) for r in records]
    skipped = pd.concat(frames, ignore_index=True).to_dict("records") if frames else []
    return _finish(shards, skipped)


def _finish(shards: ShardSet, skipped: list[dict]) -> pd.DataFrame:
    out_dir = shards.out_dir
    index = build_index([shards.path(i) for i in range(shards.n)])
    write_parquet_atomic(pd.DataFrame(skipped, columns=SKIPPED_COLUMNS), out_dir / "skipped.parquet")
    write_parquet_atomic(index, out_dir / "index.parquet")
    shards.finish(["index.parquet", "skipped.parquet"])
    log.info("preprocess: wrote %d samples; %d skipped", len(index), len(skipped))
    return index


def _previous_skips(out_dir: Path, kept: set[int]) -> list[dict]:
    p = out_dir / "skipped.parquet"
    if not p.exists() or not kept:
        return []
    df = pd.read_parquet(p)
    return df[df["shard"].isin([shard_name(i) for i in kept])].to_dict("records")


def _flush(out_dir: Path, i: int, items: list[dict], fp: str, attrs: dict) -> tuple[Callable[[], None], list[dict]]:
    """The shard's arrays, and a call that writes them, with its skipped records."""
    good = [it for it in items if it["error"] is None]
    skipped = [{"shard": shard_name(i), "sample_id": it["sample_id"], "path": it["path"], "reason": it["error"]}
               for it in items if it["error"] is not None]
    arrays = {"image": np.stack([it["image"] for it in good])} if good else {
        "image": np.zeros((0, 1, 1, 3), np.uint8)}
    for name in ("edge", "depth", "depth_sensor", "mask"):
        have = [name in it for it in good]
        if good and all(have):
            arrays[name] = np.stack([it[name] for it in good])
        elif name == "mask" and any(have):
            # some samples have masks: store zeros for the rest and say which are real
            arrays[name] = np.stack([it.get(name, np.zeros(it["image"].shape[:2], np.uint8)) for it in good])
    strings = {"sample_id": [it["sample_id"] for it in good]}
    if "mask" in arrays:
        strings["has_mask"] = ["1" if "mask" in it else "0" for it in good]

    def write() -> None:
        write_shard(out_dir / shard_name(i), arrays, strings,
                    {**attrs, "arrays": ",".join(arrays), "fingerprint": fp, "n_skipped": len(skipped)})

    return write, skipped
