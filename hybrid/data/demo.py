"""The embedded demo: procedurally drawn Heliconius-like butterflies in the HDR challenge layout.

Species A ("erato", ten subspecies with codes 0-9; lativitta = 8 and notabilis = 9 are the signal
hybrid's parents) and a mimic species B ("melpomene": malleti copies lativitta, plesseni copies
notabilis, on a slightly rounder wing). A subspecies is a set of pattern genes; a hybrid takes each
gene from one parent or blends the two. Every image gets a sensor-style xyz depth tiff (MVTec 3D
layout, z = distance from the camera). Same seed and config give byte-identical files.

    hybrid demo results/data/demo                      # the dataset
    hybrid demo --sheet docs/demo_contact_sheet.png    # the contact sheet
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hybrid.config import check_keys
from hybrid.data.xyz import write_xyz
from hybrid.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

Rgba = tuple[float, float, float, float]  # RGB in 0..255 and a strength (opacity) in 0..1

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (24, 21, 19),
    "blue": (26, 46, 104),
    "red": (214, 36, 34),
    "crimson": (178, 16, 44),
    "orange": (240, 112, 24),
    "yellow": (250, 214, 56),
    "cream": (246, 232, 170),
    "white": (244, 242, 234),
}


def _c(name: str) -> Rgba:
    return (*map(float, PALETTE[name]), 1.0)


@dataclass(frozen=True)
class Genes:
    """Pattern genes of one butterfly. Colours are RGBA (A = strength); None = absent."""

    band: Rgba | None = None  # forewing band (its proximal half when two-toned)
    band_distal: Rgba | None = None  # distal half of a two-toned band; None = same as band
    band_shape: str = "solid"  # solid | split (cut in patches) | spots
    band_pos: float = 0.46  # band centre along the forewing, 0 = base, 1 = apex
    band_width: float = 0.18
    band_tilt: float = 25.0  # degrees; > 0 puts the band's lower end further out
    band_reach: float = 0.34  # how far the band runs from the costa toward the inner margin
    apical: Rgba | None = None  # subapical spots near the forewing tip
    basal: Rgba | None = None  # "dennis" patch at the base of all wings
    bar: Rgba | None = None  # hindwing bar
    bar_width: float = 0.075
    rays: Rgba | None = None  # hindwing rays
    margin: Rgba | None = None  # hindwing margin spots
    ground: Rgba = _c("black")  # ground colour toward the wing bases (blue = iridescent)
    fw_aspect: float = 1.0  # forewing width relative to species A
    fw_tip: float = 0.2  # forewing apex, 0 = pointed, 1 = round

    def __post_init__(self) -> None:
        if self.band_shape not in ("solid", "split", "spots"):
            raise ValueError(f"Genes.band_shape={self.band_shape!r}; use solid, split or spots")


# Gene groups that are inherited together (one locus each).
LOCI: dict[str, tuple[str, ...]] = {
    "band": ("band", "band_distal", "band_shape", "band_pos", "band_width", "band_tilt",
             "band_reach"),
    "apical": ("apical",),
    "basal": ("basal",),
    "bar": ("bar", "bar_width"),
    "rays": ("rays",),
    "margin": ("margin",),
    "ground": ("ground",),
    "shape": ("fw_aspect", "fw_tip"),
}

SHAPE_A = {"fw_aspect": 1.0, "fw_tip": 0.15}
SHAPE_B = {"fw_aspect": 1.12, "fw_tip": 0.85}


@dataclass(frozen=True)
class Subspecies:
    name: str
    species: str  # "erato" (A) or "melpomene" (B)
    code: int | None  # challenge code (A only)
    genes: Genes
    mimic_of: str | None = None


def _a(code: int, name: str, **genes) -> Subspecies:
    return Subspecies(name, "erato", code, Genes(**SHAPE_A, **genes))


SUBSPECIES: dict[str, Subspecies] = {s.name: s for s in [
    _a(0, "hydara", band=_c("crimson"), band_pos=0.41, band_width=0.28, band_tilt=26),
    _a(1, "petiverana", band=_c("red"), band_shape="split", band_width=0.18, bar=_c("yellow"),
       bar_width=0.05),
    _a(2, "amalfreda", band=_c("red"), band_shape="split", band_pos=0.5, band_width=0.13,
       band_tilt=38, margin=_c("white")),
    _a(3, "erato", band=_c("red"), band_pos=0.5, band_width=0.15, band_tilt=14,
       bar=_c("white"), bar_width=0.085),
    _a(4, "chestertonii", ground=_c("blue"), bar=_c("yellow"), bar_width=0.06,
       apical=_c("cream")),
    _a(5, "venus", band=_c("red"), band_shape="spots", band_width=0.19, apical=_c("yellow"),
       margin=_c("yellow")),
    _a(6, "cyrbia", band=_c("red"), band_width=0.17, band_pos=0.48, ground=_c("blue"),
       margin=_c("white")),
    _a(7, "demophoon", band=_c("red"), band_pos=0.4, band_width=0.24, band_tilt=34,
       bar=_c("yellow"), bar_width=0.12),
    _a(8, "lativitta", band=_c("yellow"), band_pos=0.48, band_width=0.15, band_tilt=12,
       band_reach=0.3, basal=_c("orange"), rays=_c("orange")),
    _a(9, "notabilis", band=_c("red"), band_distal=_c("white"), band_shape="split",
       band_pos=0.43, band_width=0.3, band_tilt=28, band_reach=0.36),
]}
for _model, _mimic in (("lativitta", "malleti"), ("notabilis", "plesseni")):
    _g = replace(SUBSPECIES[_model].genes, **SHAPE_B)
    _g = replace(_g, band_pos=_g.band_pos - 0.02, band_tilt=_g.band_tilt + 4)
    SUBSPECIES[_mimic] = Subspecies(_mimic, "melpomene", None, _g, mimic_of=_model)

# (parent 1, parent 2, hybrid type, ssp_indicator in the reference CSV)
HYBRID_TYPES: list[tuple[str, str, str, str]] = [
    ("lativitta", "notabilis", "signal", "major"),
    ("hydara", "petiverana", "non-signal", "minor"),
    ("hydara", "amalfreda", "non-signal", "minor"),
    ("hydara", "erato", "non-signal", "minor"),
    ("chestertonii", "venus", "non-signal", "minor"),
    ("malleti", "plesseni", "mimic", "mimic"),
]
SIGNAL_PARENTS = ("lativitta", "notabilis")

TRAIN_COLUMNS = ["CAMID", "file_url", "hybrid_stat", "split", "zenodo_link", "md5", "subspecies",
                 "parent_subspecies_1", "parent_subspecies_2", "filename"]
REF_COLUMNS = ["CAMID", "file_url", "hybrid_stat", "X", "subspecies_ref", "filename",
               "ssp_indicator"]
ZENODO_LINK = "demo://heliconius"


# --------------------------------------------------------------------------- genes


def _mix(a: Rgba | None, b: Rgba | None, t: float) -> Rgba | None:
    """Blend two pattern colours; an absent one keeps the other's colour at reduced strength."""
    if a is None and b is None:
        return None
    if a is None or b is None:
        c, s = (b, t) if a is None else (a, 1 - t)
        return (*c[:3], c[3] * s)
    r, g, b_, s = (float(x + (y - x) * t) for x, y in zip(a, b))
    return (r, g, b_, s)


