"""The baselines stage: model-free anomalies (DRAEM's Perlin, CutPaste) in the generate stage's format.

Does generation beat cheap synthesis? To compare them downstream (evaluate, the defect classifier,
the segment stage) the baselines are written exactly as :mod:`hybrid.stages.generate` writes its outputs:
``results/baselines/shard-NNNNN.h5`` with the arrays ``image`` uint8 (N, H, W, 3), ``region``
uint8 {0, 255} (the ground-truth anomaly mask) and ``mask`` (the generate stage's fusion map M;
for a model-free method the same mask), the strings ``sample_id``, ``pair_id``, ``reference_id``,
``target_id``, ``decoder``, ``manipulation``, ``category``, ``kind``; ``manifest.parquet`` (the
columns of :data:`hybrid.stages.generate.MANIFEST_COLUMNS`, read back from the shards with
:func:`hybrid.stages.generate.read_generated`) and one contact sheet per category in ``sheets/``.

- Sources: per category, ``count`` normal training images drawn with a seed from the rows the
  generate stage selects (``generate.select``, by default split train, label 0): without
  replacement while there are enough, then again from a fresh permutation. Draw ``n`` of a
  category is *pair* ``baseline-<category>-<n>``: every method turns the same source image into one
  output, as every generate pair gives one output per decoder. ``reference_id`` = ``target_id`` =
  the source's sample id.
- Rows: ``kind`` ``local`` (a local anomaly with a known region, label 1), ``decoder`` the method
  (``perlin`` / ``cutpaste``), ``manipulation`` ``<method>/<variant>``: ``perlin/textures`` (the
  anomaly source is a texture folder, DRAEM's DTD) or ``perlin/images`` (another normal image of
  the category, colour-jittered: ``baselines.perlin.textures: null``), ``cutpaste/normal`` or
  ``cutpaste/scar``. sample_id = ``<pair_id>-<method>``, disjoint from the generate stage's ids
  (``<kind>-<category>-<n>-<decoder>``), so the two manifests concatenate (see
  :func:`concat_generated`).
- Seeds: output ``n`` of a method in a category draws from
  ``default_rng([method_seed, n])`` (:func:`hybrid.baselines.synthesize` with ``start = n``), where
  the method seed hashes ``baselines.seed``, the method and the category; a Perlin source image is
  drawn with ``default_rng([method_seed, n, 1])`` from the category's other images. So an output
  depends on neither the shard size nor the other methods or categories.
- Resume: each shard carries a fingerprint of its jobs, the settings, the input shards, the
  selection and the texture files; a rerun keeps the shards whose fingerprint matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from hybrid.baselines import METHODS, CutPasteConfig, PerlinConfig, TextureFolder, synthesize
from hybrid.config import check_choices, check_keys, choice
from hybrid.data.manifest import matches
from hybrid.data.shards import ShardDataset, ShardSet, read_attrs, says_what_is_kept, write_shard
from hybrid.io import write_parquet_atomic, write_png
from hybrid.manipulate import opencv_threads
from hybrid.planning import safe_name
from hybrid.seeds import derive_seed
from hybrid.stages.generate import read_generated
from hybrid.viz import contact_sheet

log = logging.getLogger(__name__)

KIND = "local"
PAIR_PREFIX = "baseline"
DEFAULT_SELECT = {"split": "train", "label": 0}


@dataclass
class BaselinesConfig:
    """The ``baselines`` config section (``enabled`` is the workflow's: which layouts run the rule)."""

    methods: list[str] = choice(METHODS, default_factory=lambda: list(METHODS))
    count: int | None = None  # outputs per category and method; None = generate.local.count
    seed: int = 0
    perlin: PerlinConfig = field(default_factory=PerlinConfig)
    cutpaste: CutPasteConfig = field(default_factory=CutPasteConfig)
    shard_size: int = 1024  # images per shard (all methods of a pair stay in one shard)
    sheet_rows: int = 4  # pairs on each category's contact sheet

    def __post_init__(self) -> None:
        check_choices(self, "baselines")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"baselines.methods {self.methods!r}: list some of {list(METHODS)}, each once")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"baselines.count {self.count!r} must be a positive integer (or null for "
                             "generate.local.count)")
        if self.shard_size < 1 or self.sheet_rows < 0:
            raise ValueError("baselines.shard_size must be >= 1 and baselines.sheet_rows >= 0")

    @classmethod
    def from_dict(cls, d: Mapping | None, default_count: int | None = None) -> BaselinesConfig:
        """From the config section; ``default_count`` (the generate stage's local count) fills a null count."""
        d = check_keys(d, cls, "baselines", extra=["enabled"])
        d.pop("enabled", None)
        perlin = PerlinConfig.from_dict(d.pop("perlin", None))
        cutpaste = CutPasteConfig.from_dict(d.pop("cutpaste", None))
        if d.get("count") is None and default_count is not None:
            d["count"] = int(default_count)
        return cls(**d, perlin=perlin, cutpaste=cutpaste)

    def method_config(self, method: str) -> PerlinConfig | CutPasteConfig:
        return self.perlin if method == "perlin" else self.cutpaste

    def manipulation(self, method: str) -> str:
        if method == "perlin":
            return "perlin/textures" if self.perlin.textures else "perlin/images"
        return f"cutpaste/{self.cutpaste.variant}"


