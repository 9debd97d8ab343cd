"""The embedded industrial demo: procedurally drawn MVTec-AD-like objects and textures.

Three categories, each with its own defect types and pixel masks drawn where the defect is:

- ``bottle`` (object, seen from the top: a glass shoulder, a bright rim and the dark neck):
  ``broken_large`` (a missing wedge of glass), ``broken_small`` (a chip out of the rim),
  ``contamination`` (a coloured blob of dirt);
- ``pill`` (object: a white oblong tablet with red speckles): ``crack`` (a dark jagged line),
  ``color`` (a tinted patch), ``scratch`` (a thin grey curve);
- ``carpet`` (texture: a periodic basket weave): ``color`` (a dyed patch), ``cut`` (a dark gap
  along a thin curve), ``hole`` (a dark, deep, frayed opening).

Normal images vary in pose, size, lighting, colour and noise. The dataset is written as a real
MVTec AD tree, so the ``mvtec_ad`` reader ingests it unchanged::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png, test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (0 / 255)
    <root>/<category>/xyz/<split>/<defect>/000.tiff         (height map, MVTec 3D-AD xyz TIFF)
    <root>/demo.json                                        (config and counts)

The xyz TIFFs are the butterfly demo's mechanism (``hybrid.data.xyz``): the ``demo_industrial``
layout (:func:`read_demo_industrial`) reads the tree with the ``mvtec_ad`` reader and adds them as
``depth_path``, so ``preprocess.depth_source: dataset`` gives AHD its depth offline. The same seed
and config give byte-identical files, whatever the number of threads.

    hybrid demo-industrial results/data/demo_industrial --size 128
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hybrid.config import check_keys, choice
from hybrid.data.demo import xyz_from_z
from hybrid.data.manifest import ManifestError
from hybrid.data.mvtec import read_mvtec_ad
from hybrid.data.xyz import write_xyz
from hybrid.io import atomic_dir

log = logging.getLogger(__name__)

DEFECTS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "pill": ("crack", "color", "scratch"),
    "carpet": ("color", "cut", "hole"),
}
OBJECTS = ("bottle", "pill")  # the others are textures: the footprint is the whole image
Z_BACKGROUND = 0.30  # distance of the table from the camera (metres, as MVTec 3D-AD)


@dataclass(frozen=True)
class IndustrialDemoConfig:
    """Size of the industrial demo. The default is 144 images of 256 x 256 (a few seconds)."""

    seed: int = 0
    size: int = 256  # square images, in pixels
    train_per_category: int = 24  # normal training images of each category
    test_good_per_category: int = 6  # normal test images of each category
    test_per_defect: int = 6  # anomalies of a category's first defect type; the k-th type has k more
    categories: tuple[str, ...] = choice(tuple(DEFECTS), tuple(DEFECTS))

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(self.categories))
        for name in ("seed", "size", "train_per_category", "test_good_per_category", "test_per_defect"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"demo.industrial: {name}={v!r} must be an integer")
        if self.size < 32:
            raise ValueError(f"demo.industrial: size={self.size}; use >= 32")
        for name in ("train_per_category", "test_per_defect"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo.industrial: {name}={getattr(self, name)}; use >= 1")
        if self.test_good_per_category < 0:
            raise ValueError(f"demo.industrial: test_good_per_category={self.test_good_per_category}; use >= 0")
        unknown = [c for c in self.categories if c not in DEFECTS]
        if unknown or not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"demo.industrial: categories={list(self.categories)}; use distinct names "
                             f"from {list(DEFECTS)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> IndustrialDemoConfig:
        return cls(**check_keys(d, cls, "demo.industrial"))


@dataclass
class Sample:
    """One drawn image: uint8 RGB, distance map z (float32, metres), uint8 mask (0/255), and the
    object's footprint before any damage (the whole image for textures)."""

    rgb: np.ndarray
    z: np.ndarray
    mask: np.ndarray
    footprint: np.ndarray


# --------------------------------------------------------------------------- drawing helpers