def _blend(g1: Genes, g2: Genes, locus: str, t: float, rng: np.random.Generator) -> dict:
    out = {}
    for name in LOCI[locus]:
        x, y = getattr(g1, name), getattr(g2, name)
        if name == "band_distal":
            x, y = x or g1.band, y or g2.band
        if name == "band_shape":
            out[name] = x if rng.random() < 0.5 else y
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)):
            out[name] = float(x + (y - x) * t)
        else:
            out[name] = _mix(x, y, t)
    return out


def cross(g1: Genes, g2: Genes, rng: np.random.Generator) -> Genes:
    """A hybrid: each locus comes from parent 1, parent 2, or a blend of both.

    Among the loci where the parents differ, the hybrid departs from each parent by at least one
    whole locus (or two blends), so it never copies a parent.
    """
    differing = [k for k, names in LOCI.items()
                 if any(getattr(g1, n) != getattr(g2, n) for n in names)]
    need = min(1.0, 0.5 * len(differing))

    def departure(modes: dict[str, str], parent: str) -> float:
        return sum(0.0 if modes[k] == parent else 0.5 if modes[k] == "blend" else 1.0
                   for k in differing)

    for _ in range(1000):
        modes = {k: str(rng.choice(["p1", "p2", "blend"], p=[0.35, 0.35, 0.3])) for k in LOCI}
        if all(departure(modes, p) >= need for p in ("p1", "p2")):
            break
    else:  # practically unreachable; blending every differing locus always departs enough
        modes |= {k: "blend" for k in differing}
    values: dict = {}
    for k in LOCI:
        if modes[k] == "blend":
            values |= _blend(g1, g2, k, float(rng.uniform(0.35, 0.65)), rng)
        else:
            src = g1 if modes[k] == "p1" else g2
            values |= {n: getattr(src, n) for n in LOCI[k]}
    return Genes(**values)