@dataclass(frozen=True)
class Job:
    """One source image of a category: one output per method."""

    category: str
    number: int  # within the category
    source_id: str

    @property
    def pair_id(self) -> str:
        return f"{PAIR_PREFIX}-{safe_name(self.category)}-{self.number:05d}"


def _seed(*parts: int | str) -> int:
    return derive_seed(*parts, bits=32)


def method_seed(seed: int, method: str, category: str) -> int:
    """The seed of one method in one category (see the module doc)."""
    return _seed(seed, zlib.crc32(method.encode()), zlib.crc32(str(category).encode()))


def pools(rows: pd.DataFrame) -> dict[str, list[str]]:
    """Sorted sample ids of each category (sorted) among ``rows``."""
    cats = rows["category"].astype(str)
    return {c: sorted(rows.loc[cats == c, "sample_id"].astype(str)) for c in sorted(cats.unique())}


def plan_jobs(pool: Mapping[str, Sequence[str]], count: int, seed: int) -> list[Job]:
    """``count`` source draws per category: a seeded permutation of its ids, then another, ..."""
    jobs: list[Job] = []
    for c, ids in pool.items():
        if not ids:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(str(c).encode())])
        order: list[int] = []
        while len(order) < count:
            order += rng.permutation(len(ids)).tolist()
        jobs += [Job(c, n, ids[i]) for n, i in enumerate(order[:count])]
    return jobs


def open_textures(cfg: PerlinConfig) -> TextureFolder | None:
    """The texture folder of ``baselines.perlin.textures``, or None; its errors name that key."""
    if not cfg.textures:
        return None
    try:
        return TextureFolder(cfg.textures)
    except ValueError as e:
        msg = str(e)
        if "baselines.perlin.textures" not in msg:
            msg += "; fix baselines.perlin.textures (a folder of texture images, or null for the dataset's own images)"
        raise ValueError(f"baselines.perlin.textures: {msg}") from e


