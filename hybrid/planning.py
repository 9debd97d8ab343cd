"""Planning generation: which (reference, target) pairs, of which kind, with which seed.

Pandas and numpy only: the plan is a pure function of the manifest rows and the generate config,
so it can be inspected, tested and split into chunks without a model or a GPU.

Pairs per kind: ``random`` (reference and target drawn from the same category and equal
``match`` columns), ``groups`` (all pairs between two filtered groups of the manifest, both
directions) or ``explicit`` ([reference_id, target_id] lists). ``source: base`` pairs base-set
anomalies of one category and defect type (the industrial protocol, paper 003 Sec. 3.5 and 4.1).
Each pair carries its own seed (:func:`hybrid.seeds.derive_seed`), so outputs do not depend on
the batch size or on which job writes them.

In a manifest of several datasets (``dataset`` as a list) random pairs stay within one dataset as
well as one category. ``reference_datasets`` (random pairing of drawn regions only) takes the
references from other datasets instead, AnomalyFactory's cross-dataset generation (paper 002
Table 2, the "+mvtecloco" / "+madsim" columns): the targets are still drawn per category from
``generate.select``, the references from the rows of the named datasets that match
``generate.select`` apart from its ``dataset`` and ``category`` keys. Every job records the
dataset of its reference (:attr:`Job.reference_dataset`).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from hybrid.config import check_keys, choice
from hybrid.data.manifest import matches
from hybrid.seeds import derive_seed, rng

log = logging.getLogger(__name__)

KINDS = ("global", "local", "normal")
STRATEGIES = ("random", "groups", "explicit")
SOURCES = ("select", "base")


def _seed(*parts: int | str) -> int:
    return derive_seed(*parts, bits=32)


_rng = rng


@dataclass
class PairingConfig:
    """How one kind picks its (reference, target) pairs."""

    count: int = 16  # pairs per category (each gives one image per decoder); explicit: every pair
    pairing: str = choice(STRATEGIES, "random")  # config `auto` is resolved by hybrid.autoconf first
    match: list[str] = field(default_factory=list)  # random: columns reference and target share
    groups: list[list[dict]] = field(default_factory=list)  # groups: [[filter A, filter B], ...]
    both_directions: bool = True  # groups: B x A as well as A x B
    pairs: list[list[str]] = field(default_factory=list)  # explicit: [[reference_id, target_id], ...]
    # select: generate.select rows, drawn regions | base: base-set defects, their masks (auto: hybrid.autoconf)
    source: str = choice(SOURCES, "select")
    reference_datasets: list[str] = field(default_factory=list)  # random: references from these datasets

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"generate source {self.source!r}: use one of {list(SOURCES)}")
        if self.pairing not in STRATEGIES:
            raise ValueError(f"generate pairing {self.pairing!r}: use one of {list(STRATEGIES)}")
        if self.count < 0:
            raise ValueError(f"generate count {self.count} must be >= 0")
        if self.pairing == "groups" and (not self.groups or any(len(g) != 2 for g in self.groups)):
            raise ValueError(f"generate pairing 'groups' needs groups as [[filter A, filter B], ...] "
                             f"(e.g. [[{{subspecies: '8'}}, {{subspecies: '9'}}]]), got {self.groups!r}")
        if self.pairing == "explicit" and (not self.pairs or any(len(p) != 2 for p in self.pairs)):
            raise ValueError(f"generate pairing 'explicit' needs pairs as [[reference_id, target_id], ...], "
                             f"got {self.pairs!r}")
        self.reference_datasets = [str(d) for d in self.reference_datasets or []]
        if self.reference_datasets and (self.pairing != "random" or self.source != "select"):
            raise ValueError(f"generate reference_datasets {self.reference_datasets} needs pairing: random and "
                             f"source: select (got pairing {self.pairing!r}, source {self.source!r}); groups and "
                             "explicit pairs name their references themselves")

    @classmethod
    def from_dict(cls, d: Mapping, kind: str = "pairing") -> PairingConfig:
        check_keys(d, cls, f"generate.{kind}")
        return cls(**d)



@dataclass(frozen=True)
class Job:
    """One pair to generate: one output per decoder."""

    kind: str
    category: str
    number: int  # within (kind, category)
    reference_id: str
    target_id: str
    manipulation: str  # "none" for global and normal
    seed: int
    defect: str = ""  # base-set pairs: the defect type; their region comes from the real masks
    reference_dataset: str = ""  # the manifest's dataset of the reference ("" without a dataset column)

    @property
    def pair_id(self) -> str:
        return f"{self.kind}-{safe_name(self.category)}-{self.number:05d}"


def safe_name(s: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(s)) or "_"


def pair_samples(rows: pd.DataFrame, cfg: PairingConfig, seed: int,
                 references: pd.DataFrame | None = None) -> list[tuple[str, str, str]]:
    """(reference_id, target_id, category) pairs from manifest ``rows``; category = the target's.

    random: per category, ``count`` pairs drawn with replacement, reference != target, both sharing
    the ``match`` columns (and the dataset, when ``rows`` has several); with ``cfg.reference_datasets``
    the references come from ``references`` instead (:func:`reference_pool`). groups: every A x B pair
    (and B x A), at most ``count`` per category (a seeded subset). explicit: the listed pairs, in order.
    """
    if cfg.reference_datasets:
        return _cross_pairs(rows, cfg, seed, references if references is not None else rows)
    cat = dict(zip(rows["sample_id"], rows["category"].astype(str)))
    if cfg.pairing == "explicit":
        missing = sorted({s for p in cfg.pairs for s in p if s not in cat})
        if missing:
            raise ValueError(f"generate explicit pairs name sample ids {missing[:10]} that are not in the "
                             "manifest/shards; check the ids (the manifest's sample_id column)")
        return [(str(r), str(t), cat[t]) for r, t in cfg.pairs]
    out: list[tuple[str, str, str]] = []
    if cfg.pairing == "groups":
        pairs: list[tuple[str, str]] = []
        for a_filter, b_filter in cfg.groups:
            a, b = (rows.loc[matches(rows, f, "generate"), "sample_id"].tolist() for f in (a_filter, b_filter))
            for f, g in ((a_filter, a), (b_filter, b)):
                if not g:
                    raise ValueError(f"generate group {f} matches no selected sample; check the filter and "
                                     "generate.select")
            pairs += [(r, t) for r in a for t in b if r != t]
            if cfg.both_directions:
                pairs += [(r, t) for r in b for t in a if r != t]
        by_cat: dict[str, list[tuple[str, str]]] = {}
        for r, t in pairs:
            by_cat.setdefault(cat[t], []).append((r, t))
        for c in sorted(by_cat):
            p = by_cat[c]
            if len(p) > cfg.count:
                p = [p[i] for i in sorted(_rng(seed, zlib.crc32(c.encode())).choice(len(p), cfg.count, replace=False))]
            out += [(r, t, c) for r, t in p]
        return out
    for c, sub in rows.assign(category=rows["category"].astype(str)).groupby("category", sort=True):
        # one dataset: the same groups as without the key; several: pairs stay within a dataset
        own = ["dataset"] if "dataset" in sub.columns and "dataset" not in cfg.match else []
        keys = ["category", *own, *[m for m in cfg.match if m != "category"]]
        groups = [g["sample_id"].tolist() for _, g in sub.groupby(keys, dropna=False, sort=True) if len(g) >= 2]
        if not groups:
            log.warning("generate: category %s has no two samples sharing %s; no random pairs for it", c, keys)
            continue
        targets = [(gi, k) for gi, g in enumerate(groups) for k in range(len(g))]
        rng = _rng(seed, zlib.crc32(c.encode()))
        for _ in range(cfg.count):
            gi, k = targets[int(rng.integers(len(targets)))]
            g = groups[gi]
            j = int(rng.integers(len(g) - 1))
            out.append((g[j + (j >= k)], g[k], c))
    return out


def reference_pool(rows: pd.DataFrame, select: Mapping, cfg: PairingConfig, kind: str = "pairing") -> pd.DataFrame:
    """The rows of ``cfg.reference_datasets`` that match ``select`` apart from its dataset and
    category keys (e.g. ``{split: train, label: 0}``: their normal training images)."""
    have = sorted(set(rows["dataset"].astype(str))) if "dataset" in rows.columns else []
    unknown = [d for d in cfg.reference_datasets if d not in have]
    if unknown:
        raise ValueError(f"generate.{kind}.reference_datasets names {unknown}, not datasets of the manifest; it has "
                         f"{have} (the dataset list's names)")
    rest = {k: v for k, v in dict(select or {}).items() if k not in ("dataset", "category")}
    pool = rows[rows["dataset"].astype(str).isin(cfg.reference_datasets) & matches(rows, rest, "generate.select")]
    if pool.empty:
        raise ValueError(f"generate.{kind}.reference_datasets {cfg.reference_datasets}: none of their rows match "
                         f"generate.select {rest} (its dataset and category keys aside)")
    return pool


def _cross_pairs(rows: pd.DataFrame, cfg: PairingConfig, seed: int,
                 references: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Per target category, ``count`` (reference, target) pairs: the target drawn from the category's
    ``rows``, the reference from ``references`` (sharing the ``match`` columns other than category)."""
    match = [m for m in cfg.match if m not in ("category", "dataset")]

    def key(frame: pd.DataFrame) -> list[tuple]:
        return [tuple(str(v) for v in r) for r in frame[match].itertuples(index=False)] if match else [()] * len(frame)

    groups: dict[tuple, list[str]] = {}
    for k, sid in zip(key(references), references["sample_id"].astype(str)):
        groups.setdefault(k, []).append(sid)
    position = {k: {sid: i for i, sid in enumerate(g)} for k, g in groups.items()}
    out: list[tuple[str, str, str]] = []
    for c, sub in rows.assign(category=rows["category"].astype(str)).groupby("category", sort=True):
        rng = _rng(seed, zlib.crc32(c.encode()), 1)
        targets, keys = sub["sample_id"].astype(str).tolist(), key(sub)
        for _ in range(cfg.count):
            t = int(rng.integers(len(targets)))
            g = groups.get(keys[t], [])
            own = position.get(keys[t], {}).get(targets[t])  # the target itself is never its reference
            n = len(g) - (own is not None)
            if n < 1:
                log.warning("generate: no reference in %s for target %s (match %s)", cfg.reference_datasets,
                            targets[t], match)
                continue
            j = int(rng.integers(n))
            out.append((g[j + (own is not None and j >= own)], targets[t], c))
    return out


