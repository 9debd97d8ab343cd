"""xyz TIFFs as MVTec 3D-AD stores sensor depth: float32 (H, W, 3), samples x, y, z in file order.

OpenCV treats 3-channel images as BGR and stores them as RGB, so an array handed to it as z, y, x
lands on disk as x, y, z, and reading such a file gives z, y, x back (z is channel 0). The demo's
height maps are written the same way, so one reader serves both.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from hybrid.io import atomic_path

_PARAMS = [cv2.IMWRITE_TIFF_COMPRESSION, cv2.IMWRITE_TIFF_COMPRESSION_ADOBE_DEFLATE]
if hasattr(cv2, "IMWRITE_TIFF_PREDICTOR"):
    _PARAMS += [cv2.IMWRITE_TIFF_PREDICTOR, cv2.IMWRITE_TIFF_PREDICTOR_FLOATINGPOINT]


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    """Write float32 (H, W, 3) x, y, z atomically as a deflate-compressed TIFF."""
    xyz = np.asarray(xyz, dtype=np.float32)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz must have shape (H,W,3), got {xyz.shape}")
    path = Path(path)
    with atomic_path(path, suffix=f".partial{path.suffix}") as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(xyz[..., ::-1]), _PARAMS):
            raise OSError(f"could not write the xyz tiff {path}; use a .tiff name in a writable folder")


def read_xyz(path: str | Path) -> np.ndarray:
    """An xyz TIFF as float32 (H, W, 3) x, y, z."""
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3 or a.shape[2] != 3:
        raise OSError(f"{path} is not a 3-channel xyz tiff; expected float32 (H, W, 3)")
    return np.ascontiguousarray(a[..., ::-1]).astype(np.float32)