def individual(genes: Genes, rng: np.random.Generator, amount: float = 1.0) -> Genes:
    """Small per-individual variation of positions, widths and colours."""

    def col(c: Rgba | None) -> Rgba | None:
        if c is None:
            return None
        rgb = np.clip(np.array(c[:3]) * (1 + 0.06 * amount * rng.standard_normal(3)), 0, 255)
        return (*map(float, rgb), c[3])

    def num(x: float, sd: float) -> float:
        return float(x + sd * amount * rng.standard_normal())

    return replace(
        genes,
        band=col(genes.band), band_distal=col(genes.band_distal), apical=col(genes.apical),
        basal=col(genes.basal), bar=col(genes.bar), rays=col(genes.rays),
        margin=col(genes.margin), ground=col(genes.ground),
        band_pos=num(genes.band_pos, 0.012), band_width=num(genes.band_width, 0.008),
        band_tilt=num(genes.band_tilt, 2.0), band_reach=num(genes.band_reach, 0.012),
        bar_width=num(genes.bar_width, 0.004), fw_aspect=num(genes.fw_aspect, 0.015),
    )


# --------------------------------------------------------------------------- drawing

# Canonical frame: body along x = 0, head up (y grows downward), wingspan x in [-1, 1].
FW_BASE, FW_ANGLE = np.array([0.04, -0.035]), math.radians(20.0)
HW_BASE = np.array([0.03, 0.03])
FOCAL = 3.2  # focal length in units of the image width (for the xyz map)

# Forewing outline in wing coordinates (u along the wing, v toward the trailing edge),
# a pointed (species A) and a round (species B) apex, blended by Genes.fw_tip.
_FW_POINTED = np.array([
    (0.00, 0.00), (0.15, -0.035), (0.35, -0.05), (0.55, -0.055), (0.75, -0.045), (0.90, -0.02),
    (0.985, 0.01), (1.0, 0.05), (0.985, 0.10), (0.93, 0.16), (0.86, 0.22), (0.78, 0.28),
    (0.70, 0.32), (0.62, 0.345), (0.56, 0.35), (0.45, 0.33), (0.33, 0.27), (0.20, 0.19),
    (0.08, 0.10), (0.02, 0.04)])
_FW_ROUND = _FW_POINTED.copy()
_FW_ROUND[5:10] = [(0.88, -0.02), (0.95, 0.015), (0.975, 0.07), (0.955, 0.13), (0.91, 0.185)]

# Hindwing radius (polar, around HW_BASE, angle downward from +x in degrees).
_HW_PHI = np.array([-15, 0, 15, 30, 45, 60, 75, 90, 100, 108, 112], float)
_HW_R = np.array([0.30, 0.48, 0.54, 0.55, 0.53, 0.50, 0.45, 0.38, 0.30, 0.18, 0.04])


def _chaikin(pts: np.ndarray, n: int = 3) -> np.ndarray:
    for _ in range(n):
        nxt = np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], 1).reshape(-1, 2)
    return pts


def _fw_outline(genes: Genes) -> np.ndarray:
    uv = _FW_POINTED + (_FW_ROUND - _FW_POINTED) * float(np.clip(genes.fw_tip, 0, 1))
    uv = _chaikin(uv * [1.0, genes.fw_aspect])
    c, s = math.cos(FW_ANGLE), math.sin(FW_ANGLE)
    return FW_BASE + uv[:, :1] * [c, -s] + uv[:, 1:] * [s, c]


def _hw_table() -> tuple[np.ndarray, np.ndarray]:
    fine = np.linspace(_HW_PHI[0], _HW_PHI[-1], 200)
    radius = np.interp(fine, _HW_PHI, _HW_R) * (1 + 0.012 * np.cos(np.radians(fine) * 16))
    r = _chaikin(np.stack([fine, radius], 1), 2)  # smooth the knots, keep a slight scallop
    order = np.argsort(r[:, 0])
    return r[order, 0], r[order, 1]


_HW_TABLE = _hw_table()


def _hw_radius(phi_deg: np.ndarray) -> np.ndarray:
    return np.interp(phi_deg, *_HW_TABLE, left=0.0, right=0.0).astype(np.float32)


def _hw_outline() -> np.ndarray:
    phi = np.linspace(_HW_PHI[0], _HW_PHI[-1], 120)
    r = _hw_radius(phi)
    t = np.radians(phi)
    pts = HW_BASE + np.stack([r * np.cos(t), r * np.sin(t)], 1)
    return np.vstack([pts, HW_BASE[None]])


def _ellipse(cx: float, cy: float, ax: float, ay: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1)


