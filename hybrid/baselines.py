"""Model-free anomaly synthesis baselines: DRAEM's Perlin-noise anomalies and CutPaste.

- ``perlin`` (Zavrtanik et al., DRAEM, ICCV 2021; anomalib's ``PerlinAnomalyGenerator``): 2D Perlin
  noise whose lattice has ``2**randint(0, 6)`` cells along each axis independently (DRAEM's
  ``perlin_scale = 6``, ``min_perlin_scale = 0``: 1 to 32 cells), rotated by an angle ~ U(-90, 90)
  degrees (DRAEM's ``iaa.Affine(rotate=(-90, 90))``: bilinear, zero outside) and thresholded at
  0.5 (DRAEM's ``threshold``) to the mask ``m``. The anomaly source is a texture (a DTD-like folder,
  DRAEM's ``anomaly_source_path``, resized to the image) or else another of the dataset's images;
  either is colour-jittered (a light stand-in for DRAEM's three random imgaug augmenters). Blend
  (DRAEM's ``augment_image``): ``out = (1 - m) img + (1 - beta) src m + beta img m`` with
  ``beta ~ U(0, 0.8)``. DRAEM keeps 50% of samples normal and may return empty masks; here every
  output is an anomaly: an empty mask is redrawn, up to ``max_tries`` times, and after that the
  last noise's top 10% (at least its maximum) is taken, so a mask is never empty.
- ``cutpaste`` (Li et al., CVPR 2021; settings of the authors' code and its PyTorch port):
  ``normal``: a rectangle of area ~ U(0.02, 0.15) of the image and aspect (w/h) log-uniform in
  (0.3, 3.3), colour-jittered (brightness, contrast, saturation, hue 0.1), cut at one place and
  pasted at another of the same image. ``scar``: a thin rectangle of width U(2, 16) and height
  U(10, 25) pixels at 256 px (scaled with the short side), jittered, rotated by U(-45, 45) degrees
  (nearest, canvas expanded, as PIL's ``rotate(expand=True)``) and pasted through its footprint.

Images are uint8 RGB (H, W, 3), masks uint8 {0, 255} (H, W). Outside its mask every output pixel
is bit-identical to the input. Output ``i`` of :func:`synthesize` draws from its own
``numpy.random.default_rng([seed, start + i])``, so it does not depend on how a dataset is batched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hybrid.config import check_choices, check_keys, choice
from hybrid.data._files import IMAGE_EXTS, SHOWN, is_image
from hybrid.data.images import ImageError, decode, probe

log = logging.getLogger(__name__)

METHODS = ("perlin", "cutpaste")
VARIANTS = ("normal", "scar")
_FALLBACK_QUANTILE = 0.9  # after max_tries empty Perlin masks: the top 10% of the last noise
_SCAR_REFERENCE = 256  # CutPaste's scar sizes are in pixels at this image side
_MAX_TEXTURE_PIXELS = 200_000_000  # a texture larger than this is refused (decompression bomb)


def _pair(section: str, name: str, v, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """``v`` as a (min, max) float pair with lo <= min <= max <= hi, else a ValueError naming the key."""
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v):
        raise ValueError(f"{section}.{name} must be a (min, max) pair of numbers, got {v!r}")
    a, b = float(v[0]), float(v[1])
    if not lo <= a <= b <= hi:
        raise ValueError(f"{section}.{name} must be (min, max) with {lo} <= min <= max <= {hi}, got {(a, b)}")
    return a, b


def _jitter_check(section: str, v: float) -> float:
    if not 0 <= v <= 0.5:
        raise ValueError(f"{section}.jitter must lie in [0, 0.5], got {v}")
    return float(v)


@dataclass
class PerlinConfig:
    """DRAEM's Perlin anomalies (the ``baselines.perlin`` config section)."""

    scale_exponents: tuple[int, int] = (0, 6)  # lattice cells per axis: 2**randint(lo, hi), hi excluded
    threshold: float = 0.5  # noise above this is anomaly
    rotation: tuple[float, float] = (-90.0, 90.0)  # degrees
    beta: tuple[float, float] = (0.0, 0.8)  # weight of the image inside the mask
    jitter: float = 0.1  # brightness/contrast/saturation/hue jitter of the anomaly source
    max_tries: int = 16  # noise draws before the fallback mask
    textures: str | None = None  # folder of texture images (DTD); None: the dataset's own images

    def __post_init__(self) -> None:
        s = "baselines.perlin"
        lo, hi = _pair(s, "scale_exponents", self.scale_exponents, 0, 12)
        if lo != int(lo) or hi != int(hi) or hi <= lo:
            raise ValueError(f"{s}.scale_exponents must be integers (lo, hi) with lo < hi (hi excluded), "
                             f"got {self.scale_exponents}")
        self.scale_exponents = (int(lo), int(hi))
        self.rotation = _pair(s, "rotation", self.rotation, -180, 180)
        self.beta = _pair(s, "beta", self.beta, 0, 1)
        if not -1 < self.threshold < 1:
            raise ValueError(f"{s}.threshold must lie in (-1, 1) (the noise range), got {self.threshold}")
        self.jitter = _jitter_check(s, self.jitter)
        if not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise ValueError(f"{s}.max_tries must be a positive integer, got {self.max_tries!r}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> PerlinConfig:
        return cls(**check_keys(d, cls, "baselines.perlin"))


@dataclass
class CutPasteConfig:
    """CutPaste (the ``baselines.cutpaste`` config section); scar sizes are pixels at 256 px."""

    variant: str = choice(VARIANTS, "normal")
    area: tuple[float, float] = (0.02, 0.15)  # normal: patch area, fraction of the image
    aspect: tuple[float, float] = (0.3, 3.3)  # normal: width / height, log-uniform
    scar_width: tuple[float, float] = (2.0, 16.0)
    scar_height: tuple[float, float] = (10.0, 25.0)
    scar_rotation: tuple[float, float] = (-45.0, 45.0)  # degrees
    jitter: float = 0.1  # brightness/contrast/saturation/hue jitter of the patch

    def __post_init__(self) -> None:
        s = "baselines.cutpaste"
        check_choices(self, s)
        self.area = _pair(s, "area", self.area, 0, 1)
        self.aspect = _pair(s, "aspect", self.aspect, 0)
        if self.area[0] <= 0 or self.aspect[0] <= 0:
            raise ValueError(f"{s}: area {self.area} and aspect {self.aspect} must be positive")
        self.scar_width = _pair(s, "scar_width", self.scar_width, 1)
        self.scar_height = _pair(s, "scar_height", self.scar_height, 1)
        self.scar_rotation = _pair(s, "scar_rotation", self.scar_rotation, -180, 180)
        self.jitter = _jitter_check(s, self.jitter)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> CutPasteConfig:
        return cls(**check_keys(d, cls, "baselines.cutpaste"))


# ----------------------------------------------------------------------------- textures
class TextureFolder:
    """The texture images under a folder (recursively, as DRAEM's ``<dtd>/images/*/*.jpg``),
    headers checked up front, decoded on demand. Error naming the folder if none is usable."""

    def __init__(self, folder: str | Path) -> None:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"texture folder {root} is not a folder; fix baselines.perlin.textures")
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        others = [str(p.relative_to(root)) for p in files if not is_image(p.name)]
        self.paths: list[Path] = []
        bad: list[str] = []
        for p in (p for p in files if is_image(p.name)):
            try:
                probe(p, _MAX_TEXTURE_PIXELS)
                self.paths.append(p)
            except ImageError as e:
                bad.append(f"{p.relative_to(root)} ({e.reason})")
        if not self.paths:
            what = "is empty" if not files else "holds no readable images"
            raise ValueError(f"texture folder {root} {what}"
                             + (f"; non-image files: {others[:SHOWN]} ({len(others)} in all)" if others else "")
                             + (f"; unreadable images: {bad[:SHOWN]} ({len(bad)} in all)" if bad else "")
                             + f"; textures are image files ({', '.join(IMAGE_EXTS)}), in any subfolder")
        if bad:
            log.warning("texture folder %s: skipping %d unreadable images, e.g. %s", root, len(bad), bad[:3])
        self.root = root

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int, height: int, width: int) -> np.ndarray:
        """Texture ``i`` as RGB uint8 resized to (height, width) (DRAEM: ``cv2.resize``)."""
        img = decode(self.paths[i], min(height, width), _MAX_TEXTURE_PIXELS)
        shrink = img.shape[0] >= height and img.shape[1] >= width
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- shared pieces
def color_jitter(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """torchvision-like ``ColorJitter(s, s, s, min(s, 0.5))`` of uint8 RGB, in a fixed order:
    brightness, contrast (about the mean grey), saturation (about each pixel's grey), hue."""
    if strength <= 0 or img.size == 0:
        return img.copy()
    b, c, s = rng.uniform(1 - strength, 1 + strength, 3)
    h = rng.uniform(-strength, strength)
    x = np.clip(img.astype(np.float32) / 255 * np.float32(b), 0, 1)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = np.clip((x - grey.mean()) * np.float32(c) + grey.mean(), 0, 1)
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = np.clip((x - grey) * np.float32(s) + grey, 0, 1)
    hsv = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2HSV)  # float: hue in degrees
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(360 * h), 360)
    return np.round(np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- Perlin
def perlin_noise(height: int, width: int, cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """DRAEM's ``rand_perlin_2d_np``: (H, W) float32 gradient noise on a ``cells`` (rows, cols)
    lattice, ``sqrt(2)`` times the bilinear blend (quintic fade) of the corner gradients' dot
    products. Pixel ``i`` sits at lattice position ``i * cells / size``, as DRAEM's grid; sizes
    need not divide by the cell counts."""
    ry, rx = cells
    angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)
    y, x = np.arange(height) * (ry / height), np.arange(width) * (rx / width)
    iy, ix = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - iy)[:, None], (x - ix)[None]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = grads[iy + dy][:, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    ty, tx = fade(fy), fade(fx)
    n00, n01 = dot(0, 0), dot(0, 1)
    col0 = n00 + (dot(1, 0) - n00) * ty  # lerp along rows in columns ix and ix + 1, then across
    col1 = n01 + (dot(1, 1) - n01) * ty
    return (math.sqrt(2) * (col0 + (col1 - col0) * tx)).astype(np.float32)


def perlin_mask(height: int, width: int, rng: np.random.Generator, cfg: PerlinConfig) -> np.ndarray:
    """(H, W) bool: rotated Perlin noise above ``cfg.threshold``; never empty (see the module doc)."""
    lo, hi = cfg.scale_exponents
    for _ in range(cfg.max_tries):
        cells = (2 ** int(rng.integers(lo, hi)), 2 ** int(rng.integers(lo, hi)))
        noise = perlin_noise(height, width, cells, rng)
        rot = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), float(rng.uniform(*cfg.rotation)), 1.0)
        noise = cv2.warpAffine(noise, rot, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask = noise > cfg.threshold
        if mask.any():
            return mask
    return noise >= min(np.quantile(noise, _FALLBACK_QUANTILE), noise.max())


def perlin_anomaly(img: np.ndarray, source: np.ndarray, rng: np.random.Generator,
                   cfg: PerlinConfig) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM's blend of ``source`` (uint8 (H, W, 3), jittered here) into ``img`` through a Perlin
    mask: (image uint8, mask bool)."""
    h, w = img.shape[:2]
    mask = perlin_mask(h, w, rng, cfg)
    beta = np.float32(rng.uniform(*cfg.beta))
    src = color_jitter(source, rng, cfg.jitter).astype(np.float32)
    x = img.astype(np.float32)
    blend = np.round(np.clip((1 - beta) * src + beta * x, 0, 255)).astype(np.uint8)
    return np.where(mask[..., None], blend, img), mask


# ----------------------------------------------------------------------------- CutPaste
def _uniform_int(rng: np.random.Generator, hi: int) -> int:
    """A position in [0, hi] (CutPaste: ``int(uniform(0, hi))``)."""
    return int(rng.uniform(0, max(hi, 0)))


def cutpaste(img: np.ndarray, rng: np.random.Generator, cfg: CutPasteConfig) -> tuple[np.ndarray, np.ndarray]:
    """One CutPaste (``cfg.variant``) of uint8 RGB ``img``: (image uint8, mask bool of the pasted pixels)."""
    h, w = img.shape[:2]
    if cfg.variant == "normal":
        area = rng.uniform(*cfg.area) * h * w
        aspect = math.exp(rng.uniform(math.log(cfg.aspect[0]), math.log(cfg.aspect[1])))
        cw = int(np.clip(round(math.sqrt(area * aspect)), 1, w))
        ch = int(np.clip(round(math.sqrt(area / aspect)), 1, h))
    else:
        k = min(h, w) / _SCAR_REFERENCE
        cw = int(np.clip(round(rng.uniform(*cfg.scar_width) * k), 1, w))
        ch = int(np.clip(round(rng.uniform(*cfg.scar_height) * k), 1, h))
    y0, x0 = _uniform_int(rng, h - ch), _uniform_int(rng, w - cw)
    patch = color_jitter(img[y0:y0 + ch, x0:x0 + cw], rng, cfg.jitter)
    alpha = np.ones((ch, cw), bool)
    if cfg.variant == "scar":  # rotate on an expanded canvas; the footprint is the paste mask
        a = float(rng.uniform(*cfg.scar_rotation))
        c, s = abs(math.cos(math.radians(a))), abs(math.sin(math.radians(a)))
        pw, ph = int(math.ceil(cw * c + ch * s - 1e-6)), int(math.ceil(cw * s + ch * c - 1e-6))
        rot = cv2.getRotationMatrix2D(((cw - 1) / 2, (ch - 1) / 2), a, 1.0)
        rot[:, 2] += ((pw - cw) / 2, (ph - ch) / 2)
        spun = cv2.warpAffine(alpha.astype(np.uint8), rot, (pw, ph), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
        if spun.any():  # a tiny patch may rotate to nothing: keep it upright then
            patch = cv2.warpAffine(patch, rot, (pw, ph), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            patch, alpha = patch[:h, :w], spun[:h, :w]
    ph, pw = alpha.shape
    ty, tx = _uniform_int(rng, h - ph), _uniform_int(rng, w - pw)
    out, mask = img.copy(), np.zeros((h, w), bool)
    out[ty:ty + ph, tx:tx + pw][alpha] = patch[alpha]
    mask[ty:ty + ph, tx:tx + pw] = alpha
    return out, mask


# ----------------------------------------------------------------------------- datasets
def _check_images(images: Sequence[np.ndarray] | np.ndarray, what: str) -> list[np.ndarray]:
    out = [np.asarray(x) for x in images]
    for i, x in enumerate(out):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"{what} {i}: expected uint8 RGB (H, W, 3), got {x.dtype} {x.shape}")
    return out


def synthesize(images: Sequence[np.ndarray] | np.ndarray, method: str, seed: int,
               cfg: PerlinConfig | CutPasteConfig | None = None,
               sources: Sequence[np.ndarray] | np.ndarray | TextureFolder | None = None,
               start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anomalous images (N, H, W, 3) uint8 and their masks (N, H, W) uint8 {0, 255}.

    ``images`` share one size. ``method``: ``perlin`` or ``cutpaste`` (its ``cfg.variant``);
    ``cfg`` defaults to the method's defaults. Output ``i`` uses ``default_rng([seed, start + i])``:
    pass ``start`` = the batch's offset in the dataset. Perlin's anomaly source is drawn from
    ``sources``: a :class:`TextureFolder` (default: ``cfg.textures`` when set), or a pool of
    images; by default the batch itself, whose image ``i`` is then never its own source. A pool
    that is the whole dataset (``sources=dataset``, ``start`` = offset) makes Perlin outputs
    independent of batching too, and its image ``start + i`` is never chosen as a source.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; valid baselines are {', '.join(METHODS)}")
    imgs = _check_images(images, "image")
    if not imgs:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 0, 0), np.uint8)
    if len({x.shape for x in imgs}) > 1:
        raise ValueError(f"images differ in size: {sorted({x.shape for x in imgs})}; resize them to one size")
    cfg = cfg if cfg is not None else (PerlinConfig() if method == "perlin" else CutPasteConfig())
    if not isinstance(cfg, PerlinConfig if method == "perlin" else CutPasteConfig):
        raise TypeError(f"baseline {method!r} takes a {'PerlinConfig' if method == 'perlin' else 'CutPasteConfig'}, "
                        f"got {type(cfg).__name__}")
    h, w = imgs[0].shape[:2]
    own = sources is None
    if method == "perlin":
        if sources is None and cfg.textures:
            sources, own = TextureFolder(cfg.textures), False
        if not isinstance(sources, TextureFolder):
            sources = imgs if sources is None else _check_images(sources, "anomaly source")
            if not sources:
                raise ValueError("the pool of anomaly sources is empty")
    out, masks = np.empty((len(imgs), h, w, 3), np.uint8), np.empty((len(imgs), h, w), np.uint8)
    for i, img in enumerate(imgs):
        rng = np.random.default_rng([seed, start + i])
        if method == "cutpaste":
            out[i], m = cutpaste(img, rng, cfg)
        else:
            if isinstance(sources, TextureFolder):
                src = sources.get(int(rng.integers(len(sources))), h, w)
            else:
                self_index = i if own else start + i
                n = len(sources)
                j = int(rng.integers(n - 1)) if n > 1 and self_index < n else int(rng.integers(n))
                j += int(n > 1 and self_index < n and j >= self_index)  # skip the image itself
                src = sources[j]
                if src.shape[:2] != (h, w):
                    src = cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)
            out[i], m = perlin_anomaly(img, src, rng, cfg)
        masks[i] = m.astype(np.uint8) * 255
    return out, masks
