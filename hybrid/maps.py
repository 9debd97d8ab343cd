"""Edge and depth maps of RGB images, encoded as the shards store them: one implementation for the
preprocess stage and for :class:`hybrid.pipeline.HybridPipeline` (one-off generation), so an image
given to a checkpoint gets the maps that checkpoint was trained on.

Edges: PiDiNet (fp32 by default: bf16 drifts by 0.03) or Canny, uint8 (B, H, W). Depth: Depth
Anything V2 nearness, min-max encoded per image to uint16 (B, H, W) (bf16 on CUDA with precision
``auto``). Sensor depth (MVTec 3D-AD xyz, the demo's height maps) comes from files:
:func:`hybrid.models.depth.sensor_nearness`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from hybrid.compiled import eager_on_failure
from hybrid.data.images import fit
from hybrid.models.depth import to_uint16

EDGE_MODELS = ("pidinet", "pidinet_small", "pidinet_tiny", "canny", "none")
DEPTH_MODELS = ("depth_anything_small", "depth_anything_base", "depth_anything_large")


class MapComputer:
    """Edge and depth networks, loaded once, applied to batches of uint8 RGB images (B, H, W, 3).

    ``edge_model``: a name of :data:`EDGE_MODELS` ("none": no edge map); ``depth_source``: a Depth
    Anything name (estimated here) or anything else (no depth map from images). ``paths``:
    store name -> explicit path. ``precision``: auto (edges fp32; depth bf16 on CUDA, fp32
    elsewhere) | fp32 | bf16 | fp16, for both. ``compile``: :meth:`compile` the networks.
    """

    def __init__(self, edge_model: str, depth_source: str, device: torch.device,
                 paths: Mapping[str, str] | None = None, precision: str = "auto", compile: bool = False) -> None:
        from hybrid.models.edges import make_edge_detector

        self.edge_model, self.depth_source, self.device = edge_model, depth_source, device
        self.paths = dict(paths or {})
        cuda = device.type == "cuda"
        self.edge_precision = "fp32" if precision == "auto" else precision
        self.depth_precision = ("bf16" if cuda else "fp32") if precision == "auto" else precision
        self.edge = None
        if edge_model != "none":
            self.edge = make_edge_detector(edge_model, device, self.paths.get(edge_model),
                                           precision=self.edge_precision)
        self.depth = None
        if depth_source in DEPTH_MODELS:
            from hybrid.models.depth import load_depth_anything

            self.depth = load_depth_anything(self.paths.get(depth_source, depth_source), device)
        self._eager: dict[str, object] | None = None  # what compile() replaced
        self._rows: int | None = None  # compiled: the batch size smaller batches are padded to
        if compile:
            self.compile()

    def compile(self) -> None:
        """Run PiDiNet and Depth Anything through ``torch.compile`` (``preprocess.compile``): compiled
        at the first batch of each new size; the maps differ from eager ones by float rounding only.
        A call that fails is run again eagerly, and eagerly from then on, with a warning."""
        if self._eager is not None:
            return
        self._eager = {}
        if self.edge is not None and hasattr(self.edge, "model"):  # PiDiNet (Canny is OpenCV's)
            self._eager["edge"] = (self.edge, self.edge.model)
            self.edge.model = torch.compile(self.edge.model)
        if self.depth is not None:
            self._eager["depth"] = self.depth
            self.depth = torch.compile(self.depth)

    def uncompile(self) -> None:
        """Back to the eager networks."""
        if self._eager is None:
            return
        if "edge" in self._eager:
            edges, model = self._eager["edge"]
            edges.model = model
        self.depth = self._eager.get("depth", self.depth)
        self._eager = None

    def _guarded(self, fn: Callable[..., dict[str, np.ndarray]], *args) -> dict[str, np.ndarray]:
        return eager_on_failure(lambda: fn(*args), self._eager is not None, self.uncompile, "preprocess.compile",
                                "computing the maps eagerly")

    def _depth(self, batch: torch.Tensor) -> torch.Tensor:
        """Depth on the model's device (encoded there by :func:`to_uint16`)."""
        from hybrid.models.depth import predict_depth

        return predict_depth(self.depth, batch, precision=self.depth_precision, on_device=True)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Maps of images at the size they are given, encoded for the shards. Compiled, a smaller
        batch than the first (the last) is padded to the first's size by repeating its last image,
        so the compiled graphs are not built again for it."""
        n = len(images)
        if self._eager is not None and 0 < n < (self._rows or n):
            pad = np.concatenate([images, np.repeat(images[-1:], self._rows - n, axis=0)])
            return {k: v[:n] for k, v in self(pad).items()}
        if self._eager is not None:
            self._rows = max(self._rows or 0, n)
        return self._guarded(self._maps, images)

    def _maps(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        on_device: dict[str, torch.Tensor] = {}  # both networks queued before either result is waited for
        if self.edge is not None:
            on_device["edge"] = (self.edge(batch, on_device=True).float().clamp(0, 1) * 255).round().to(torch.uint8)
        if self.depth is not None:
            on_device["depth"] = self._depth(batch)
        return {name: to_uint16(x) if name == "depth" else x.cpu().numpy() for name, x in on_device.items()}

    def at_original(self, images: np.ndarray, size: int, how: str) -> dict[str, np.ndarray]:
        """Maps of same-size originals (B, H, W, 3), computed at that size, then fitted to ``size``
        like the image (float maps, area interpolation, ``how`` = stretch / crop / pad) and encoded."""
        return self._guarded(self._maps_at_original, images, size, how)

    def _maps_at_original(self, images: np.ndarray, size: int, how: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        if self.edge is not None:
            e = self.edge(batch).float().clamp(0, 1).cpu().numpy()
            e = np.stack([fit(m, size, how) for m in e]).clip(0, 1)
            out["edge"] = np.round(e * np.float32(255)).astype(np.uint8)
        if self.depth is not None:
            out["depth"] = to_uint16(np.stack([fit(m, size, how) for m in self._depth(batch).cpu().numpy()]))
        return out

    def weight_source(self, name: str) -> str:
        """Where the weights of ``name`` come from: the configured path, else the store's id."""
        from hybrid.models.store import REGISTRY

        if name in self.paths:
            return str(self.paths[name])
        spec = REGISTRY.get(name)
        return (spec.hub_id or spec.filename) if spec else name