def _texture_identity(textures: TextureFolder | None) -> str:
    if textures is None:
        return "no textures"
    h = hashlib.sha256(str(textures.root).encode())
    for p in textures.paths:
        st = p.stat()
        h.update(f"{p.relative_to(textures.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fingerprint(cfg: BaselinesConfig, shard_dir: Path, index_df: pd.DataFrame, pool: Mapping[str, Sequence[str]],
                 textures: TextureFolder | None) -> str:
    """What every output depends on besides its job: the methods' settings, the input shards, the
    selected pool (Perlin's anomaly sources) and the textures."""
    settings = {"methods": cfg.methods, "seed": cfg.seed,
                **{m: dataclasses.asdict(cfg.method_config(m)) for m in cfg.methods}}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for s in sorted(index_df["shard"].unique()):
        st = (shard_dir / s).stat()
        h.update(f"{s}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(pd.util.hash_pandas_object(index_df, index=False).values.tobytes())
    h.update(json.dumps(pool, sort_keys=True).encode())
    h.update(_texture_identity(textures).encode())
    return h.hexdigest()


class _Images:
    """uint8 RGB images of the preprocess shards by sample id (the current category's pool cached)."""

    def __init__(self, index_df: pd.DataFrame, shard_dir: Path) -> None:
        self.data = ShardDataset(index_df, ["image"], shard_dir, raw=True)
        self.pos = {s: i for i, s in enumerate(index_df["sample_id"].astype(str))}
        self._pool_key: str | None = None
        self._pool: dict[str, np.ndarray] = {}

    def __getitem__(self, sample_id: str) -> np.ndarray:
        if sample_id in self._pool:
            return self._pool[sample_id]
        return self.data[self.pos[sample_id]]["image"]

    def pool(self, category: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if self._pool_key != category:
            self._pool, self._pool_key = {}, None
            self._pool = {s: self[s] for s in ids}
            self._pool_key = category
        return self._pool

    def close(self) -> None:
        self.data.close()


def synthesize_one(job: Job, method: str, image: np.ndarray, cfg: BaselinesConfig,
                   pool: Mapping[str, np.ndarray] | None, textures: TextureFolder | None,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One output (image (H, W, 3), mask (H, W) {0, 255}) of ``method`` for ``job``."""
    mseed = method_seed(seed, method, job.category)
    if method == "cutpaste":
        out, masks = synthesize([image], "cutpaste", mseed, cfg.cutpaste, start=job.number)
    elif textures is not None:
        out, masks = synthesize([image], "perlin", mseed, cfg.perlin, sources=textures, start=job.number)
    else:
        others = [s for s in (pool or {}) if s != job.source_id]
        if others:
            pick = others[int(np.random.default_rng([mseed, job.number, 1]).integers(len(others)))]
            source = pool[pick]
        else:  # a category of one image: the image is its own (colour-jittered) source
            source = image
        out, masks = synthesize([image], "perlin", mseed, cfg.perlin, sources=[source], start=job.number)
    return out[0], masks[0]


def _write_chunk(path: Path, jobs: Sequence[Job], cfg: BaselinesConfig, images: _Images,
                 pool: Mapping[str, Sequence[str]], textures: TextureFolder | None, attrs: dict, bar: tqdm) -> None:
    arrays: dict[str, list[np.ndarray]] = {"image": [], "mask": [], "region": []}
    strings: dict[str, list[str]] = {k: [] for k in ("sample_id", "pair_id", "reference_id", "target_id", "decoder",
                                                      "manipulation", "category", "kind")}
    own_images = "perlin" in cfg.methods and textures is None
    for j in jobs:
        source_pool = images.pool(j.category, pool[j.category]) if own_images else None
        img = images[j.source_id]
        for m in cfg.methods:
            out, mask = synthesize_one(j, m, img, cfg, source_pool, textures, cfg.seed)
            arrays["image"].append(out)
            arrays["mask"].append(mask)
            arrays["region"].append(mask)
            for key, value in (("sample_id", f"{j.pair_id}-{m}"), ("pair_id", j.pair_id),
                               ("reference_id", j.source_id), ("target_id", j.source_id), ("decoder", m),
                               ("manipulation", cfg.manipulation(m)), ("category", j.category), ("kind", KIND)):
                strings[key].append(value)
            bar.update(1)
    write_shard(path, {k: np.stack(v) for k, v in arrays.items()}, strings, attrs)
    log.info("baselines: wrote %s (%d images)", path.name, len(strings["sample_id"]))


def write_sheet(path: Path, rows: pd.DataFrame, out_dir: Path, images: _Images, pairs: int) -> None:
    """A PNG of one category: per pair, the source, then each method's image and mask."""
    rows = rows.reset_index(drop=True)
    data = ShardDataset(rows, ["image", "mask"], out_dir, raw=True)
    cells, labels, cols = [], [], 1
    for pair in list(dict.fromkeys(rows["pair_id"]))[:pairs]:
        idx = np.flatnonzero((rows["pair_id"] == pair).to_numpy())
        first = rows.iloc[idx[0]]
        row, names = [images[str(first["reference_id"])]], ["source"]
        for i in idx:
            item = data[int(i)]
            m = rows.at[int(i), "manipulation"]
            row += [item["image"], item["mask"]]
            names += [str(m), f"{rows.at[int(i), 'decoder']} mask"]
        cells += row
        labels += names
        cols = max(cols, len(row))
    data.close()
    if cells:
        write_png(path, contact_sheet(cells, labels, cols=cols, cell=128))


def run(index: str | Path, manifest: pd.DataFrame, out_dir: str | Path, cfg: BaselinesConfig,
        select: Mapping | None = None) -> pd.DataFrame:
    """Write ``out_dir/shard-*.h5``, ``out_dir/manifest.parquet`` and ``out_dir/sheets/<category>.png``.

    ``index``: the preprocess stage's index.parquet (its shards beside it); ``manifest``: the ingest
    manifest; ``select``: the rows to draw sources from (the generate stage's ``generate.select``).
    Returns the manifest of the outputs. Shards whose fingerprint matches are kept; a failure leaves the
    last complete set in ``out_dir/.published`` and says so.
    """
    with says_what_is_kept(out_dir, "baselines"):
        return _run(index, manifest, out_dir, cfg, select)


def _run(index: str | Path, manifest: pd.DataFrame, out_dir: str | Path, cfg: BaselinesConfig,
         select: Mapping | None) -> pd.DataFrame:
    if cfg.count is None:
        raise ValueError("baselines.count is null and no default was given (the workflow passes "
                         "generate.local.count)")
    select = dict(DEFAULT_SELECT if select is None else select)
    index, out_dir = Path(index), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_df = pd.read_parquet(index)
    shard_dir = index.parent
    rows = manifest.merge(index_df[["sample_id"]], on="sample_id")
    chosen = rows[matches(rows, select, "generate.select")]
    pool = pools(chosen)
    if not pool:
        raise ValueError(f"baselines: generate.select {select} matches none of the {len(rows)} preprocessed "
                         "samples; the baselines draw their source images from those rows")
    textures = open_textures(cfg.perlin) if "perlin" in cfg.methods else None
    if "perlin" in cfg.methods and textures is None:
        single = [c for c, ids in pool.items() if len(ids) < 2]
        if single:
            log.warning("baselines: categories %s have one selected image: Perlin uses it as its own anomaly "
                        "source (colour-jittered); set baselines.perlin.textures for real textures", single)
    jobs = plan_jobs(pool, cfg.count, cfg.seed)
    per_shard = max(1, cfg.shard_size // len(cfg.methods))
    chunks = [jobs[i:i + per_shard] for i in range(0, len(jobs), per_shard)]
    base = _fingerprint(cfg, shard_dir, index_df, pool, textures)
    prints = [hashlib.sha256((base + json.dumps([dataclasses.astuple(j) for j in c])).encode()).hexdigest()
              for c in chunks]
    shards = ShardSet(out_dir, len(chunks), "baselines")
    todo = shards.todo(range(len(chunks)), prints)
    log.info("baselines: %s x %d sources in %d categories (%d per category) = %d images in %d shards "
             "(%d to write, %d kept); sources from generate.select %s", ", ".join(cfg.manipulation(m) for m in
                                                                                   cfg.methods),
             len(jobs), len(pool), cfg.count, len(jobs) * len(cfg.methods), len(chunks), len(todo),
             len(chunks) - len(todo), select)
    images = _Images(index_df, shard_dir)
    if todo:
        first = read_attrs(shard_dir / index_df["shard"].iloc[0])
        attrs = {k: v for k, v in first.items() if k in ("resolution", "fit", "edge_model", "depth_source")}
        attrs["generator"] = "baselines"
        attrs["baselines"] = json.dumps({"methods": cfg.methods, "seed": cfg.seed,
                                         **{m: dataclasses.asdict(cfg.method_config(m)) for m in cfg.methods}},
                                        default=str)
        bar = tqdm(total=sum(len(chunks[i]) for i in todo) * len(cfg.methods), desc="baselines", unit="img")
        with opencv_threads(1):  # per-image OpenCV calls: one thread spends less CPU (see opencv_threads)
            for i in todo:
                _write_chunk(shards.path(i), chunks[i], cfg, images, pool, textures,
                             {**attrs, "fingerprint": prints[i]}, bar)
        bar.close()
    result = read_generated([shards.path(i) for i in range(len(chunks))])
    write_parquet_atomic(result, out_dir / "manifest.parquet")
    shards.finish(["manifest.parquet"])
    for c in result["category"].unique():
        write_sheet(out_dir / "sheets" / f"{safe_name(c)}.png", result[result["category"] == c], out_dir, images,
                    cfg.sheet_rows)
    images.close()
    log.info("baselines: %d images in %s", len(result), out_dir)
    return result


def concat_generated(*manifests: str | Path) -> pd.DataFrame:
    """Several generated manifests (``results/generated``, ``results/baselines``, ...) as one frame
    whose ``shard`` column is each shard's path (the manifest's folder joined with its file name).

    Read it with ``ShardDataset(frame, fields, shard_dir=".")`` (a relative ``shard`` path is taken
    from the working directory, an absolute one as it is). Sample ids of the generate and baselines
    stages never collide; a duplicate is refused.
    """
    frames = []
    for m in manifests:
        df = pd.read_parquet(m)
        root = Path(m).parent
        frames.append(df.assign(shard=[str(root / s) for s in df["shard"]]))
    out = pd.concat(frames, ignore_index=True)
    dup = out["sample_id"][out["sample_id"].duplicated()]
    if len(dup):
        raise ValueError(f"generated manifests {list(map(str, manifests))} share sample ids, e.g. "
                         f"{sorted(set(dup))[:5]}; they cannot be concatenated")
    return out.astype({"shard": "string"})
