"""Decode any image the datasets hold into RGB uint8 at the working resolution.

OpenCV decodes (fast, honours EXIF orientation, converts grey, 16-bit, palette and CMYK to 8-bit
colour); Pillow reads only the header first, so that the pixel count is checked before any pixel
is decoded (a decompression bomb is refused, not an out-of-memory kill) and large JPEGs are
decoded at 1/2, 1/4 or 1/8 size through OpenCV's reduced modes before the final area resize.

``read_capped`` serves maps computed at the original size (``preprocess.maps_at: original``):
the whole image, reduced only when it has more pixels than the map models are allowed to see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's own bomb check would raise before ours with a less helpful message.
Image.MAX_IMAGE_PIXELS = None

FITS = ("stretch", "crop", "pad")
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file, the reason and the fix."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # JPEG, PNG, TIFF, ...
    mode: str  # Pillow mode: RGB, L, I;16, P, RGBA, CMYK, ...


def probe(path: str | Path, max_pixels: int) -> ImageInfo:
    """Read the header only; refuse unreadable, empty, truncated or oversized files."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file does not exist; check the dataset paths in the config")
    if path.stat().st_size == 0:
        raise ImageError(path, "file is empty (0 bytes); re-copy or remove it")
    try:
        with Image.open(path) as im:
            info = ImageInfo(im.width, im.height, im.format or "?", im.mode)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(path, f"not a readable image ({e}); re-copy or remove it") from None
    if info.width < 1 or info.height < 1:
        raise ImageError(path, f"image has no pixels ({info.width}x{info.height})")
    if info.width * info.height > max_pixels:
        raise ImageError(
            path,
            f"{info.width}x{info.height} = {info.width * info.height:,} pixels exceeds "
            f"preprocess.max_pixels = {max_pixels:,} (a decompression bomb or a mislabelled file); "
            "raise the limit if the image is genuine",
        )
    _check_complete(path, info.format)
    return info


def _check_complete(path: Path, fmt: str) -> None:
    """OpenCV silently grey-fills truncated JPEGs: look for the end markers ourselves."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read()
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise ImageError(path, "JPEG is truncated (no end-of-image marker); re-copy the file")
    if fmt == "PNG" and b"IEND" not in tail:
        raise ImageError(path, "PNG is truncated (no IEND chunk); re-copy the file")


def _reduction(info: ImageInfo, size: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) that keeps the short side at least ``size``."""
    if info.format != "JPEG" or info.mode == "CMYK":
        return 1
    short = min(info.width, info.height)
    for k in (8, 4, 2):
        if short // k >= size:
            return k
    return 1


