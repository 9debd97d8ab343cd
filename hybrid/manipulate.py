"""Local anomaly regions and the condition manipulations of AnomalyHybrid (paper 003, Sec. 3.5).

A local anomaly is made by editing the *target* edge and depth maps inside a region before they
reach the generator (Fig. 2a, Fig. 5, Table 7):

- Region ("Mask"): the union of regions drawn on the target and on the reference; the reference
  (its regions and its maps) is first augmented into the target frame by a random flip, resize
  about the centre and shift (crop). Each region is a random shape with a drawn area and aspect
  ratio, chosen as the ``k`` highest pixels of a score field, so its area is exact: a ``blob``
  (an elliptic envelope plus smooth noise, thresholded), an ``ellipse``, a ``rectangle`` or a
  star-shaped ``polygon``. Object-aware regions (AnomalyFactory's "semantic" regions, without
  SAM) are drawn inside the object foreground, the pixels nearer than the background in depth or
  unlike the border colour, and the union is cut to the target's foreground: anomalies land on
  the object.
- Region from real defects (industrial protocol, Sec. 3.5: "the local anomaly regions are the
  combination of augmented anomaly regions of reference and target images. The augmentation
  basically consists of resize, flip and crop"): reference and target are base-set anomalies of
  one defect type; the region is the target's ground-truth mask united with the reference's mask
  moved into the target frame by the reference's flip / resize / crop (the affine that also moves
  the reference's maps), dilated by ``mask_dilation`` pixels. The target mask stays where it is,
  so the region covers the target's own defect, which its maps still show.
- ``merge``: reference and target combined (edges: maximum; depth: a random blend).
- ``remove``: edges cleared (-1) and depth set to the background (median on the image border):
  holes, cracks, cuts.
- ``replace``: target values replaced by the (augmented) reference's.
- ``tps``: a thin-plate-spline warp of the target maps, confined to the region.

Maps are float tensors in the model range [-1, 1], shaped (C, H, W): ``image`` (3), ``edge`` and
``depth`` (1, nearness: larger = nearer); an ``image`` may also come as stored (uint8). Outside
the region every map is returned bit-identical. All randomness comes from the caller's
``numpy.random.Generator``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from hybrid.augment import tps_warp_grid
from hybrid.config import check_choices, check_keys, choice
from hybrid.data.shards import unit_tensor

Maps = dict[str, torch.Tensor]
SHAPES = ("blob", "ellipse", "rectangle", "polygon")
MANIPULATION_NAMES = ("merge", "remove", "replace", "tps")  # the keys of MANIPULATIONS (below)
FOREGROUNDS = ("auto", "depth", "color")
MANIPULATED = ("edge", "depth")  # the target conditions a manipulation edits
_BORDER = 0.05  # width of the border ring that defines the background, fraction of the short side
_FG_FRACTION = (0.01, 0.9)  # a usable foreground covers this fraction of the image


@dataclass
class ManipulateConfig:
    """Local anomaly settings (the ``generate.manipulate`` config section)."""

    manipulations: list[str] = choice(MANIPULATION_NAMES, default_factory=lambda: list(MANIPULATION_NAMES))
    shapes: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in SHAPES})  # weights
    area: tuple[float, float] = (0.005, 0.04)  # area of each region, fraction of the image
    aspect: tuple[float, float] = (0.25, 4.0)  # width / height of a shape (drawn log-uniformly)
    regions: tuple[int, int] = (1, 2)  # regions drawn on each of target and reference
    object_aware: float = 0.9  # probability that regions are kept on the object foreground
    foreground: str = choice(FOREGROUNDS, "auto")  # auto: depth, else colour
    foreground_threshold: float = 0.1  # departure from the border value, fraction of the range
    reference_scale: tuple[float, float] = (0.8, 1.25)  # resize of the reference about the centre
    reference_shift: float = 0.15  # max shift (crop) of the reference, fraction of the side
    reference_flip: float = 0.5  # probability of each flip (left-right, top-bottom)
    merge_weight: tuple[float, float] = (0.3, 0.7)  # weight of the target depth in a merge
    tps_shift: float = 0.12  # max TPS control-point shift, fraction of the region's box side
    mask_dilation: int = 0  # pixels added around a region made of real defect masks

    def __post_init__(self) -> None:
        self.manipulations = list(self.manipulations)
        if not self.manipulations:
            raise ValueError(f"manipulate.manipulations is empty; use some of {sorted(MANIPULATIONS)}")
        check_choices(self, "manipulate")
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes or min(self.shapes.values()) < 0 or sum(self.shapes.values()) <= 0:
            raise ValueError(f"manipulate.shapes {self.shapes}: give non-negative weights with a positive "
                             f"sum to some of {list(SHAPES)}")
        for name in ("area", "aspect", "regions", "reference_scale", "merge_weight"):
            lo, hi = _pair(name, getattr(self, name))
            if not 0 <= lo <= hi:
                raise ValueError(f"manipulate.{name} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
            setattr(self, name, (int(lo), int(hi)) if name == "regions" else (float(lo), float(hi)))
        if not 0 < self.area[1] <= 1 or self.aspect[0] <= 0 or self.regions[1] < 1 or self.reference_scale[0] <= 0:
            raise ValueError(f"manipulate: area {self.area} must lie in (0, 1], aspect {self.aspect} and "
                             f"reference_scale {self.reference_scale} must be positive, regions {self.regions} "
                             "must allow at least one")
        if self.mask_dilation < 0:
            raise ValueError(f"manipulate.mask_dilation must be >= 0 pixels, got {self.mask_dilation}")
        for name in ("object_aware", "reference_flip", "merge_weight"):
            v = getattr(self, name)
            if not all(0 <= x <= 1 for x in (v if isinstance(v, tuple) else (v,))):
                raise ValueError(f"manipulate.{name} must lie in [0, 1], got {v}")

    @classmethod
    def from_dict(cls, d: Mapping) -> ManipulateConfig:
        return cls(**check_keys(d, cls, "manipulate"))


def _pair(name: str, v) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"manipulate.{name} must be a (min, max) pair, got {v!r}")
    return v[0], v[1]


def check_manipulation(name: str) -> str:
    """``name`` if it is a manipulation, else a ValueError naming it and listing the valid ones."""
    if name not in MANIPULATIONS:
        raise ValueError(f"unknown manipulation {name!r}; valid manipulations are {', '.join(MANIPULATIONS)}")
    return name


# ----------------------------------------------------------------------------- OpenCV's threads
@contextlib.contextmanager
def opencv_threads(n: int = 1) -> Iterator[None]:
    """OpenCV's thread count set to ``n`` inside the block and restored after it.

    The manipulations call OpenCV once per map on images of a few hundred pixels (warps, resizes,
    dilations). Split over OpenCV's thread pool such a call costs more CPU than on the calling
    thread: the pool's threads wait spinning between calls. Measured in the generate stage on a
    2-core VM (one torch thread, 1,024 images at 256 px): 0.33 ms of host CPU per generated image,
    about 14%, of which 0.2 ms was the pool's second thread. Parallel work comes from DataLoader
    workers instead (:func:`one_opencv_thread` is their ``worker_init_fn``). The values are the
    same: OpenCV splits an image into stripes, and each pixel is computed alike."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def one_opencv_thread(worker_id: int = 0) -> None:
    """A DataLoader's ``worker_init_fn``: OpenCV on the worker's own thread (:func:`opencv_threads`;
    a worker started by spawn or forkserver does not inherit its parent's setting)."""
    cv2.setNumThreads(1)