def _smooth(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _disc(px: np.ndarray, py: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    d = np.full(px.shape, np.inf, np.float32)
    for cx, cy in np.asarray(centres, np.float32):
        d = np.minimum(d, np.hypot(px - cx, py - cy))
    return _smooth(radius + 0.006, radius - 0.006, d)


def _paint(base: np.ndarray, colour: Rgba | None, alpha: np.ndarray) -> np.ndarray:
    if colour is None or colour[3] <= 0:
        return base
    a = (alpha * colour[3])[..., None]
    return base + (np.asarray(colour[:3], np.float32) - base) * a


def _forewing_colour(genes: Genes, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RGB of the forewing pattern at canonical points (x >= 0 side)."""
    c, s = math.cos(FW_ANGLE), math.sin(FW_ANGLE)
    dx, dy = x - float(FW_BASE[0]), y - float(FW_BASE[1])
    u, v = dx * c - dy * s, (dx * s + dy * c) / genes.fw_aspect
    black = np.asarray(PALETTE["black"], np.float32)
    rgb = np.broadcast_to(black, x.shape + (3,)).astype(np.float32)
    rgb = _paint(rgb, genes.ground, _smooth(0.55, 0.15, u))
    rgb = _paint(rgb, genes.basal, _smooth(0.30, 0.25, u + 0.25 * v))
    if genes.band is not None:
        tan = math.tan(math.radians(genes.band_tilt))
        d = (u - genes.band_pos) - tan * v
        along = _smooth(0.015, 0.045, v) * _smooth(genes.band_reach + 0.02,
                                                   genes.band_reach - 0.02, v)
        if genes.band_shape == "spots":
            vs = genes.band_reach * np.array([0.2, 0.52, 0.84])
            centres = np.stack([genes.band_pos + tan * vs, vs], 1)
            a = _disc(u, v, centres, genes.band_width * 0.5) * along
        else:
            mid = np.clip(1 - ((v - genes.band_reach / 2) / (genes.band_reach / 2)) ** 2, 0, 1)
            half = genes.band_width / 2 * (0.75 + 0.35 * np.sqrt(mid))  # rounded band ends
            a = _smooth(half + 0.01, half - 0.01, np.abs(d)) * along
            if genes.band_shape == "split":
                a = a * _smooth(0.01, 0.026, np.abs(v - 0.5 * genes.band_reach))
        colour = np.asarray(genes.band[:3], np.float32)
        if genes.band_distal is not None:
            t = _smooth(-0.012, 0.012, d)[..., None]
            colour = colour + (np.asarray(genes.band_distal[:3], np.float32) - colour) * t
        rgb = rgb + (colour - rgb) * (a * genes.band[3])[..., None]
    if genes.apical is not None:
        spots = np.array([(0.83, 0.05), (0.85, 0.11), (0.86, 0.17)])
        rgb = _paint(rgb, genes.apical, _disc(u, v, spots, 0.024))
    return rgb


def _hindwing_colour(genes: Genes, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = x - float(HW_BASE[0]), y - float(HW_BASE[1])
    r = np.hypot(dx, dy)
    phi = np.degrees(np.arctan2(dy, dx))
    rho = r / np.maximum(_hw_radius(phi), 1e-3)
    black = np.asarray(PALETTE["black"], np.float32)
    rgb = np.broadcast_to(black, x.shape + (3,)).astype(np.float32)
    rgb = _paint(rgb, genes.ground, _smooth(0.95, 0.45, rho))
    rgb = _paint(rgb, genes.basal, _smooth(0.36, 0.30, rho))
    if genes.bar is not None:
        t = math.radians(27.0)
        across = np.abs(-math.sin(t) * dx + math.cos(t) * dy)
        along = math.cos(t) * dx + math.sin(t) * dy
        w = genes.bar_width / 2
        a = _smooth(w + 0.008, w - 0.008, across) * _smooth(0.12, 0.18, along)
        rgb = _paint(rgb, genes.bar, a * _smooth(0.95, 0.88, rho))
    if genes.rays is not None:
        a = np.zeros_like(r)
        half = 0.006 + 0.014 * _smooth(0.3, 0.75, rho)  # rays widen outward
        for k in np.radians(np.linspace(38.0, 100.0, 7)):
            ang = np.radians(phi) - k
            ray = _smooth(half + 0.006, half - 0.006, r * np.abs(np.sin(ang))) * (np.cos(ang) > 0)
            a = np.maximum(a, ray)
        rgb = _paint(rgb, genes.rays, a * _smooth(0.30, 0.42, rho) * _smooth(0.9, 0.82, rho))
    if genes.margin is not None:
        ks = np.radians(np.linspace(22.0, 104.0, 10))
        rr = _hw_radius(np.degrees(ks)) * 0.9
        centres = HW_BASE + np.stack([rr * np.cos(ks), rr * np.sin(ks)], 1)
        rgb = _paint(rgb, genes.margin, _disc(x, y, centres, 0.017))
    return rgb


def _veins(genes: Genes) -> list[np.ndarray]:
    """Vein polylines (canonical, right side) drawn dark across the patterns."""
    c, s = math.cos(FW_ANGLE), math.sin(FW_ANGLE)

    def fw(uv: list[tuple[float, float]]) -> np.ndarray:
        a = np.array(uv) * [1.0, genes.fw_aspect]
        return FW_BASE + a[:, :1] * [c, -s] + a[:, 1:] * [s, c]

    out = [fw([(0.02, 0.02), (0.5, 0.02), (0.62, 0.08)]),  # discal cell, upper edge
           fw([(0.03, 0.06), (0.35, 0.16), (0.62, 0.14)]),  # discal cell, lower edge
           fw([(0.04, 0.09), (0.40, 0.30), (0.62, 0.43)])]  # anal vein
    for end in [(0.92, -0.03), (0.99, 0.07), (0.95, 0.19), (0.86, 0.30), (0.76, 0.39)]:
        out.append(fw([(0.62, 0.11), end]))
    out.append(fw([(0.35, 0.16), (0.6, 0.42)]))
    for k in np.linspace(10.0, 100.0, 8):
        t = np.radians(k)
        r0, r1 = 0.2, float(_hw_radius(np.array([k]))[0]) * 0.98
        out.append(HW_BASE + np.array([[r0 * np.cos(t), r0 * np.sin(t)],
                                       [r1 * np.cos(t), r1 * np.sin(t)]]))
    return out


def _pose(rng: np.random.Generator, width: int, height: int, vary: float) -> np.ndarray:
    """Homography from canonical units to pixels: scale, shear, rotation, slight perspective."""
    u = lambda a: float(rng.uniform(-a, a)) * vary  # noqa: E731
    scale = min(0.37 * width, 0.56 * height) * (1 + u(0.07))
    rot, shear = math.radians(u(8.0)), u(0.05)
    persp = np.array([[1, 0, 0], [0, 1, 0], [u(0.08), u(0.08), 1]])
    center = np.array([[1, 0, 0], [0, 1, 0.15], [0, 0, 1]])  # canonical bbox centre -> origin
    lin = np.array([[math.cos(rot), -math.sin(rot), 0], [math.sin(rot), math.cos(rot), 0],
                    [0, 0, 1]]) @ np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    place = np.array([[scale, 0, width / 2 + u(0.04) * width],
                      [0, scale, height / 2 + u(0.04) * height], [0, 0, 1]])
    return place @ lin @ persp @ center


def _project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.c_[pts, np.ones(len(pts))] @ h.T
    return q[:, :2] / q[:, 2:]


def _fill(shape: tuple[int, int], h: np.ndarray, polys: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage (0..1) of canonical polygons projected to pixels."""
    m = np.zeros(shape, np.uint8)
    pix = [np.round(_project(h, p) * 16).astype(np.int32) for p in polys]
    cv2.fillPoly(m, pix, 255, cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255


def _lines(shape: tuple[int, int], h: np.ndarray, polys: list[np.ndarray], px: float
           ) -> np.ndarray:
    """Anti-aliased coverage of canonical polylines, ``px`` pixels thick."""
    m = np.zeros(shape, np.uint8)
    pix = [np.round(_project(h, p) * 16).astype(np.int32) for p in polys]
    cv2.polylines(m, pix, False, 255, max(1, round(px)), cv2.LINE_AA, shift=4)
    return m.astype(np.float32) / 255


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, max(2, round(cells * shape[1] / shape[0])))).astype(
        np.float32)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, shape: tuple[int, int], vary: float) -> np.ndarray:
    bases = [(236, 236, 232), (226, 223, 214), (212, 217, 222), (196, 197, 193), (232, 225, 208),
             (212, 221, 212), (178, 180, 182)]
    base = np.asarray(bases[int(rng.integers(len(bases)))], np.float32)
    base = base + rng.normal(0, 5 * vary, 3)
    tex = 7 * _noise_field(rng, shape, 4) + 2.5 * _noise_field(rng, shape, 24)
    return base + vary * tex[..., None]


def draw_butterfly(
    genes: Genes, rng: np.random.Generator, width: int = 384, height: int = 256, vary: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One photo of a pinned butterfly, dorsal view, and its distance map.

    Returns ``rgb`` uint8 (height, width, 3) and ``z`` float32 (height, width): distance from
    the camera in metres (larger = farther; the background is a flat plane). ``vary`` scales pose,
    lighting, background and noise variation (0 = centred, plain).
    """
    shape = (height, width)
    h = _pose(rng, width, height, vary)
    hinv = np.linalg.inv(h)
    px_per_unit = float(np.sqrt(abs(np.linalg.det(h[:2, :2]))))
    mirror = lambda p: p * [-1, 1]  # noqa: E731

    def canon(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (|x|, y) of flat pixel indices (the pattern is left-right symmetric)."""
        q = hinv @ np.stack([idx % width + 0.5, idx // width + 0.5, np.ones(idx.size)])
        return np.abs(q[0] / q[2]).astype(np.float32), (q[1] / q[2]).astype(np.float32)

    # Coverage masks (anti-aliased) of the parts, drawn in pixel space.
    fw_poly, hw_poly = _fw_outline(genes), _hw_outline()
    fw = _fill(shape, h, [fw_poly, mirror(fw_poly)])
    hw = _fill(shape, h, [hw_poly, mirror(hw_poly)])
    body = _fill(shape, h, [_ellipse(0, 0.26, 0.032, 0.24), _ellipse(0, 0.0, 0.058, 0.10),
                            _ellipse(0, -0.115, 0.042, 0.038)])
    t = np.linspace(0, 1, 12)
    antennae = [np.c_[sgn * (0.02 + 0.24 * t**1.3), -0.14 - 0.66 * t] for sgn in (-1, 1)]
    ant = np.maximum(
        _lines(shape, h, antennae, 0.012 * px_per_unit),
        _fill(shape, h, [_ellipse(sgn * 0.262, -0.80, 0.016, 0.03, 16) for sgn in (-1, 1)]))
    veins = _lines(shape, h, [p for v in _veins(genes) for p in (v, mirror(v))],
                   0.008 * px_per_unit)
    rim = _lines(shape, h, [np.vstack([p, p[:1]]) for p in (fw_poly, mirror(fw_poly))],
                 0.006 * px_per_unit)
    wings = np.maximum(fw, hw)

    # Background with a soft drop shadow.
    img = _background(rng, shape, vary).astype(np.float32)
    shadow = cv2.GaussianBlur(np.maximum(np.maximum(wings, body), ant), (0, 0), 2.5 + 2 * vary)
    off = np.float32([[1, 0, 0.012 * px_per_unit], [0, 1, 0.02 * px_per_unit]])
    img *= 1 - 0.28 * cv2.warpAffine(shadow, off, (width, height))[..., None]

    # Wings: pattern colours evaluated only where a wing is visible.
    flat = img.reshape(-1, 3)
    grain = 1 + 0.05 * rng.standard_normal(height * width, dtype=np.float32)
    ground = np.asarray(PALETTE["black"], np.float32)
    for colour_fn, cover, idx in (
        (_hindwing_colour, hw, np.flatnonzero((hw > 0) & (fw < 1))),
        (_forewing_colour, fw, np.flatnonzero(fw > 0)),
    ):
        x, y = canon(idx)
        sheen = 1 + 0.3 * _smooth(0.4, 1.0, np.hypot(x, y))  # lighter toward the margins
        rgb = colour_fn(genes, x, y) * (grain[idx] * sheen)[:, None]
        rgb += (ground - rgb) * 0.85 * veins.flat[idx][:, None]
        flat[idx] += (rgb - flat[idx]) * cover.flat[idx][:, None]
    img += (np.float32(78) - img) * (0.6 * rim * hw)[..., None]  # forewing edge over hindwing

    idx = np.flatnonzero(body > 0)
    x, y = canon(idx)
    body_rgb = np.float32((34, 29, 26)) * (1 + 0.5 * _smooth(0.05, 0.0, x))[:, None]
    spots = _disc(x, y, np.array([(0.022, -0.05), (0.03, 0.04), (0.02, -0.12)]), 0.008)
    body_rgb = _paint(body_rgb, (240.0, 220.0, 120.0, 0.8), spots)
    flat[idx] += (body_rgb - flat[idx]) * body.flat[idx][:, None]
    img += (np.float32(30) - img) * ant[..., None]

    # Lighting, sensor noise, slight defocus.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = (xs + 0.5) / width - 0.5, (ys + 0.5) / height - 0.5
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    light = (1 + vary * (gx * xs + gy * ys)) * (1 - 0.12 * vary * (xs**2 + ys**2))
    tint = (1 + rng.normal(0, 0.03 * vary, 3)) * (1 + vary * rng.uniform(-0.08, 0.05))
    img = img * light[..., None] * tint.astype(np.float32)
    img += np.float32(rng.uniform(0.5, 3.0) * vary) * rng.standard_normal(img.shape, np.float32)
    if vary > 0 and rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, 0.7)))
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    # Height above the background (metres): wings gently curved, body raised.
    height_m = np.zeros(height * width, np.float32)
    idx = np.flatnonzero(np.maximum(wings, body) > 0)
    x, y = canon(idx)
    wing_h = 0.0008 + 0.0014 * np.clip(1 - (x * x + y * y), 0, 1)
    body_h = 0.0042 * np.sqrt(np.clip(1 - (x / 0.06) ** 2, 0, 1))
    height_m[idx] = np.maximum(wings.flat[idx] * wing_h, body.flat[idx] * body_h)
    z_bg = 0.30 * (1 + rng.uniform(-0.03, 0.03) * vary)
    return rgb, (z_bg - height_m.reshape(shape)).astype(np.float32)


def xyz_from_z(z: np.ndarray) -> np.ndarray:
    """Organised point cloud (H, W, 3) x, y, z in metres from a distance map (pinhole camera)."""
    height, width = z.shape
    f = FOCAL * width
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    x = (xs - width / 2) * z / f
    y = (ys - height / 2) * z / f
    return np.stack([x, y, z], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo. The default is 228 images of 384x256 (about 12 s of CPU time)."""

    seed: int = 0
    width: int = 384
    height: int = 256
    train_per_subspecies: int = 10  # non-hybrids of each species-A subspecies in the train CSV
    test_per_subspecies: int = 5  # non-hybrids of every subspecies (A and B) in ref_test.csv
    train_hybrids_per_type: int = 20  # signal hybrids (lativitta x notabilis) in the train CSV
    test_hybrids_per_type: int = 8  # hybrids of each type in ref_test.csv
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"demo config: {f.name}={v!r} must be an integer")
        if min(self.width, self.height) < 32:
            raise ValueError(f"demo config: width={self.width}, height={self.height}; use >= 32")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"demo config: jpeg_quality={self.jpeg_quality}; use 1..100")
        for name in ("train_per_subspecies", "test_per_subspecies", "train_hybrids_per_type",
                     "test_hybrids_per_type"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo config: {name}={getattr(self, name)}; use >= 1")

    @classmethod
    def from_dict(cls, d: dict | None) -> DemoConfig:
        return cls(**check_keys(d, cls, "demo"))


@dataclass
class _Item:
    split: str  # train | test
    parents: tuple[str, ...]  # one name for a non-hybrid, two for a hybrid
    indicator: str = ""  # major | minor | mimic (test)
    camid: str = ""
    x: int = 0

    @property
    def hybrid(self) -> bool:
        return len(self.parents) == 2

    @property
    def filename(self) -> str:
        return f"{self.camid}.jpg" if self.split == "train" else f"{self.x}_{self.camid}_d.JPG"


def _indicator(name: str) -> str:
    if SUBSPECIES[name].species == "melpomene":
        return "mimic"
    return "major" if name in SIGNAL_PARENTS else "minor"


def _plan(cfg: DemoConfig) -> list[_Item]:
    rng = np.random.default_rng([cfg.seed, 1])
    a_names = [n for n, s in SUBSPECIES.items() if s.species == "erato"]
    train = [_Item("train", (n,)) for n in a_names for _ in range(cfg.train_per_subspecies)]
    train += [_Item("train", SIGNAL_PARENTS) for _ in range(cfg.train_hybrids_per_type)]
    test = [_Item("test", (n,), _indicator(n)) for n in SUBSPECIES
            for _ in range(cfg.test_per_subspecies)]
    for p1, p2, _, ind in HYBRID_TYPES:
        for _ in range(cfg.test_hybrids_per_type):  # both cross directions occur, as in the data
            test.append(_Item("test", (p1, p2) if rng.random() < 0.5 else (p2, p1), ind))
    items = [train[i] for i in rng.permutation(len(train))]
    items += [test[i] for i in rng.permutation(len(test))]
    for i, it in enumerate(items):
        it.camid, it.x = f"DEMO{i + 1:05d}", 10001 + i
    return items


def _genes_for(item: _Item, rng: np.random.Generator) -> Genes:
    parents = [SUBSPECIES[p].genes for p in item.parents]
    g = cross(parents[0], parents[1], rng) if item.hybrid else parents[0]
    return individual(g, rng)


def _colour_name(c: Rgba | None) -> str:
    if c is None:
        return ""
    for name, rgb in PALETTE.items():
        if tuple(map(float, rgb)) == tuple(c[:3]):
            return name
    return "rgb({:.0f},{:.0f},{:.0f})".format(*c[:3])


def subspecies_table() -> pd.DataFrame:
    """One row per demo subspecies: code, name, species, mimic_of and its genes, readable."""
    rows = []
    for s in SUBSPECIES.values():
        row = {"code": s.code, "name": s.name, "species": s.species, "mimic_of": s.mimic_of or ""}
        for f in fields(Genes):
            v = getattr(s.genes, f.name)
            row[f.name] = _colour_name(v) if f.type in ("Rgba | None", "Rgba") else v
        rows.append(row)
    df = pd.DataFrame(rows)
    df["code"] = df["code"].astype("Int64")
    return df


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> str:
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"could not encode {path.name} as JPEG")
    data = buf.tobytes()
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest()


def _write_tables(root: Path, items: list[_Item], md5: dict[str, str]) -> None:
    code = {n: float(s.code) for n, s in SUBSPECIES.items() if s.code is not None}
    train = pd.DataFrame([{
        "CAMID": it.camid,
        "file_url": f"{ZENODO_LINK}/files/{it.camid}_d.JPG",
        "hybrid_stat": "hybrid" if it.hybrid else "non-hybrid",
        "split": "train",
        "zenodo_link": ZENODO_LINK,
        "md5": md5[it.camid],
        "subspecies": np.nan if it.hybrid else code[it.parents[0]],
        "parent_subspecies_1": code[it.parents[0]] if it.hybrid else np.nan,
        "parent_subspecies_2": code[it.parents[1]] if it.hybrid else np.nan,
        "filename": it.filename,
    } for it in items if it.split == "train"], columns=TRAIN_COLUMNS)
    ref = pd.DataFrame([{
        "CAMID": it.camid,
        "file_url": f"{ZENODO_LINK}/files/{it.camid}_d.JPG",
        "hybrid_stat": int(it.hybrid),
        "X": it.x,
        "subspecies_ref": " x ".join(it.parents),
        "filename": it.filename,
        "ssp_indicator": it.indicator,
    } for it in items if it.split == "test"], columns=REF_COLUMNS)
    # The challenge files: train with LF line ends, the reference CSVs with CRLF.
    train.to_csv(root / "butterfly_anomaly_train.csv", index=False, lineterminator="\n")
    ref.to_csv(root / "ref_test.csv", index=False, lineterminator="\r\n")
    subspecies_table().to_csv(root / "subspecies.csv", index=False, lineterminator="\n")


def _summary(cfg: DemoConfig, items: list[_Item]) -> dict:
    test = [it for it in items if it.split == "test"]
    by = {ind: {"non-hybrid": sum(1 for it in test if it.indicator == ind and not it.hybrid),
                "hybrid": sum(1 for it in test if it.indicator == ind and it.hybrid)}
          for ind in ("major", "minor", "mimic")}
    return {
        "images": len(items),
        "train": sum(it.split == "train" for it in items),
        "train_hybrids": sum(it.split == "train" and it.hybrid for it in items),
        "test": len(test),
        "test_by_indicator": by,
        "subspecies": len(SUBSPECIES),
        "hybrid_types": [f"{p1} x {p2} ({kind})" for p1, p2, kind, _ in HYBRID_TYPES],
        "size": [cfg.width, cfg.height],
    }


def make_demo(
    out_dir: str | Path, cfg: DemoConfig | None = None, workers: int | None = None
) -> dict:
    """Write the demo dataset to ``out_dir`` and return its summary counts.

    Layout: butterfly_anomaly_train.csv, ref_test.csv (HDR challenge formats), subspecies.csv,
    demo.json, images/ (JPEG) and depth/<image stem>.tiff (xyz float32). Everything is written to
    a hidden temporary folder beside ``out_dir`` and renamed onto it only when complete; an
    existing ``out_dir`` is replaced. ``workers`` threads draw images (the output does not depend
    on it).
    """
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    log.info("demo: drawing %s into %s", cfg, out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"demo output {out} is a file; remove it or pick a folder")
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "depth").mkdir()
        items = _plan(cfg)

        def render(i: int) -> str:  # each image has its own generator: order-independent
            it = items[i]
            rng = np.random.default_rng([cfg.seed, 2, i])
            rgb, z = draw_butterfly(_genes_for(it, rng), rng, cfg.width, cfg.height)
            write_xyz(tmp / "depth" / f"{Path(it.filename).stem}.tiff", xyz_from_z(z))
            return _write_jpeg(tmp / "images" / it.filename, rgb, cfg.jpeg_quality)

        with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
            md5 = dict(zip((it.camid for it in items), pool.map(render, range(len(items)))))
        _write_tables(tmp, items, md5)
        summary = _summary(cfg, items)
        meta = {"config": dataclasses.asdict(cfg), "summary": summary}
        (tmp / "demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("demo: wrote %d images to %s", summary["images"], out)
    return summary


# --------------------------------------------------------------------------- contact sheet


def demo_sheet(seed: int = 0, width: int = 384, height: int = 256, cell: int = 192,
               cols: int = 6) -> np.ndarray:
    """A labelled grid: one individual of every subspecies (A, then B) and of each hybrid type."""
    from hybrid.viz import contact_sheet

    images, labels = [], []
    for i, s in enumerate(SUBSPECIES.values()):
        rng = np.random.default_rng([seed, 3, i])
        images.append(draw_butterfly(individual(s.genes, rng), rng, width, height)[0])
        labels.append(f"{s.code} {s.name}" if s.code is not None else f"B {s.name}")
    for j, (p1, p2, kind, _) in enumerate(HYBRID_TYPES):
        rng = np.random.default_rng([seed, 4, j])
        g = individual(cross(SUBSPECIES[p1].genes, SUBSPECIES[p2].genes, rng), rng)
        images.append(draw_butterfly(g, rng, width, height)[0])
        labels.append(f"{p1[:5]} x {p2[:5]} ({kind})")
    return contact_sheet(images, labels, cols=cols, cell=cell)


def write_demo_sheet(path: str | Path, seed: int = 0, cell: int = 192) -> Path:
    """Write :func:`demo_sheet` as a 256-colour PNG (small enough for docs/), atomically."""
    from PIL import Image

    sheet = Image.fromarray(demo_sheet(seed=seed, cell=cell)).quantize(
        256, method=Image.Quantize.MEDIANCUT, kmeans=3, dither=Image.Dither.NONE)
    with atomic_path(path, suffix=".partial.png") as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return Path(path)