@dataclass
class _Canvas:
    """Float layers of one image while it is drawn; ``px`` is the size of one pixel in units of
    the image side (so shapes scale with ``size``)."""

    size: int
    rgb: np.ndarray  # (S, S, 3) float32, 0..255
    height: np.ndarray  # (S, S) float32, metres above the table
    footprint: np.ndarray  # (S, S) bool
    geometry: dict = field(default_factory=dict)  # the category's pose (centre, radius, ...)

    @property
    def px(self) -> float:
        return 1.0 / self.size


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in units of the image side: x, y in (0, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)


def _field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise of unit scale with about ``cells`` blobs across the image."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles folded into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _smooth(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def _ramp(x: np.ndarray, edge: float, width: float) -> np.ndarray:
    """1 below ``edge``, 0 above, over ``width`` (anti-aliased region edge)."""
    return np.clip(0.5 - (x - edge) / width, 0, 1).astype(np.float32)


def _blob(rng: np.random.Generator, size: int, cx: float, cy: float, r: float,
          wobble: float = 0.3) -> np.ndarray:
    """Alpha (0..1) of an irregular disc of mean radius ``r`` at (cx, cy), image-side units."""
    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    theta, d = np.arctan2(dy, dx), np.hypot(dx, dy)
    rad = np.ones_like(theta)
    for k in (2, 3, 5):
        rad += wobble / k * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return _ramp(d, r * rad, 1.5 / size)


def _curve(size: int, points: np.ndarray, width_px: float) -> np.ndarray:
    """Alpha (0..1) of an anti-aliased polyline through ``points`` (image-side units)."""
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round(points * size * 16).astype(np.int32).reshape(-1, 1, 2)  # 4 fractional bits
    cv2.polylines(canvas, [pts], False, 255, max(1, round(width_px)), cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255


def _jagged(rng: np.random.Generator, start: np.ndarray, end: np.ndarray, n: int, jitter: float) -> np.ndarray:
    """A polyline from ``start`` to ``end`` with ``n`` segments, each inner vertex moved sideways."""
    t = np.linspace(0, 1, n + 1)[:, None]
    pts = start + t * (end - start)
    normal = np.array([-(end - start)[1], (end - start)[0]]) / (np.linalg.norm(end - start) + 1e-9)
    pts[1:-1] += normal * rng.uniform(-jitter, jitter, (n - 1, 1))
    return pts


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _dilate(mask: np.ndarray, radius_px: int) -> np.ndarray:
    if radius_px < 1:
        return mask
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool)


def _paint(c: _Canvas, alpha: np.ndarray, colour: np.ndarray | Iterable[float]) -> None:
    """Blend ``colour`` (RGB or an (S,S,3) layer) into the image with ``alpha``."""
    a = alpha[..., None]
    c.rgb = c.rgb * (1 - a) + np.asarray(colour, np.float32) * a


def _light(rng: np.random.Generator) -> tuple[float, float]:
    """A light direction (angle) and a gain for one image."""
    return float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.85, 1.12))


def _background(rng: np.random.Generator, size: int, base: float) -> np.ndarray:
    tint = base + rng.normal(0, 3, 3)
    return (tint + 4 * _field(rng, size, 4)[..., None]).astype(np.float32)


# --------------------------------------------------------------------------- categories