def _cap_reduction(info: ImageInfo, cap: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) whose decoded size still has at least ``cap`` pixels
    (1 when the image has at most ``cap``); 1 for other formats, which decode whole."""
    if info.format != "JPEG" or info.mode == "CMYK":
        return 1
    for k in (8, 4, 2):
        if -(-info.width // k) * -(-info.height // k) >= cap:
            return k
    return 1


def decode(path: str | Path, size: int | None = None, max_pixels: int = 200_000_000,
           max_decoded: int | None = None) -> np.ndarray:
    """Decode ``path`` to RGB uint8 (H, W, 3), EXIF orientation applied.

    With ``size``, JPEGs whose short side is at least ``2 * size`` are decoded at reduced scale
    (the result's short side is still >= size). With ``max_decoded`` instead, JPEGs of more
    pixels are decoded at the most reduced scale that still has at least that many.
    Alpha is composited over white.
    """
    path = Path(path)
    info = probe(path, max_pixels)
    has_alpha = info.mode in ("RGBA", "LA", "PA") or (info.mode == "P" and info.format == "PNG")
    if size:
        flag = _REDUCED.get(_reduction(info, size), cv2.IMREAD_COLOR)
    elif max_decoded:
        flag = _REDUCED.get(_cap_reduction(info, max_decoded), cv2.IMREAD_COLOR)
    else:
        flag = cv2.IMREAD_COLOR
    buf = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED if has_alpha else flag)
    if img is None:
        raise ImageError(path, f"OpenCV could not decode this {info.format} file; re-copy or convert it")
    if has_alpha:
        img = _composite_on_white(img)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.dtype != np.uint8:
        img = (img.astype(np.float32) * (255.0 / np.iinfo(img.dtype).max)).round().astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 3:  # the same bytes as numpy's reversed copy, about 15x faster
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img[..., ::-1])


def _composite_on_white(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2 or img.shape[2] < 4:
        return img
    scale = float(np.iinfo(img.dtype).max)
    a = img[..., 3:4].astype(np.float32) / scale
    out = img[..., :3].astype(np.float32) * a + scale * (1 - a)
    return out.round().astype(img.dtype)


def fit(img: np.ndarray, size: int, how: str = "stretch", interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Resize to ``size`` x ``size``: ``stretch`` ignores aspect, ``crop`` takes the centre square,
    ``pad`` letterboxes with replicated borders. Area interpolation by default."""
    if how not in FITS:
        raise ValueError(f"unknown fit {how!r}; choose one of {FITS}")
    h, w = img.shape[:2]
    if how == "crop":
        s = min(h, w)
        y, x = (h - s) // 2, (w - s) // 2
        img = img[y : y + s, x : x + s]
    elif how == "pad":
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        img = cv2.copyMakeBorder(img, top, s - h - top, left, s - w - left, cv2.BORDER_REPLICATE)
    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    if min(img.shape[:2]) < size and interpolation == cv2.INTER_AREA:
        interpolation = cv2.INTER_LINEAR  # area is for shrinking; enlarging tiny images wants linear
    return cv2.resize(img, (size, size), interpolation=interpolation)


def read_image(path: str | Path, size: int | None = None, how: str = "stretch",
               max_pixels: int = 200_000_000) -> np.ndarray:
    """RGB uint8: the whole image, or fitted to ``size`` x ``size`` when ``size`` is given."""
    img = decode(path, size, max_pixels)
    return fit(img, size, how) if size else img


def read_capped(path: str | Path, cap: int, max_pixels: int = 200_000_000) -> np.ndarray:
    """RGB uint8 at the original size, for maps computed there; ``cap`` bounds its pixels.

    An image of at most ``cap`` pixels comes back whole. A larger one is reduced, aspect kept: a
    JPEG is first decoded at the most reduced DCT scale (1/2, 1/4, 1/8) that still has at least
    ``cap`` pixels (memory: the full image is never held; detail: nothing below the cap), then any
    image above ``cap`` is area-resized to the largest size that fits. Files above
    ``max_pixels`` are refused as by ``probe``.
    """
    if cap < 1:
        raise ValueError(f"cap must be at least 1 pixel, got {cap}")
    img = decode(path, None, max_pixels, max_decoded=cap)
    h, w = img.shape[:2]
    if h * w > cap:
        s = (cap / (h * w)) ** 0.5
        nh, nw = max(1, int(h * s)), max(1, int(w * s))
        while nh * nw > cap:  # float rounding at the boundary: shave the longer side
            if nh >= nw:
                nh -= 1
            else:
                nw -= 1
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return img


def read_mask(path: str | Path, size: int | None = None, how: str = "stretch") -> np.ndarray:
    """Binary mask uint8 {0, 255}: any non-zero pixel is defect. A directory (MVTec LOCO keeps
    several masks per image) gives the union of every image inside it."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise ImageError(path, "mask directory holds no mask images")
    union = None
    for f in files:
        probe(f, max_pixels=200_000_000)
        m = cv2.imdecode(np.fromfile(f, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise ImageError(f, "OpenCV could not decode this mask")
        if union is not None and m.shape != union.shape:
            raise ImageError(f, f"mask size {m.shape} differs from {union.shape} of its siblings")
        union = m > 0 if union is None else union | (m > 0)
    mask = union.astype(np.uint8) * 255
    if size:
        mask = fit(mask, size, how, interpolation=cv2.INTER_NEAREST)
    return mask