def plan_jobs(rows: pd.DataFrame, cfg: Any) -> list[Job]:
    """Every pair of every kind, in kind, category, number order, with its seed and manipulation.
    ``cfg``: the generate stage's config (seed, kinds, select, pairings per kind, manipulate)."""
    jobs: list[Job] = []
    selected = rows[matches(rows, cfg.select, "generate.select")]
    dataset_of = (dict(zip(rows["sample_id"].astype(str), rows["dataset"].astype(str))) if "dataset" in rows.columns
                  else {})
    for ki, kind in enumerate(KINDS):
        if kind not in cfg.kinds:
            continue
        pc = cfg.pairings[kind]
        if pc.source == "base":
            pairs = base_pairs(rows, pc, _seed(cfg.seed, ki), kind)
        else:
            pool = reference_pool(rows, cfg.select, pc, kind) if pc.reference_datasets else None
            pairs = [(r, t, c, "") for r, t, c in
                     pair_samples(rows if pc.pairing == "explicit" else selected, pc, _seed(cfg.seed, ki), pool)]
            if pc.reference_datasets:
                log.info("generate %s: %d pairs with references from %s", kind, len(pairs), pc.reference_datasets)
        counter: dict[str, int] = {}
        for ref, tgt, c, defect in pairs:
            n = counter[c] = counter.get(c, -1) + 1
            s = _seed(cfg.seed, ki, zlib.crc32(c.encode()), n)
            manip = "none"
            if kind == "local":
                names = cfg.manipulate.manipulations
                manip = names[int(_rng(s, 1).integers(len(names)))]
            jobs.append(Job(kind, c, n, ref, tgt, manip, s, defect, dataset_of.get(ref, "")))
    return jobs


