"""Edge-map front end: uint8 RGB batches in, (B,H,W) float32 edge probabilities in [0,1] out.

Input layout: channels-last uint8 ``(B,H,W,3)`` RGB, as ``read_image`` returns and as the shards
store images (a torch tensor or a numpy array). Output: a CPU float32 tensor ``(B,H,W)``.
Detectors: ``pidinet``, ``pidinet_small``, ``pidinet_tiny`` (the fused map of PiDiNet, run in its
converted vanilla-conv form by default) and ``canny`` (OpenCV Canny on grayscale, as 0/1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from hybrid.models import store
from hybrid.models.pidinet import VARIANTS, load_pidinet, normalize_rgb

log = logging.getLogger(__name__)

DETECTORS = (*VARIANTS, "canny")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EdgeDetector(Protocol):
    name: str

    def __call__(self, images: torch.Tensor | np.ndarray, on_device: bool = False) -> torch.Tensor: ...


def as_uint8_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Check and return a uint8 (B,H,W,3) tensor; errors say what was given."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"edge detectors take uint8 RGB batches shaped (B,H,W,3); got {t.dtype} "
                         f"{tuple(t.shape)} (add a batch axis for one image; convert with .permute(0,2,3,1))")
    return t


class PiDiNetEdges:
    """PiDiNet fused edge map; ``precision`` "bf16"/"fp16" autocasts on CUDA (CPU always runs fp32)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 name: str = "pidinet") -> None:
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        self.device = torch.device(device)
        if self.device.type != "cuda" and precision != "fp32":
            log.info("%s: precision %s is only used on CUDA; running fp32 on %s", name, precision, self.device)
            precision = "fp32"
        self.name, self.precision = name, precision
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | np.ndarray, on_device: bool = False) -> torch.Tensor:
        """``on_device``: the map stays on the model's device (encoded there, not on the host)."""
        x = normalize_rgb(as_uint8_batch(images).to(self.device).permute(0, 3, 1, 2))
        with torch.autocast(self.device.type, dtype=_DTYPES[self.precision], enabled=self.precision != "fp32"):
            fused = self.model(x)[-1]
        fused = fused[:, 0].float().clamp_(0, 1)
        return fused if on_device else fused.cpu()


class CannyEdges:
    """OpenCV Canny on the grayscale image, hysteresis thresholds ``low``/``high``; output 0/1."""

    name = "canny"

    def __init__(self, low: float = 100.0, high: float = 200.0) -> None:
        if not 0 <= low <= high:
            raise ValueError(f"Canny thresholds need 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high = low, high

    def __call__(self, images: torch.Tensor | np.ndarray, on_device: bool = False) -> torch.Tensor:
        """On the CPU whatever ``on_device`` says (OpenCV)."""
        batch = as_uint8_batch(images).cpu().numpy()
        maps = [cv2.Canny(cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY), self.low, self.high)
                for im in batch]
        return torch.from_numpy(np.stack(maps) > 0).float()


def make_edge_detector(name: str, device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                       precision: str = "fp32", converted: bool = True, canny_low: float = 100.0,
                       canny_high: float = 200.0) -> EdgeDetector:
    """An edge detector by name (pidinet, pidinet_small, pidinet_tiny, canny); see the module docstring.

    PiDiNet weights come from ``store.locate(name, weights_path)``.
    """
    if name == "canny":
        return CannyEdges(canny_low, canny_high)
    if name not in VARIANTS:
        raise ValueError(f"unknown edge detector {name!r}; choose one of {', '.join(DETECTORS)}")
    model = load_pidinet(store.locate(name, weights_path), variant=name, converted=converted)
    return PiDiNetEdges(model, device, precision, name)