# ----------------------------------------------------------------------------- foreground
def border_ring(height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels within 5% of the short side from the image border."""
    b = max(1, round(_BORDER * min(height, width)))
    ring = np.ones((height, width), bool)
    ring[b:height - b, b:width - b] = False
    return ring


@functools.lru_cache(maxsize=16)
def _ring_pixels(height: int, width: int) -> torch.Tensor:
    """The flat indices of :func:`border_ring`'s pixels, row-major (as boolean indexing takes them)."""
    return torch.from_numpy(np.flatnonzero(border_ring(height, width)))


def background_value(x: torch.Tensor) -> torch.Tensor:
    """Per-channel median of ``x`` (C, H, W) on the border ring (the lower middle value, as torch's
    median), shaped (C, 1, 1)."""
    return torch.from_numpy(_border_median(x.cpu().numpy())).to(x.device)


def foreground(maps: Mapping[str, torch.Tensor], mode: str = "auto", threshold: float = 0.1) -> np.ndarray | None:
    """The object's pixels (H, W) bool, or None where no object stands out (textures).

    ``depth``: nearer than the border median by more than ``threshold`` of the depth range;
    ``color``: some channel differs from the border median colour by more than ``threshold`` of
    the value range; ``auto``: depth when it gives a usable foreground (1% to 90% of the image),
    else colour. Computed in numpy by the float32 operations of torch's median and comparison: the
    same pixels in about half the time.
    """
    def usable(fg: np.ndarray) -> np.ndarray | None:
        # torch's float32 mean of the 0 / 1 values: their exact count over the pixels, rounded once
        frac = float(np.float32(np.count_nonzero(fg)) / np.float32(fg.size)) if fg.size <= 1 << 24 else \
            float(torch.from_numpy(fg).float().mean())
        return fg if _FG_FRACTION[0] <= frac <= _FG_FRACTION[1] else None

    if mode in ("auto", "depth") and "depth" in maps:
        d = maps["depth"].cpu().numpy()
        fg = usable((d - _border_median(d))[0] > np.float32(2 * threshold))
        if fg is not None or mode == "depth":
            return fg
    if mode in ("auto", "color") and "image" in maps:
        im = unit_tensor(maps["image"]).cpu().numpy()
        return usable((np.abs(im - _border_median(im)) > np.float32(2 * threshold)).any(0))
    return None


def _border_median(x: np.ndarray) -> np.ndarray:
    """:func:`background_value` of ``x`` (C, H, W) as an array (C, 1, 1)."""
    values = x.reshape(len(x), -1)[:, _ring_pixels(*x.shape[-2:]).numpy()]
    middle = (values.shape[1] - 1) // 2
    return np.partition(values, middle, axis=1)[:, middle, None, None]


# ----------------------------------------------------------------------------- regions
def _shape_coords(height: int, width: int, centre: tuple[float, float], radius: float, aspect: float,
                  angle: float, rows: slice = slice(None), cols: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """The shape's own coordinates (u, v), float32, of the pixels ``rows`` x ``cols`` of the (H, W)
    image: the shape of the circle of ``radius`` is then the unit disc (a window gets the very
    values of the full field's pixels)."""
    dx = np.arange(width, dtype=np.float32)[cols][None] - np.float32(centre[0])
    dy = np.arange(height, dtype=np.float32)[rows][:, None] - np.float32(centre[1])
    c, s, k = math.cos(angle), math.sin(angle), math.sqrt(aspect)
    u = dx * np.float32(c / (k * radius)) + dy * np.float32(s / (k * radius))  # (H, W) by broadcasting
    v = dx * np.float32(-s * k / radius) + dy * np.float32(c * k / radius)
    return u, v


def _mod_2pi(x: np.ndarray) -> np.ndarray:
    """``np.mod(x, 2 * math.pi)`` bit for bit (in x's dtype), several times faster: for |x| < 2 pi,
    numpy's remainder is x itself, x + 2 pi below 0, and +0.0 for -0.0 (x + 0)."""
    b = x.dtype.type(2 * math.pi)
    if x.size and not (x.min() > -b and x.max() < b):
        return np.mod(x, 2 * math.pi)
    return x + np.where(x < 0, b, x.dtype.type(0))


def _polygon(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A random star-shaped polygon: its sorted vertex angles ``theta`` (gaps < pi: each jittered by
    < 0.2 of the spacing) and radii, kept per position ``p`` of ``np.searchsorted(theta, phi, "right")``
    (the edge from vertex i = p - 1 mod n to j = i + 1): theta[i], r[i], r[j], the gap theta[j] -
    theta[i] and r[i] r[j] sin(gap), so that a pixel only computes what depends on its angle phi."""
    n = int(rng.integers(3, 9))
    theta = np.sort(np.mod((np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * math.pi / n
                           + rng.uniform(0, 2 * math.pi), 2 * math.pi))
    r = rng.uniform(0.5, 1.0, n)
    i = (np.arange(n + 1) - 1) % n
    j = (i + 1) % n
    gap = np.mod(theta[j] - theta[i], 2 * math.pi)
    return theta, theta[i], r[i], r[j], gap, r[i] * r[j] * np.sin(gap)


def _polygon_score(u: np.ndarray, v: np.ndarray, polygon: tuple[np.ndarray, ...]) -> np.ndarray:
    """-|(u, v)| / (the polygon's boundary radius at the angle of (u, v)), float64 (larger = more inside).
    In place, the float operations of ``-hypot(u, v) / (r[i] r[j] sin(gap) / (r[i] sin(rel) + r[j]
    sin(gap - rel)))``, rel = phi - theta[i] mod 2 pi, in their order: bit for bit the same values."""
    theta, theta_i, r_i, r_j, gap, num = polygon
    phi = _mod_2pi(np.arctan2(v, u))
    p = np.searchsorted(theta, phi, side="right")
    rel = _mod_2pi(phi - theta_i[p])
    other = gap[p]
    other -= rel
    other = np.sin(other, out=other)
    other *= r_j[p]
    den = np.sin(rel, out=rel)
    den *= r_i[p]
    den += other
    edge = num[p]
    edge /= den  # the boundary radius, <= max(r) <= 1: on a chord between two vertices
    h = np.hypot(u, v)
    return np.divide(np.negative(h, out=h), edge, out=edge)


def _scorer(shape: str, height: int, width: int, centre: tuple[float, float], radius: float, aspect: float,
            angle: float, rng: np.random.Generator) -> tuple[Callable[..., np.ndarray], Callable[[float], float],
                                                             float]:
    """A shape's score, drawing what it needs from ``rng``: ``score(rows, cols, t=inf)``, the score
    field over a window of the image (the very values of the whole field's pixels; those with
    |(u, v)| >= 1.01 t may be left at -inf instead); ``bound(t)``, above the score of every pixel
    with |(u, v)| >= t, float rounding included; and ``t``, about where the top pixels end in (u, v)
    (the shape's ``k`` = pi radius^2 pixels fill an area pi there)."""
    def coords(rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        return _shape_coords(height, width, centre, radius, aspect, angle, rows, cols)

    def ellipse(rows: slice, cols: slice, t: float = math.inf) -> np.ndarray:
        u, v = coords(rows, cols)
        return -(u * u + v * v)

    if shape == "ellipse":
        return ellipse, lambda t: -0.999 * t * t, 1.1
    if shape == "rectangle":  # max(|u|, |v|) >= |(u, v)| / sqrt 2; the square of area pi has corners at 1.25
        def rectangle(rows: slice, cols: slice, t: float = math.inf) -> np.ndarray:
            u, v = coords(rows, cols)
            return -np.maximum(np.abs(u), np.abs(v))

        return rectangle, lambda t: -0.999 * t / math.sqrt(2), 1.4
    if shape == "polygon":  # a random star-shaped polygon: radius of its boundary at each angle (<= R)
        polygon = _polygon(rng)
        big = float(polygon[2].max())  # R, the largest vertex radius: no boundary point is farther
        last: list = []  # the previous window's (rows, cols, field, disc): a grown window reuses it

        def star(rows: slice, cols: slice, t: float = math.inf) -> np.ndarray:
            u, v = coords(rows, cols)
            if t == math.inf:
                return _polygon_score(u, v, polygon)
            near = u * u + v * v < np.float32(1.01 * t) ** 2  # the costly score in the disc only
            out = np.full(u.shape, -np.inf)
            todo = near
            if last and all(o.start >= n.start and o.stop <= n.stop for o, n in zip(last[:2], (rows, cols))):
                inner = tuple(slice(o.start - n.start, o.stop - n.start) for o, n in zip(last[:2], (rows, cols)))
                out[inner] = last[2]  # scored before (the same values: each pixel's own)
                todo = near.copy()
                todo[inner] &= ~last[3]
            out[todo] = _polygon_score(u[todo], v[todo], polygon)
            last[:] = rows, cols, out, near | (out > -np.inf)
            return out

        # its area is half the sum of r[i] r[j] sin(gap) over the n edges; scaled to area pi, no
        # boundary point is farther than R times the scale
        return star, lambda t: -0.999 * t / big, 1.1 * big * math.sqrt(2 * math.pi / polygon[-1][1:].sum())
    if shape == "blob":  # thresholded smooth noise under an elliptic envelope: an irregular blob
        cells = int(np.clip(round(max(height, width) / (0.7 * radius)), 4, 64))
        noise = cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (width, height),
                           interpolation=cv2.INTER_CUBIC)
        mean, std = noise.mean(), noise.std() + 1e-8  # normalised where scored: the same values
        top = 0.801 * float((noise.max() - mean) / std) + 1e-6  # 0.8 x the normalised noise is below this

        def blob(rows: slice, cols: slice, t: float = math.inf) -> np.ndarray:
            return ellipse(rows, cols) + 0.8 * ((noise[rows, cols] - mean) / std)

        return blob, lambda t: -0.999 * t * t + top, math.sqrt(1 + 1.6 * max(top, 0.0))
    raise ValueError(f"unknown region shape {shape!r}; valid shapes are {', '.join(SHAPES)}")


def shape_field(shape: str, height: int, width: int, centre: tuple[float, float], radius: float,
                aspect: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Score (H, W) of a shape centred at ``centre`` (x, y): larger = more inside. Its top pixels
    form the shape; ``radius`` is that of the circle of the wanted area."""
    return _scorer(shape, height, width, centre, radius, aspect, angle, rng)[0](slice(None), slice(None))


def top_pixels(score: np.ndarray, allowed: np.ndarray | None, k: int) -> np.ndarray:
    """(H, W) bool of the ``k`` highest-scoring allowed pixels (all allowed ones if fewer).

    The pixels of ``np.argpartition`` over the whole field, found faster: the k-th best score is
    found among the pixels above a threshold read off a sample (:func:`_kth_largest`), and when
    no other pixel ties with it the top k are one set whatever order ties are left in, so they are
    argpartition's. A tie at the k-th score (point-symmetric ellipses and rectangles about a pixel
    centre: about a third of their draws) takes argpartition's pick over the whole field, as before."""
    flat = score.ravel()
    ok = None if allowed is None else allowed.ravel()
    k = int(min(max(k, 1), flat.size if ok is None else np.count_nonzero(ok)))
    if k <= 0:
        return np.zeros(score.shape, bool)
    top = flat >= _kth_largest(flat, ok, k)
    if ok is not None:
        top &= ok
    if np.count_nonzero(top) == k:
        return top.reshape(score.shape)
    out = np.zeros(flat.size, bool)
    out[np.argpartition(-(flat if ok is None else np.where(ok, flat, -np.inf)), k - 1)[:k]] = True
    return out.reshape(score.shape)


def _kth_largest(flat: np.ndarray, ok: np.ndarray | None, k: int) -> np.floating:
    """The ``k``-th largest of ``flat``'s values where ``ok`` (1 <= k <= their count), exactly.

    A strided sample gives a threshold with about 1.5 k pixels above it (k is a compact region's
    area, a few percent of the image); when at least k are, the k-th largest is among them, so
    only those are partitioned (about 0.1 ms at 256 x 256 against 0.6 for a partition of all)."""
    stride = max(1, flat.size // 4096)
    sample = flat[::stride] if ok is None else flat[::stride][ok[::stride]]
    m = int(1.5 * k / stride) + 8  # sample values above the threshold
    while m < sample.size:
        above = flat >= np.partition(sample, sample.size - m)[sample.size - m]
        if ok is not None:
            above &= ok
        n = np.count_nonzero(above)
        if n >= k:
            return np.partition(flat[above], n - k)[n - k]
        m *= 4
    values = flat if ok is None else flat[ok]
    return np.partition(values, values.size - k)[values.size - k]


def _shape_region(shape: str, height: int, width: int, centre: tuple[float, float], radius: float, aspect: float,
                  angle: float, rng: np.random.Generator, allowed: np.ndarray | None, k: int,
                  count: int | None = None) -> np.ndarray:
    """``top_pixels(shape_field(shape, ...), allowed, k)``, the very same pixels, with the shape scored
    only in a window about its centre where that provably finds them. Every pixel outside the window
    has |(u, v)| >= t, so scores at most ``bound(t)`` (:func:`_scorer`); when the k-th best allowed
    score inside is above that, no pixel outside is among the top k; when no other pixel inside ties
    with the k-th, the top k are one set whatever order ``np.argpartition`` leaves ties in, so they
    are its pick. Otherwise the window grows, and a tie or a window of the whole image scores the
    whole image. ``count``: how many pixels ``allowed`` holds, when the caller knows."""
    score, bound, t = _scorer(shape, height, width, centre, radius, aspect, angle, rng)
    if count is None:
        count = height * width if allowed is None else int(np.count_nonzero(allowed))
    kk = int(min(max(k, 1), count))  # as top_pixels
    c, s, a = math.cos(angle), math.sin(angle), math.sqrt(aspect)
    half = (radius * math.hypot(c * a, s / a), radius * math.hypot(s * a, c / a))  # |(u, v)| <= 1, pixels
    t += 3 * max(a, 1 / a) / radius  # and a few pixels
    while kk > 0:
        # the window: the box of |(u, v)| <= 1.01 t, a pixel more each side (|(u, v)| >= t outside)
        x0, y0 = (max(0, math.floor(centre[d] - 1.01 * t * half[d]) - 1) for d in (0, 1))
        x1, y1 = (min(size, math.ceil(centre[d] + 1.01 * t * half[d]) + 2) for d, size in ((0, width), (1, height)))
        if (x0, y0, x1, y1) == (0, 0, width, height):
            break
        rows, cols = slice(y0, y1), slice(x0, x1)
        field = score(rows, cols, t)
        inside = field.ravel() if allowed is None else field[allowed[rows, cols]]
        if inside.size >= kk:
            kth = np.partition(inside, inside.size - kk)[inside.size - kk]
            if kth > bound(t):
                if np.count_nonzero(inside >= kth) != kk:  # a tie at the k-th: argpartition's pick
                    break
                out = np.zeros((height, width), bool)
                out[rows, cols] = field >= kth if allowed is None else (field >= kth) & allowed[rows, cols]
                return out
        # grow the window about as much as the pixels scoring above the bound say is needed (their
        # count grows with the area, t^2), at least by a quarter and at most twice
        sure = np.count_nonzero(inside > bound(t))
        t *= min(2.0, max(1.25, 1.2 * math.sqrt(kk / max(sure, 1))))
    return top_pixels(score(slice(None), slice(None)), allowed, k)


@functools.lru_cache(maxsize=64)
def _shape_cdf(weights: tuple[float, ...]) -> tuple[float, ...]:
    """The cumulative distribution ``rng.choice(n, p=w / w.sum())`` searches, computed as it does."""
    w = np.array(weights, float)
    cdf = (w / w.sum()).cumsum()
    cdf /= cdf[-1]
    return tuple(cdf.tolist())


def _choose(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    """``int(rng.choice(len(weights), p=w / w.sum()))``, the same index from the same one draw
    (``Generator.choice`` with ``p``: one ``rng.random()`` searched in the cdf, side right), without
    its argument checks (about 50 us; the weights are checked by :class:`ManipulateConfig`)."""
    return bisect.bisect_right(_shape_cdf(weights), rng.random())


def _candidates(height: int, width: int, allowed: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """The flat indices a region's centre is drawn from (None: every pixel) and how many pixels
    ``allowed`` holds (the image's when None)."""
    if allowed is None:
        return None, height * width
    cand = np.flatnonzero(allowed)
    return (cand if len(cand) else None), len(cand)


def draw_region(height: int, width: int, rng: np.random.Generator, cfg: ManipulateConfig,
                allowed: np.ndarray | None = None,
                candidates: tuple[np.ndarray | None, int] | None = None) -> np.ndarray:
    """One random region (H, W) bool of ``cfg.area`` x image pixels, inside ``allowed`` if given.
    ``candidates``: :func:`_candidates` of ``allowed``, when the caller has it."""
    names = list(cfg.shapes)
    shape = names[_choose(rng, tuple(cfg.shapes[n] for n in names))]
    area = rng.uniform(*cfg.area) * height * width
    aspect = math.exp(rng.uniform(math.log(cfg.aspect[0]), math.log(cfg.aspect[1])))
    angle = rng.uniform(0, math.pi)
    cand, count = candidates or _candidates(height, width, allowed)
    i = int(rng.integers(height * width if cand is None else len(cand)))
    cy, cx = divmod(i if cand is None else int(cand[i]), width)
    # the top pixels of its shape_field, scored about its centre only
    return _shape_region(shape, height, width, (cx, cy), math.sqrt(area / math.pi), aspect, angle, rng, allowed,
                         round(area), count)


def draw_regions(height: int, width: int, rng: np.random.Generator, cfg: ManipulateConfig,
                 allowed: np.ndarray | None = None) -> np.ndarray:
    """The union of ``cfg.regions`` (min, max) random regions."""
    out = np.zeros((height, width), bool)
    candidates = _candidates(height, width, allowed)
    for _ in range(int(rng.integers(cfg.regions[0], cfg.regions[1] + 1))):
        out |= draw_region(height, width, rng, cfg, allowed, candidates=candidates)
    return out


def reference_affine(height: int, width: int, rng: np.random.Generator, cfg: ManipulateConfig) -> np.ndarray:
    """A (2, 3) affine (reference pixel -> target pixel): flips, resize about the centre, shift."""
    flip = rng.random(2) < cfg.reference_flip
    scale = rng.uniform(*cfg.reference_scale)
    shift = rng.uniform(-cfg.reference_shift, cfg.reference_shift, 2) * (width, height)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    sx, sy = scale * (-1 if flip[0] else 1), scale * (-1 if flip[1] else 1)
    return np.array([[sx, 0, cx - sx * cx + shift[0]], [0, sy, cy - sy * cy + shift[1]]], np.float64)


def warp(x: np.ndarray, affine: np.ndarray, nearest: bool = False) -> np.ndarray:
    """``x`` (H, W) moved by ``affine``; outside the source: zeros (masks) or replicated border."""
    h, w = x.shape
    if nearest:
        return cv2.warpAffine(x.astype(np.uint8), affine, (w, h), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    return cv2.warpAffine(x.astype(np.float32), affine, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def align_reference(reference: Mapping[str, torch.Tensor], affine: np.ndarray) -> Maps:
    """The reference's edge and depth maps moved into the target frame by ``affine``."""
    return {k: torch.stack([torch.from_numpy(warp(c.cpu().numpy(), affine)) for c in v]).to(v)
            for k, v in reference.items() if k in MANIPULATED}


def sample_region(target: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  rng: np.random.Generator, cfg: ManipulateConfig) -> tuple[np.ndarray, np.ndarray]:
    """The anomaly region (H, W) bool in the target frame and the reference's affine (2, 3)."""
    h, w = next(iter(target.values())).shape[-2:]
    aware = rng.random() < cfg.object_aware
    fg_t = foreground(target, cfg.foreground, cfg.foreground_threshold) if aware else None
    fg_r = foreground(reference, cfg.foreground, cfg.foreground_threshold) if aware else None
    region = draw_regions(h, w, rng, cfg, fg_t)
    affine = reference_affine(h, w, rng, cfg)
    region |= warp(draw_regions(h, w, rng, cfg, fg_r), affine, nearest=True)
    if fg_t is not None:
        region &= fg_t
    if not region.any():  # no target region drawn and the reference's moved away: draw one
        region = draw_region(h, w, rng, cfg, fg_t)
    return region, affine


def mask_region(target_mask: np.ndarray, reference_mask: np.ndarray, rng: np.random.Generator,
                cfg: ManipulateConfig) -> tuple[np.ndarray, np.ndarray]:
    """The region of a defect-aware local anomaly: the target's mask united with the reference's
    mask after the reference's flip / resize / crop, dilated by ``cfg.mask_dilation`` pixels;
    and that affine (2, 3), which moves the reference's maps alike."""
    h, w = target_mask.shape
    affine = reference_affine(h, w, rng, cfg)
    region = target_mask.astype(bool) | warp(reference_mask.astype(bool), affine, nearest=True)
    if cfg.mask_dilation and region.any():  # a Euclidean disc: nothing farther than mask_dilation px
        r = cfg.mask_dilation
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        region = cv2.dilate(region.astype(np.uint8), (xx * xx + yy * yy <= r * r).astype(np.uint8)) > 0
    return region, affine


# ----------------------------------------------------------------------------- manipulations
def _inside(target: Maps, new: Maps, region: torch.Tensor) -> Maps:
    return {k: torch.where(region, new[k], target[k]) for k in target}


def merge(target: Maps, reference: Maps, region: torch.Tensor, rng: np.random.Generator,
          cfg: ManipulateConfig) -> Maps:
    """Edges: the maximum of both; depth: ``w * target + (1 - w) * reference``, w ~ merge_weight."""
    w = rng.uniform(*cfg.merge_weight)
    new = {k: torch.maximum(v, reference[k]) if k == "edge" else w * v + (1 - w) * reference[k]
           for k, v in target.items()}
    return _inside(target, new, region)


def remove(target: Maps, reference: Maps, region: torch.Tensor, rng: np.random.Generator,
           cfg: ManipulateConfig) -> Maps:
    """Edges cleared (-1); depth set to the background value (the border median)."""
    new = {k: torch.full_like(v, -1.0) if k == "edge" else background_value(v).expand_as(v)
           for k, v in target.items()}
    return _inside(target, new, region)


def replace(target: Maps, reference: Maps, region: torch.Tensor, rng: np.random.Generator,
            cfg: ManipulateConfig) -> Maps:
    """The reference's values in the region."""
    return _inside(target, reference, region)


def tps(target: Maps, reference: Maps, region: torch.Tensor, rng: np.random.Generator,
        cfg: ManipulateConfig) -> Maps:
    """A thin-plate spline over the region's box: a 5x5 lattice whose border is fixed and whose
    inner 3x3 points shift by up to ``tps_shift`` of the box side; applied inside the region.
    The warp draws content from the box only (its border replicated) and is evaluated at the
    region's pixels only (the values the whole box's grid has there; the kernel, one logarithm
    per pixel and control point, is most of the cost, and the region about half of its box)."""
    h, w = region.shape[-2:]
    ys, xs = np.nonzero(region.reshape(h, w).cpu().numpy())
    if len(xs) == 0:
        return dict(target)
    x0, x1 = max(int(xs.min()) - 2, 0), min(int(xs.max()) + 2, w - 1)
    y0, y1 = max(int(ys.min()) - 2, 0), min(int(ys.max()) + 2, h - 1)
    t = np.linspace(0.0, 1.0, 5)
    gy, gx = np.meshgrid(t, t, indexing="ij")
    src = np.stack([gx * (x1 - x0), gy * (y1 - y0)], -1).reshape(-1, 2)  # box coordinates
    inner = ((gx > 0) & (gx < 1) & (gy > 0) & (gy < 1)).ravel()
    dst = src.copy()
    dst[inner] += rng.uniform(-cfg.tps_shift, cfg.tps_shift, (int(inner.sum()), 2)) * (x1 - x0, y1 - y0)
    points = torch.from_numpy(np.stack([xs - x0, ys - y0], -1)).float()[None]  # box pixels (x, y), row-major
    grid = tps_warp_grid(torch.from_numpy(src).float()[None], torch.from_numpy(dst).float()[None],
                         y1 - y0 + 1, x1 - x0 + 1, points)
    rows, cols = torch.from_numpy(ys), torch.from_numpy(xs)
    new = {}
    for k, v in target.items():
        box = v[None, :, y0:y1 + 1, x0:x1 + 1].float()
        warped = F.grid_sample(box, grid.to(v.device), mode="bilinear", padding_mode="border", align_corners=False)
        new[k] = v.clone()
        new[k][:, rows.to(v.device), cols.to(v.device)] = warped[0, :, 0].to(v.dtype)
    return new


Manipulation = Callable[[Maps, Maps, torch.Tensor, np.random.Generator, ManipulateConfig], Maps]
MANIPULATIONS: dict[str, Manipulation] = {"merge": merge, "remove": remove, "replace": replace, "tps": tps}
assert tuple(MANIPULATIONS) == MANIPULATION_NAMES
_FROM_REFERENCE = ("merge", "replace")  # the manipulations that take the reference's maps (moved into the target frame)


def local_anomaly(target: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], manipulation: str,
                  rng: np.random.Generator, cfg: ManipulateConfig,
                  masks: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Maps, torch.Tensor]:
    """Manipulated target maps (``edge``/``depth``, those present) and the region (1, H, W) bool.

    ``target`` and ``reference`` hold ``image`` (3, H, W) and ``edge``/``depth`` (1, H, W) in [-1, 1].
    ``masks`` = (target mask, reference mask) (H, W): the region comes from these real defects
    (:func:`mask_region`) instead of drawn shapes.
    """
    fn = MANIPULATIONS[check_manipulation(manipulation)]
    maps = {k: v for k, v in target.items() if k in MANIPULATED}
    if not maps:
        raise ValueError(f"a local anomaly edits edge or depth maps, but the target has only {sorted(target)}")
    if masks is not None:
        region_np, affine = mask_region(masks[0], masks[1], rng, cfg)
    else:
        region_np, affine = sample_region(target, reference, rng, cfg)
    region = torch.from_numpy(region_np)[None].to(next(iter(maps.values())).device)
    # remove and tps never read the reference: its maps are moved only for those that do (no draws)
    moved = align_reference(reference, affine) if manipulation in _FROM_REFERENCE else {}
    return fn(maps, moved, region, rng, cfg), region