def base_pairs(rows: pd.DataFrame, cfg: PairingConfig, seed: int, kind: str) -> list[tuple[str, str, str, str]]:
    """(reference_id, target_id, category, defect): ``cfg.count`` pairs per category of base-set
    anomalies of one defect type, the defect types taken in turn, each pair drawn with the seed."""
    if "protocol" not in rows.columns or not (rows["protocol"] == "base").any():
        raise ValueError(f"generate.{kind}.source: base needs base-set anomalies (the manifest's protocol column, "
                         "set at ingest for layouts with defect types: mvtec_ad, mvtec_3d, mvtec_loco, visa, "
                         f"folder with defect folders); this manifest has none. Use generate.{kind}.source: select")
    # a layout without defect types (VisA's split CSV) has one group per category: "anomaly"
    base = rows[rows["protocol"] == "base"].assign(category=lambda d: d["category"].astype(str),
                                                   defect=lambda d: d["defect"].astype("string").fillna("anomaly"))
    out = []
    for c, sub in base.groupby("category", sort=True):
        groups = {d: g["sample_id"].astype(str).tolist() for d, g in sub.groupby("defect", sort=True)}
        defects = sorted(groups)
        rng = _rng(seed, zlib.crc32(c.encode()))
        for n in range(cfg.count):
            d = defects[n % len(defects)]
            ids = groups[d]
            t = int(rng.integers(len(ids)))
            r = (t + 1 + int(rng.integers(len(ids) - 1))) % len(ids) if len(ids) > 1 else t
            out.append((ids[r], ids[t], c, d))
    return out
