"""Depth maps for the shards: Depth Anything V2 (relative, via transformers) or sensor depth.

Every depth that leaves this module means *nearness*: larger = nearer to the camera, which is
what Depth Anything predicts and what the shard contract stores (``to_uint16``).

Preprocessing reproduces transformers' ``DPTImageProcessor`` as configured for Depth Anything V2
(size 518, keep_aspect_ratio, ensure_multiple_of 14, bicubic, 1/255, ImageNet mean/std) in torch,
because transformers 5 image processors want torchvision. The resize follows the PIL backend
(transformers 4's processor, 5's ``DPTImageProcessorPil``) to within one grey level; the
torchvision backend resizes in one float pass and differs only where bicubic overshoot clips.

Sensor depth (MVTec 3D-AD ``xyz/*.tiff``, the demo's height maps) is float32 (H, W, 3) x, y, z
with z the distance from the camera. Channel order: TIFF stores the samples in x, y, z order
(tifffile writes the array as is), and ``cv2.imread`` returns multi-sample TIFFs reversed, as
BGR, so z is cv2's channel 0. ``hybrid.data.xyz.write_xyz`` writes that same layout with cv2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hybrid.data.images import ImageError

if TYPE_CHECKING:
    from transformers import DepthAnythingForDepthEstimation

SIZE = 518
MULTIPLE = 14
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- Depth Anything V2


def load_depth_anything(
    name_or_dir: str, device: str | torch.device = "cpu"
) -> DepthAnythingForDepthEstimation:
    """A Depth Anything V2 model in eval mode, from a directory written by ``save_pretrained``
    or from a model-store name (``depth_anything_small``/``_base``/``_large``).

    An existing directory wins over a store name of the same spelling.
    """
    from transformers import DepthAnythingForDepthEstimation

    from hybrid.models.store import hf_model_dir  # lazy: the store is only needed for names

    path = hf_model_dir(name_or_dir, "depth_anything", "depth-anything/Depth-Anything-V2-*-hf")
    model = DepthAnythingForDepthEstimation.from_pretrained(path, local_files_only=True)
    if model.config.depth_estimation_type != "relative":
        raise ValueError(
            f"{path} is a {model.config.depth_estimation_type} depth model (larger = farther); "
            "use a relative Depth Anything V2 model, whose output grows with nearness"
        )
    return model.to(device).eval()


def resize_output_size(
    height: int, width: int, size: int = SIZE, multiple: int = MULTIPLE
) -> tuple[int, int]:
    """DPTImageProcessor's keep_aspect_ratio size: one scale for both sides, the one closer to 1,
    then each side rounded (Python ``round``, half to even) to a multiple of ``multiple``."""
    scale_h, scale_w = size / height, size / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h

    out = (round(scale * height / multiple) * multiple, round(scale * width / multiple) * multiple)
    if min(out) == 0:
        raise ValueError(
            f"a {height}x{width} image is too elongated to resize for Depth Anything (a side rounds to 0)"
        )
    return out


def _channels_first(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) from uint8 (B,3,H,W) or (B,H,W,3); dim 1 == 3 is read as channels first."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be a uint8 batch (B,H,W,3) or (B,3,H,W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1] == 3:
        return images
    if images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"images must have 3 colour channels, got shape {tuple(images.shape)}")


def _resize_like_pil(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's bicubic resize of uint8 levels held in float (B,3,H,W): antialiased filter
    (a = -0.5), a width pass then a height pass, each rounded and clipped to 0..255."""
    h, w = size
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    return x


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Depth Anything V2 ``pixel_values`` (B,3,h,w) float32 from uint8 RGB images of one size:
    the processor's resize (PIL bicubic), /255, ImageNet mean/std."""
    x = _channels_first(images).float()
    x = _resize_like_pil(x, resize_output_size(x.shape[-2], x.shape[-1]))
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