def _bottle(rng: np.random.Generator, size: int) -> _Canvas:
    """Top view of a glass bottle: dark neck (r < 0.48 R), bright rim, amber shoulder to r = R."""
    x, y = _grid(size)
    cx, cy = 0.5 + rng.normal(0, 0.015, 2)
    radius = 0.40 * (1 + rng.uniform(-0.04, 0.04))
    light, gain = _light(rng)
    dx, dy = x - cx, y - cy
    r, phi = np.hypot(dx, dy) / radius, np.arctan2(dy, dx)
    e = 1.5 / (size * radius)  # one and a half pixels in units of r
    lit = 0.78 + 0.22 * np.cos(phi - light)
    glass = np.array([74, 56, 36], np.float32) * rng.uniform(0.9, 1.1, 3)
    shoulder = glass * (0.55 + 0.6 * _smooth(1.0, 0.68, r))[..., None] * lit[..., None]
    rim_profile = np.exp(-((r - 0.58) / 0.07) ** 2)
    rim = np.array([206, 196, 178], np.float32) * (0.35 + 0.65 * rim_profile)[..., None] * lit[..., None]
    neck = np.array([34, 28, 22], np.float32) * (0.35 + 0.65 * np.clip(r / 0.48, 0, 1) ** 2)[..., None]
    specular = 70 * np.exp(-(_wrap(phi - light) ** 2 / 0.06 + (r - 0.6) ** 2 / 0.003))
    inside, in_rim, in_neck = _ramp(r, 1.0, e), _ramp(r, 0.68, e), _ramp(r, 0.48, e)
    obj = shoulder * (1 - in_rim)[..., None] + rim * (in_rim - in_neck)[..., None] + neck * in_neck[..., None]
    obj = obj + specular[..., None] * (in_rim - in_neck)[..., None]
    bg = _background(rng, size, 20)
    rgb = gain * (bg * (1 - inside)[..., None] + obj * inside[..., None])
    h_shoulder = 0.02 + 0.03 * np.clip((1 - r) / 0.32, 0, 1) ** 1.5
    h_neck = 0.055 - 0.045 * np.clip(1 - r / 0.48, 0, 1)
    height = inside * (h_shoulder * (1 - in_rim) + 0.055 * (in_rim - in_neck) + h_neck * in_neck)
    geometry = {"cx": cx, "cy": cy, "radius": radius, "light": light}
    return _Canvas(size, rgb.astype(np.float32), height.astype(np.float32), r <= 1.0, geometry)


def _pill(rng: np.random.Generator, size: int) -> _Canvas:
    """A white oblong tablet (a superellipse dome) with red speckles on a dark table."""
    x, y = _grid(size)
    cx, cy = 0.5 + rng.normal(0, 0.015, 2)
    a, b = 0.40 * (1 + rng.uniform(-0.03, 0.03)), 0.19 * (1 + rng.uniform(-0.03, 0.03))
    angle = rng.uniform(-0.08, 0.08)
    light, gain = _light(rng)
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * ca + (y - cy) * sa, -(x - cx) * sa + (y - cy) * ca
    q = (np.abs(u / a) ** 2.6 + np.abs(v / b) ** 2.6) ** (1 / 2.6)
    inside = _ramp(q, 1.0, 1.5 / (size * b))
    dome = np.sqrt(np.clip(1 - q ** 2, 0, 1))
    gy, gx = np.gradient(dome * b * size * 0.6)
    lx, ly = np.cos(light) * 0.5, np.sin(light) * 0.5
    shade = np.clip((0.8 - gx * lx - gy * ly) / np.sqrt(1 + gx ** 2 + gy ** 2), 0.35, 1.1)
    white = np.array([236, 231, 219], np.float32) * rng.uniform(0.96, 1.02, 3)
    obj = white * (0.75 + 0.25 * shade)[..., None]
    speckles = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(20, 36))):  # red dots inside the tablet
        t, s = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.75))
        px = cx + s * (a * np.cos(t) * ca - b * np.sin(t) * sa)
        py = cy + s * (a * np.cos(t) * sa + b * np.sin(t) * ca)
        rad = rng.uniform(0.005, 0.011) * size
        cv2.circle(speckles, (round(px * size * 16), round(py * size * 16)), max(1, round(rad * 16)), 1.0,
                   -1, cv2.LINE_AA, shift=4)
    obj = obj * (1 - speckles[..., None]) + np.array([176, 62, 52], np.float32) * speckles[..., None]
    bg = _background(rng, size, 28)
    rgb = gain * (bg * (1 - inside)[..., None] + obj * inside[..., None])
    height = 0.004 + 0.003 * dome
    geometry = {"cx": cx, "cy": cy, "a": a, "b": b, "angle": angle, "q": q}
    return _Canvas(size, rgb.astype(np.float32), (inside * height).astype(np.float32), q <= 1.0, geometry)


