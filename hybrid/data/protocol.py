"""The industrial protocol: which test anomalies are the generation base and which are held out.

DFMGAN and AnomalyDiffusion, and after them AnomalyFactory and AnomalyHybrid, split each defect
type's test anomalies of MVTec AD (and the other industrial sets): "the first third of each defect
type's test anomalies train the generator (the generation *base*), the other two thirds test the
downstream detector (*eval*)". The manifest's ``protocol`` column records that split:

- per (category, defect type), the anomalies of split ``test`` (label 1) are ordered by file name
  (``order: name``; ``random`` = a seeded shuffle, AnomalyHybrid's "randomly choose 1/3");
- the first ``k`` are ``base``, the rest ``eval``, with ``k = ceil(fraction * n)`` by default.
  AnomalyDiffusion's code takes ``len // 3`` (``rounding: floor``): the two differ whenever ``n``
  is not a multiple of 3 (n = 7: ceil gives 3 base, floor 2), so pick the rule the compared paper
  used;
- every other row (training and validation images, good test images, butterfly hybrids) is null.

A layout without defect types (VisA's split CSV) has one group per category (defect null).

Defect types that cannot be split are *bad*: fewer than ``min_anomalies`` anomalies, none left
because every one lacked its mask (the readers drop such images under ``ingest.missing: skip``,
or stop with ``error``), or a split that would leave base or eval empty. ``too_few: error`` stops
with one message naming every bad (category, defect); ``skip`` leaves their rows' protocol null
(the rows stay in the manifest) and lists each (category, defect, count, reason) in the skip list.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hybrid.config import check_choices, check_keys, choice
from hybrid.data.manifest import ManifestError

log = logging.getLogger(__name__)

ROUNDINGS = ("ceil", "floor")
ORDERS = ("name", "random")
TOO_FEW = ("skip", "error")
# Layouts whose test anomalies have defect types; the butterfly layouts (demo, heliconius) get null.
LAYOUTS = ("mvtec_ad", "mvtec_3d", "mvtec_loco", "visa", "folder", "demo_industrial", "madsim", "realiad")
SOURCE = "ingest.protocol"
NO_DEFECT = "(no defect type)"


@dataclass(frozen=True)
class ProtocolConfig:
    """``ingest.protocol`` of the config (see config/schema.yaml)."""

    enabled: bool = True
    fraction: float = 1 / 3  # of each defect type's test anomalies that are the generation base
    rounding: str = choice(ROUNDINGS, "ceil")  # ceil (DFMGAN, the papers' "first third") | floor (AD's len//3)
    order: str = choice(ORDERS, "name")  # name (sorted file names) | random (seeded shuffle)
    seed: int = 0  # for order: random
    min_anomalies: int = 3  # fewer test anomalies in a defect type: it cannot be split
    too_few: str = choice(TOO_FEW, "skip")  # what to do with a defect type that cannot be split

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"ingest.protocol.fraction={self.fraction!r}; use a number between 0 and 1 "
                             "(1/3 = 0.3333333333333333 in the papers)")
        check_choices(self, "ingest.protocol")
        if self.min_anomalies < 2:
            raise ValueError(f"ingest.protocol.min_anomalies={self.min_anomalies}; use >= 2 (one base, one eval)")

    @classmethod
    def from_dict(cls, d: dict | None) -> ProtocolConfig:
        return cls(**check_keys(d, cls, "ingest.protocol"))

    def n_base(self, n: int) -> int:
        """How many of ``n`` anomalies are base (the tolerance absorbs 1/3 written as a decimal)."""
        x = self.fraction * n
        return math.ceil(x - 1e-9) if self.rounding == "ceil" else math.floor(x + 1e-9)


def _label(category: object, defect: object) -> str:
    return f"{category}/{defect if isinstance(defect, str) else NO_DEFECT}"


def _lost_masks(skipped: list[dict]) -> dict[tuple, int]:
    """(category, defect) -> images the reader dropped for want of a mask."""
    lost: dict[tuple, int] = {}
    for r in skipped:
        if r.get("reason") == "no mask" and r.get("category") is not None:
            key = (r["category"], r.get("defect"))
            lost[key] = lost.get(key, 0) + 1
    return lost


def _unsplittable(n: int, k: int, cfg: ProtocolConfig) -> str:
    """Why ``n`` anomalies with ``k`` of them base cannot be split ("" when they can)."""
    if n < cfg.min_anomalies:
        return f"too few test anomalies: {n} < ingest.protocol.min_anomalies {cfg.min_anomalies}"
    if k == 0 or k == n:
        side = "eval" if k == 0 else "base"
        return f"only in {side}: {cfg.rounding}({cfg.fraction:g} x {n}) = {k} base, {n - k} eval"
    return ""


def assign_protocol(df: pd.DataFrame, cfg: ProtocolConfig,
                    skipped: list[dict] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """``df`` with its ``protocol`` column filled in, and one skip record per bad defect type.

    ``skipped``: the reader's skip records (``df.attrs["skipped"]``), used to name defect types
    whose images were all dropped for want of a mask. Raises :class:`ManifestError` naming every
    bad defect type when ``cfg.too_few`` is ``error``.
    """
    out = df.copy()
    out["protocol"] = pd.Series(pd.NA, index=out.index, dtype="string")
    if not cfg.enabled:
        return out, []
    anomalies = out[(out["split"] == "test") & (out["label"] == 1)]
    lost = _lost_masks(skipped or [])
    groups = {(c, d if isinstance(d, str) else None): g  # a null defect type (VisA) is one group
              for (c, d), g in anomalies.groupby(["category", "defect"], dropna=False, sort=True)}
    bad: list[dict] = []
    for key in sorted(set(lost) - set(groups), key=str):  # every image of the type lacked a mask
        bad.append({"category": key[0], "defect": key[1], "count": 0,
                    "reason": f"no masks: all {lost[key]} test anomalies lack their mask (see the 'no mask' rows)"})
    for (category, defect), g in groups.items():
        n, k = len(g), cfg.n_base(len(g))
        dropped = lost.get((category, defect), 0)
        masks = f" ({dropped} more were dropped for want of a mask)" if dropped else ""
        if why := _unsplittable(n, k, cfg):
            bad.append({"category": category, "defect": defect, "count": n, "reason": why + masks})
            continue
        if masks:
            log.warning("protocol: %s split over %d test anomalies%s", _label(category, defect), n, masks)
        if cfg.order == "name":
            names = g["image_path"].map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1])
            ordered = pd.DataFrame({"name": names, "id": g["sample_id"]}).sort_values(["name", "id"]).index
        else:
            seed = [cfg.seed, *str(category).encode(), 0, *str(defect).encode()]
            ordered = g.sort_values("sample_id").index[np.random.default_rng(seed).permutation(n)]
        out.loc[ordered[:k], "protocol"] = "base"
        out.loc[ordered[k:], "protocol"] = "eval"
    if bad and cfg.too_few == "error":
        lines = [f"- {_label(b['category'], b['defect'])}: {b['reason']}" for b in bad]
        raise ManifestError(
            f"ingest.protocol: {len(bad)} defect type(s) cannot be split into base and eval:\n"
            + "\n".join(lines)
            + "\nTo fix: add test anomalies (and their masks) to these defect types, change "
            "ingest.protocol.fraction / rounding / min_anomalies, or set ingest.protocol.too_few: skip "
            "to leave them out of the protocol (their rows keep protocol null and are listed in "
            "results/ingest_skipped.csv).")
    records = [{"path": None, "source": SOURCE, "reason": b["reason"], "category": b["category"],
                "defect": b["defect"], "count": b["count"]} for b in bad]
    for r in records:
        log.warning("protocol: skipped defect type %s (%d test anomalies): %s",
                    _label(r["category"], r["defect"]), r["count"], r["reason"])
    return out, records


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Base and eval counts per (category, defect), for logs and reports."""
    rows = df[df["protocol"].notna()]
    if rows.empty:
        return pd.DataFrame(columns=["category", "defect", "base", "eval"])
    t = rows.groupby(["category", "defect", "protocol"], dropna=False).size().unstack("protocol", fill_value=0)
    return t.reindex(columns=["base", "eval"], fill_value=0).reset_index()