@torch.inference_mode()
def predict_depth(
    model: DepthAnythingForDepthEstimation,
    images: torch.Tensor,
    out_size: tuple[int, int] | None = None,
    precision: str = "fp32",
    on_device: bool = False,
) -> torch.Tensor:
    """Relative depth (larger = nearer), float32 (B,H,W) on the CPU (``on_device``: left on the
    model's device), at ``out_size`` (default: the input size), resized back with bicubic
    interpolation as ``post_process_depth_estimation``.

    ``images``: uint8 RGB (B,H,W,3) or (B,3,H,W); all images of a batch share one size (group
    by size before calling). ``precision``: fp32, or bf16/fp16 autocast on the model's device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = next(model.parameters()).device
    x = preprocess(images.to(device))
    size = tuple(out_size) if out_size is not None else tuple(_channels_first(images).shape[-2:])
    with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
        depth = model(pixel_values=x).predicted_depth
    depth = F.interpolate(depth.float().unsqueeze(1), size=size, mode="bicubic", align_corners=False).squeeze(1)
    return depth if on_device else depth.cpu()


# ----------------------------------------------------------------------------- shard encoding


def to_uint16(depth: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image min-max of (...,H,W) nearness to uint16 0..65535 (larger = nearer).

    A constant image becomes all zeros. Non-finite values are refused. A tensor is encoded where
    it is, by the same float64 operations (IEEE, so the very same values), and only the levels
    come back: on a GPU the host does not spend about 0.8 ms per 256 px map on it.
    """
    if isinstance(depth, torch.Tensor):
        return _to_uint16_torch(depth.detach())
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim < 2:
        raise ValueError(f"depth must have shape (...,H,W), got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("depth has NaN or inf values; fill missing pixels first (fill_missing)")
    lo = d.min(axis=(-2, -1), keepdims=True)
    span = d.max(axis=(-2, -1), keepdims=True) - lo
    scaled = np.where(span > 0, (d - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.rint(scaled * 65535).astype(np.uint16)


def _to_uint16_torch(depth: torch.Tensor) -> np.ndarray:
    """:func:`to_uint16` of a tensor, computed on its device (torch's ``round`` is ``rint``)."""
    if depth.ndim < 2:
        raise ValueError(f"depth must have shape (...,H,W), got {tuple(depth.shape)}")
    d = depth.to(torch.float64)
    if not bool(torch.isfinite(d).all()):
        raise ValueError("depth has NaN or inf values; fill missing pixels first (fill_missing)")
    lo = d.amin(dim=(-2, -1), keepdim=True)
    span = d.amax(dim=(-2, -1), keepdim=True) - lo
    varies = span > 0
    scaled = torch.where(varies, (d - lo) / torch.where(varies, span, 1.0), 0.0)
    return torch.round(scaled * 65535).to(torch.int32).cpu().numpy().astype(np.uint16)


# ----------------------------------------------------------------------------- sensor depth


def read_sensor_depth(path: str | Path) -> np.ndarray:
    """The z (distance) channel of an xyz TIFF, or a single-channel depth image, as float32
    (H,W); zero, negative, NaN and inf pixels are missing and become NaN."""
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise ImageError(path, "cannot be read as a depth image (missing, or not a format OpenCV decodes)")
    if a.ndim == 3 and a.shape[2] == 3 and np.issubdtype(a.dtype, np.floating):
        z = a[..., 0]  # file samples x, y, z come back from cv2 reversed: z, y, x
    elif a.ndim == 2:
        z = a
    else:
        raise ImageError(
            path, f"expected a float (H,W,3) xyz or a single-channel depth image, got {a.dtype} {a.shape}"
        )
    z = z.astype(np.float32)
    z[~np.isfinite(z) | (z <= 0)] = np.nan
    if np.isnan(z).all():
        raise ImageError(path, "every depth pixel is missing (zero, negative, NaN or inf); check the file")
    return z


def fill_missing(z: np.ndarray) -> np.ndarray:
    """Copy of (H,W) ``z`` with every NaN replaced by its nearest valid pixel (Euclidean)."""
    missing = np.isnan(z)
    if missing.all():
        raise ValueError("cannot fill a depth map in which every pixel is missing")
    if not missing.any():
        return z.copy()
    iy, ix = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    return z[iy, ix]


def sensor_nearness(path: str | Path, out_size: tuple[int, int] | None) -> np.ndarray:
    """Sensor depth as nearness (max z - z, larger = nearer), missing pixels filled, resized to
    ``out_size`` (H,W) with area interpolation (None: the sensor's own size); float32, ready for
    ``to_uint16``."""
    z = fill_missing(read_sensor_depth(path))
    near = np.ascontiguousarray(z.max() - z, dtype=np.float32)
    if out_size is None:
        return near
    h, w = out_size
    return cv2.resize(near, (w, h), interpolation=cv2.INTER_AREA)