def _carpet(rng: np.random.Generator, size: int) -> _Canvas:
    """A basket weave: blocks of two threads, alternately along x and y, with fibre noise."""
    x, y = _grid(size)
    period = 1 / rng.uniform(5, 7)  # blocks across the image: 10-14 threads
    angle = rng.uniform(-0.05, 0.05)
    light, gain = _light(rng)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x * ca + y * sa) / period + rng.uniform(0, 1)
    v = (-x * sa + y * ca) / period + rng.uniform(0, 1)
    along_x = (np.floor(u) + np.floor(v)) % 2 == 0
    ridge = np.where(along_x, np.abs(np.sin(2 * np.pi * v)), np.abs(np.sin(2 * np.pi * u))) ** 0.6
    fibres = 0.5 * _field(rng, size, max(4, size // 3)) + 0.5 * _field(rng, size, max(4, size // 6))
    colours = [(150, 132, 112), (120, 118, 128), (160, 150, 120), (118, 104, 92)]
    base = np.array(colours[int(rng.integers(len(colours)))], np.float32) * rng.uniform(0.94, 1.06, 3)
    ramp = 1 + 0.08 * ((x - 0.5) * np.cos(light) + (y - 0.5) * np.sin(light))
    tone = (0.62 + 0.38 * ridge + 0.05 * fibres) * ramp
    rgb = gain * base * tone[..., None]
    height = 0.003 + 0.0015 * ridge + 0.0004 * along_x
    return _Canvas(size, rgb.astype(np.float32), height.astype(np.float32),
                   np.ones((size, size), bool), {"period": period})


BASES: dict[str, Callable[[np.random.Generator, int], _Canvas]] = {
    "bottle": _bottle, "pill": _pill, "carpet": _carpet}


# --------------------------------------------------------------------------- defects
# Each draws into the canvas with the defect's own generator and returns its alpha (0..1); the mask
# is where the alpha is at least a quarter, widened by ``grow`` pixels, inside the footprint.


def _polar(c: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(c.size)
    g = c.geometry
    return np.hypot(x - g["cx"], y - g["cy"]) / g["radius"], np.arctan2(y - g["cy"], x - g["cx"])


def _broken(c: _Canvas, rng: np.random.Generator, half_width: tuple[float, float],
            r_in: tuple[float, float], r_out: float) -> np.ndarray:
    """A piece of glass missing between two jagged radii over an angular sector."""
    r, phi = _polar(c)
    a0 = rng.uniform(-np.pi, np.pi)
    d = np.abs(_wrap(phi - a0))
    w = rng.uniform(*half_width)
    jag_r = rng.uniform(*r_in) + 0.04 * np.sin(phi * rng.integers(9, 15) + rng.uniform(0, 6)) \
        + 0.02 * np.sin(phi * rng.integers(23, 31))
    jag_w = w * (1 + 0.12 * np.sin(r * rng.integers(11, 17) + rng.uniform(0, 6)))
    e = 1.5 / (c.size * c.geometry["radius"])
    alpha = _ramp(d, jag_w, 1.5 / c.size / 0.3) * (1 - _ramp(r, jag_r, e)) * _ramp(r, r_out, e)
    inside = (alpha >= 0.5).astype(np.uint8)
    edge = np.exp(-(cv2.distanceTransform(inside, cv2.DIST_L2, 3) / max(1.0, c.size / 100)) ** 2)
    inner = np.array([28, 24, 20], np.float32) * (0.8 + 0.4 * rng.random())
    layer = inner + 120 * edge[..., None] * np.array([1.0, 0.96, 0.9], np.float32)  # bright fracture
    _paint(c, alpha, layer)
    c.height = c.height * (1 - alpha) + 0.006 * alpha
    return alpha


def _broken_large(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    return _broken(c, rng, (0.3, 0.55), (0.42, 0.55), 1.0)


def _broken_small(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    return _broken(c, rng, (0.09, 0.16), (0.5, 0.58), 0.74)


def _contamination(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A blob of dirt (dust, rust or mould) on the bottle."""
    g = c.geometry
    t, s = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.7) * g["radius"]
    r = rng.uniform(0.07, 0.13)
    alpha = _blob(rng, c.size, g["cx"] + s * np.cos(t), g["cy"] + s * np.sin(t), r * g["radius"] / 0.4, 0.45)
    alpha *= c.footprint
    palette = [(205, 198, 182), (128, 58, 30), (74, 104, 52), (182, 150, 60)]
    colour = np.array(palette[int(rng.integers(len(palette)))], np.float32)
    layer = colour * (0.85 + 0.15 * _field(rng, c.size, max(3, c.size // 16)))[..., None]
    _paint(c, 0.92 * alpha, layer)
    c.height = c.height + 0.002 * alpha
    return alpha


def _pill_point(c: _Canvas, rng: np.random.Generator, s: float, t: float) -> np.ndarray:
    """The point at relative radius ``s`` and angle ``t`` of the tablet (image-side units)."""
    g = c.geometry
    ca, sa = np.cos(g["angle"]), np.sin(g["angle"])
    u, v = s * g["a"] * np.cos(t), s * g["b"] * np.sin(t)
    return np.array([g["cx"] + u * ca - v * sa, g["cy"] + u * sa + v * ca])


def _crack(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A dark jagged crack running into the tablet from near its edge."""
    t0 = rng.uniform(0, 2 * np.pi)
    start = _pill_point(c, rng, 0.97, t0)
    end = _pill_point(c, rng, rng.uniform(0.1, 0.5), t0 + np.pi + rng.uniform(-0.8, 0.8))
    pts = _jagged(rng, start, end, int(rng.integers(6, 10)), 0.03)
    alpha = _curve(c.size, pts, max(1.0, c.size / 110)) * (c.geometry["q"] < 0.99)
    _paint(c, 0.9 * alpha, np.array([72, 60, 52], np.float32))
    c.height = c.height - 0.001 * alpha
    return alpha


def _pill_color(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A tinted (yellowed or browned) patch of the tablet."""
    centre = _pill_point(c, rng, rng.uniform(0, 0.55), rng.uniform(0, 2 * np.pi))
    alpha = _blob(rng, c.size, *centre, rng.uniform(0.06, 0.1), 0.35) * (c.geometry["q"] < 0.97)
    tint = np.array([[1.0, 0.82, 0.48], [0.9, 0.7, 0.55], [0.75, 0.85, 1.0]][int(rng.integers(3))], np.float32)
    _paint(c, alpha, c.rgb * tint)
    return alpha


def _pill_scratch(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A thin grey curved scratch across the tablet."""
    t = rng.uniform(0, 2 * np.pi)
    p0 = _pill_point(c, rng, rng.uniform(0.5, 0.85), t)
    p2 = _pill_point(c, rng, rng.uniform(0.5, 0.85), t + np.pi + rng.uniform(-0.6, 0.6))
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.05, 2)
    alpha = _curve(c.size, _bezier(p0, p1, p2), max(1.0, c.size / 160)) * (c.geometry["q"] < 0.99)
    _paint(c, 0.8 * alpha, np.array([138, 134, 130], np.float32))
    c.height = c.height - 0.0003 * alpha
    return alpha


def _carpet_color(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A dyed patch: the weave keeps its texture but changes colour."""
    r = rng.uniform(0.06, 0.11)
    centre = rng.uniform(r + 0.05, 1 - r - 0.05, 2)
    alpha = _blob(rng, c.size, *centre, r, 0.4)
    tint = np.array([[0.55, 0.7, 1.35], [1.4, 0.7, 0.55], [0.6, 1.25, 0.6]][int(rng.integers(3))], np.float32)
    _paint(c, alpha, np.clip(c.rgb * tint, 0, 255))
    return alpha


def _cut(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A cut: a dark gap along a slightly curved line."""
    length = rng.uniform(0.2, 0.35)
    centre = rng.uniform(0.25, 0.75, 2)
    t = rng.uniform(0, np.pi)
    d = np.array([np.cos(t), np.sin(t)]) * length / 2
    p1 = centre + rng.normal(0, 0.03, 2)
    alpha = _curve(c.size, _bezier(centre - d, p1, centre + d), max(1.0, c.size / 90))
    _paint(c, 0.9 * alpha, np.array([34, 30, 26], np.float32))
    c.height = c.height - 0.0025 * alpha
    return alpha


def _hole(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """A hole: a dark, deep opening with a frayed light border."""
    r = rng.uniform(0.045, 0.085)
    centre = rng.uniform(r + 0.05, 1 - r - 0.05, 2)
    alpha = _blob(rng, c.size, *centre, r, 0.35)
    core = _blob(rng, c.size, *centre, 0.7 * r, 0.3)
    frayed, dark = np.array([196, 184, 160], np.float32), np.array([22, 20, 18], np.float32)
    layer = frayed * (1 - core[..., None]) + dark * core[..., None]
    _paint(c, alpha, layer)
    c.height = c.height * (1 - alpha) - 0.004 * core
    return alpha


DRAW_DEFECT: dict[tuple[str, str], Callable[[_Canvas, np.random.Generator], np.ndarray]] = {
    ("bottle", "broken_large"): _broken_large,
    ("bottle", "broken_small"): _broken_small,
    ("bottle", "contamination"): _contamination,
    ("pill", "crack"): _crack,
    ("pill", "color"): _pill_color,
    ("pill", "scratch"): _pill_scratch,
    ("carpet", "color"): _carpet_color,
    ("carpet", "cut"): _cut,
    ("carpet", "hole"): _hole,
}
assert set(DRAW_DEFECT) == {(c, d) for c, ds in DEFECTS.items() for d in ds}


def draw(category: str, rng: np.random.Generator, size: int = 256, defect: str = "good",
         defect_rng: np.random.Generator | None = None) -> Sample:
    """One image of ``category``: the normal object from ``rng`` and, unless ``defect`` is
    "good", the defect from ``defect_rng``. The same ``rng`` state with and without a defect gives
    the same object, lighting and noise, so the two differ only where the defect is."""
    if category not in DEFECTS:
        raise ValueError(f"unknown industrial demo category {category!r}; use one of {list(DEFECTS)}")
    if defect != "good" and defect not in DEFECTS[category]:
        raise ValueError(f"{category} has no defect {defect!r}; use one of {list(DEFECTS[category])}")
    c = BASES[category](rng, size)
    noise = rng.normal(0, rng.uniform(1.5, 3.0), (size, size, 3)).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    if defect != "good":
        alpha = DRAW_DEFECT[category, defect](c, defect_rng or np.random.default_rng())
        grow = max(1, round(size / 128))
        mask = (_dilate(alpha >= 0.25, grow) & c.footprint).astype(np.uint8) * 255
        if not mask.any():
            raise RuntimeError(f"{category}/{defect}: the defect missed the object; report this seed")
    rgb = np.clip(np.rint(c.rgb + noise), 0, 255).astype(np.uint8)
    z = (Z_BACKGROUND - c.height).astype(np.float32)
    return Sample(rgb, z, mask, c.footprint)


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class _Item:
    category: str
    split: str  # train | test
    defect: str  # good or the defect type
    index: int  # file number within its folder
    key: tuple[int, ...]  # seeds of this image's generators


def plan(cfg: IndustrialDemoConfig) -> list[_Item]:
    """Every image of the dataset, in writing order, each with its own seed."""
    items = []
    for cat in cfg.categories:
        ck = list(DEFECTS).index(cat)  # a category's images do not depend on which others are drawn
        items += [_Item(cat, "train", "good", i, (ck, 0, 0, i)) for i in range(cfg.train_per_category)]
        items += [_Item(cat, "test", "good", i, (ck, 1, 0, i)) for i in range(cfg.test_good_per_category)]
        for k, d in enumerate(DEFECTS[cat]):
            items += [_Item(cat, "test", d, i, (ck, 2, k + 1, i)) for i in range(cfg.test_per_defect + k)]
    return items


def render(item: _Item, cfg: IndustrialDemoConfig) -> Sample:
    return draw(item.category, np.random.default_rng([cfg.seed, 7, *item.key]), cfg.size, item.defect,
                np.random.default_rng([cfg.seed, 8, *item.key]))


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array[..., ::-1] if array.ndim == 3 else array):
        raise OSError(f"could not write {path}")


def _summary(cfg: IndustrialDemoConfig, items: list[_Item]) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for it in items:
        key = "train" if it.split == "train" else f"test/{it.defect}"
        counts.setdefault(it.category, {}).setdefault(key, 0)
        counts[it.category][key] += 1
    return {"images": len(items), "categories": counts, "size": cfg.size}


def make_demo_industrial(out_dir: str | Path, cfg: IndustrialDemoConfig | None = None,
                         workers: int | None = None) -> dict:
    """Write the industrial demo (an MVTec AD tree plus xyz height maps) to ``out_dir`` and return
    its counts. Written to a hidden folder beside ``out_dir`` and renamed onto it when complete;
    an existing ``out_dir`` is replaced. ``workers`` threads draw images (the output does not
    depend on it)."""
    cfg = cfg or IndustrialDemoConfig()
    out = Path(out_dir)
    log.info("industrial demo: drawing %s into %s", cfg, out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"industrial demo output {out} is a file; remove it or pick a folder")
    with atomic_dir(out) as tmp:
        items = plan(cfg)

        def one(it: _Item) -> None:
            s = render(it, cfg)
            name = f"{it.index:03d}"
            cat = tmp / it.category
            _write_png(cat / it.split / it.defect / f"{name}.png", s.rgb)
            if it.defect != "good":
                _write_png(cat / "ground_truth" / it.defect / f"{name}_mask.png", s.mask)
            xyz = cat / "xyz" / it.split / it.defect / f"{name}.tiff"
            xyz.parent.mkdir(parents=True, exist_ok=True)
            write_xyz(xyz, xyz_from_z(s.z))

        with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(one, items))
        summary = _summary(cfg, items)
        meta = {"config": dataclasses.asdict(cfg), "summary": summary, "defects": DEFECTS}
        (tmp / "demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("industrial demo: wrote %d images to %s", summary["images"], out)
    return summary


def read_demo_industrial(root: str | Path, categories: str | Iterable[str] | None = None,
                         missing: str = "error") -> pd.DataFrame:
    """The industrial demo's tree, read by the ``mvtec_ad`` reader, with each image's height map
    ``<category>/xyz/<split>/<defect>/<stem>.tiff`` as depth_path (required, like MVTec 3D-AD's)."""
    df = read_mvtec_ad(root, categories, missing)
    skipped = list(df.attrs.get("skipped", []))
    images = [Path(p) for p in df["image_path"]]  # <root>/<category>/<split dir>/<defect>/<stem>.png
    depth = [str(p.parents[2] / "xyz" / p.parents[1].name / p.parent.name / f"{p.stem}.tiff") for p in images]
    present = np.array([os.path.isfile(p) for p in depth], bool)
    if not present.all():
        lacking = [p for p, ok in zip(depth, present) if not ok]
        if missing == "error":
            raise ManifestError(f"demo_industrial: {len(lacking)} images have no height map, e.g. {lacking[:3]}; "
                                "rewrite the demo (delete its folder and rerun) or set ingest.missing: skip")
        skipped += [{"path": img, "source": str(Path(p).parent), "reason": "no depth", "category": c, "defect": d}
                    for img, p, c, d, ok in zip(df["image_path"], depth, df["category"], df["defect"], present)
                    if not ok]
    out = df.assign(depth_path=pd.Series(depth, index=df.index, dtype="string"))[present].reset_index(drop=True)
    out.attrs["skipped"] = skipped
    return out
