"""Semantic anomaly regions from Segment Anything (AnomalyFactory, paper 002 Sec. 3.3, after LogicAL).

"We use the pre-trained segmentation model SAM to get rough semantic regions. Due to SAM is
over-segmented, we further refine the segmentations by removing background, grouping small regions
and merging overlapped regions and build a map of candidate regions." This module does exactly that,
in plain torch around ``transformers.SamModel`` (transformers 5's SAM image processor imports
torchvision, which the CPU torch build here lacks, so the preprocessing is ours):

- Preprocessing (:func:`preprocess`) = ``SamImageProcessor``'s defaults: resize the longest side to
  the model's ``image_size`` (1024) with bilinear filtering (antialiased, rounded to uint8 levels as
  the PIL backend does), rescale 1/255, ImageNet mean/std, zero-pad bottom/right to a square.
- Automatic masks (:func:`sam_masks`) as SAM's ``SamAutomaticMaskGenerator`` on one crop: a grid of
  ``points_per_side``^2 single-point prompts (cell centres), three masks per point, kept when the
  predicted IoU exceeds ``pred_iou_thresh`` (0.88) and the stability score (IoU of the mask
  thresholded at +-``stability_offset``) exceeds ``stability_thresh`` (0.95); duplicates are removed
  by greedy non-maximum suppression on *mask* IoU (``nms_thresh`` 0.7; SAM uses box IoU, which needs
  torchvision). Low-resolution mask logits are upsampled to the padded square, cropped to the resized
  image and resized to the image, as ``post_process_masks``.
- Refinement (:func:`refine`), the paper's three steps with our thresholds (the paper gives none [I]):
  (1) background: a mask covering more than ``max_area`` of the image or more than ``border_touch``
  of the image's border ring is dropped; (2) overlapping masks (intersection over the smaller area >
  ``merge_overlap``) are merged, until none overlap so much; (3) small masks (< ``min_area`` of the
  image) closer than ``group_radius`` (fraction of the short side) are grouped into one region;
  groups still below ``min_area`` are dropped. What remains (at most ``max_candidates``, largest
  first) is the *candidate map*: uint8 labels (0 = no candidate), smaller regions painted over
  larger ones.
- Sampling (:func:`semantic_region`): the union of 1..``max_regions`` random candidates.

The candidate maps of every preprocessed image are computed once (:func:`hybrid.stages.sam_regions.run`, the
``sam_regions`` rule) into an HDF5 file: ``labels`` uint8 (N, H, W), ``sample_id`` strings, attributes
``status`` (``sam`` or ``fallback``), ``model`` and the settings. :class:`RegionStore` reads it lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import h5py
import numpy as np
import torch
import torch.nn.functional as F

from hybrid.config import check_device, check_keys
from hybrid.io import atomic_path

if TYPE_CHECKING:
    from transformers import SamModel

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FETCH_HINT = ("run `hybrid models fetch {name}` on a machine with internet access (or put a save_pretrained / "
              "snapshot folder of {hub} at $HYBRID_MODEL_DIR/sam/{folder}, or name it in models.paths)")


@dataclass(frozen=True)
class RegionConfig:
    """The ``anomalyfactory.sam`` section: SAM's automatic-mask settings and the refinement thresholds."""

    model: str = "sam_vit_base"  # a model-store name or a save_pretrained directory
    points_per_side: int = 16  # SAM's default is 32 (1024 prompts); 16 keeps 256 px images quick
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_thresh: float = 0.95
    stability_offset: float = 1.0
    mask_threshold: float = 0.0
    nms_thresh: float = 0.7
    max_area: float = 0.6  # larger masks are background
    border_touch: float = 0.4  # masks covering more of the border ring are background
    merge_overlap: float = 0.5  # intersection / smaller area above which two masks merge
    min_area: float = 0.002  # smaller masks are grouped with their neighbours
    group_radius: float = 0.05  # small masks closer than this (fraction of the short side) form one group
    max_candidates: int = 32
    max_regions: int = 3  # candidates united into one anomaly region (1..max_regions)
    batch_size: int = 4  # images per SAM image-encoder batch
    device: str = "auto"

    def __post_init__(self) -> None:
        for key in ("points_per_side", "points_per_batch", "max_candidates", "max_regions", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"anomalyfactory.sam.{key}={getattr(self, key)} must be at least 1")
        check_device(self.device, "anomalyfactory.sam.device")
        for key in ("nms_thresh", "max_area", "border_touch", "merge_overlap", "min_area", "group_radius"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"anomalyfactory.sam.{key}={getattr(self, key)} must lie in [0, 1]")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> RegionConfig:
        return cls(**check_keys(d, cls, "anomalyfactory.sam"))


# ----------------------------------------------------------------------------- SAM


def load_sam(name_or_dir: str, device: str | torch.device = "cpu") -> SamModel:
    """A ``SamModel`` in eval mode from a save_pretrained directory or a model-store name (``sam_vit_base``)."""
    from transformers import SamModel

    from hybrid.models.store import hf_model_dir  # lazy: only semantic regions need the store

    path = hf_model_dir(name_or_dir, "sam_", "facebook/sam-vit-*")
    return SamModel.from_pretrained(path, local_files_only=True).to(device).eval()


def resized_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """SamImageProcessor's size: the longest side to ``longest``, the other scaled, ``int(x + 0.5)``."""
    scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(images: torch.Tensor, longest: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM ``pixel_values`` (B, 3, S, S) from uint8 RGB (B, H, W, 3) of one size, and the resized (h, w)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"SAM wants uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()
    size = resized_size(x.shape[-2], x.shape[-1], longest)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).round().clamp(0, 255)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    x = (x / 255 - mean) / std
    return F.pad(x, (0, longest - size[1], 0, longest - size[0])), size


def point_grid(n: int, height: int, width: int) -> torch.Tensor:
    """(n*n, 2) (x, y) prompt points at the cell centres of an n x n grid over the image."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(t * height, t * width, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS on mask IoU (highest score first)."""
    if len(masks) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True)
    flat = masks[order].reshape(len(masks), -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
    keep: list[int] = []
    for i in range(len(order)):
        if all(iou[i, j] <= threshold for j in keep):
            keep.append(i)
    return order[keep]


@torch.inference_mode()
def sam_masks(model: SamModel, images: np.ndarray, cfg: RegionConfig) -> list[torch.Tensor]:
    """SAM's automatic masks of uint8 (B, H, W, 3) images of one size: one (K, H, W) bool per image."""
    device = next(model.parameters()).device
    longest = int(model.config.vision_config.image_size)
    h, w = images.shape[1:3]
    pixels, size = preprocess(torch.from_numpy(np.ascontiguousarray(images)).to(device), longest)
    emb = model.get_image_embeddings(pixels)
    pts = point_grid(cfg.points_per_side, h, w).to(device)
    pts = pts * torch.tensor([size[1] / w, size[0] / h], device=device)  # into the resized frame
    out: list[list[torch.Tensor]] = [[] for _ in range(len(images))]
    scores: list[list[torch.Tensor]] = [[] for _ in range(len(images))]
    for lo in range(0, len(pts), cfg.points_per_batch):
        p = pts[lo:lo + cfg.points_per_batch]
        b = len(images)
        res = model(image_embeddings=emb, input_points=p[None, :, None, :].expand(b, -1, -1, -1),
                    input_labels=torch.ones(b, len(p), 1, dtype=torch.long, device=device),
                    multimask_output=True)
        logits = res.pred_masks.float()  # (B, P, 3, m, m)
        iou = res.iou_scores.float()  # (B, P, 3)
        lg = logits.flatten(1, 2)
        lg = F.interpolate(lg, (longest, longest), mode="bilinear", align_corners=False)[..., :size[0], :size[1]]
        lg = F.interpolate(lg, (h, w), mode="bilinear", align_corners=False)
        t, o = cfg.mask_threshold, cfg.stability_offset
        stable = (lg > t + o).sum((-1, -2)).float() / (lg > t - o).sum((-1, -2)).clamp(min=1).float()
        masks = lg > t
        keep = (iou.flatten(1) > cfg.pred_iou_thresh) & (stable > cfg.stability_thresh) & masks.any(-1).any(-1)
        for i in range(b):
            out[i].append(masks[i][keep[i]].cpu())
            scores[i].append(iou.flatten(1)[i][keep[i]].cpu())
    result = []
    for m, s in zip(out, scores):
        m, s = torch.cat(m), torch.cat(s)
        result.append(m[mask_nms(m, s, cfg.nms_thresh)])
    return result


# ----------------------------------------------------------------------------- refinement


def border_ring(height: int, width: int, frac: float = 0.05) -> np.ndarray:
    b = max(1, round(frac * min(height, width)))
    ring = np.ones((height, width), bool)
    ring[b:height - b, b:width - b] = False
    return ring


def _components(adjacent: np.ndarray) -> list[list[int]]:
    """Connected components of a symmetric boolean adjacency matrix."""
    n, seen, groups = len(adjacent), np.zeros(len(adjacent), bool), []
    for s in range(n):
        if seen[s]:
            continue
        stack, group = [s], []
        seen[s] = True
        while stack:
            i = stack.pop()
            group.append(i)
            for j in np.flatnonzero(adjacent[i] & ~seen):
                seen[j] = True
                stack.append(int(j))
        groups.append(sorted(group))
    return groups


def merge_overlapping(masks: list[np.ndarray], threshold: float) -> list[np.ndarray]:
    """Unite masks whose intersection over the smaller area exceeds ``threshold``, until none do."""
    while len(masks) > 1:
        flat = np.stack([m.ravel() for m in masks]).astype(np.float32)
        inter = flat @ flat.T
        area = flat.sum(1)
        overlap = inter / np.maximum(np.minimum(area[:, None], area[None, :]), 1)
        np.fill_diagonal(overlap, 0)
        if not (overlap > threshold).any():
            break
        masks = [np.any([masks[i] for i in g], axis=0) for g in _components(overlap > threshold)]
    return masks


def group_small(masks: list[np.ndarray], min_pixels: float, radius: int) -> list[np.ndarray]:
    """Masks of at least ``min_pixels`` as they are; smaller ones within ``radius`` pixels of each other
    united into groups; groups still smaller than ``min_pixels`` dropped."""
    big = [m for m in masks if m.sum() >= min_pixels]
    small = [m for m in masks if 0 < m.sum() < min_pixels]
    if not small:
        return big
    k = 2 * radius + 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    grown = np.stack([cv2.dilate(m.astype(np.uint8), disc) > 0 for m in small]).reshape(len(small), -1)
    touch = (grown.astype(np.float32) @ np.stack([m.ravel() for m in small]).astype(np.float32).T) > 0
    groups = [np.any([small[i] for i in g], axis=0) for g in _components(touch | touch.T)]
    return big + [g for g in groups if g.sum() >= min_pixels]


def refine(masks: Sequence[np.ndarray] | torch.Tensor, cfg: RegionConfig) -> np.ndarray:
    """SAM masks (K, H, W) -> the candidate map (H, W) uint8: background removed, overlapping masks
    merged, small ones grouped (see the module doc); 0 = no candidate, 1.. = candidates, largest first."""
    masks = [np.asarray(m, bool) for m in (masks.numpy() if isinstance(masks, torch.Tensor) else masks)]
    if not masks:
        raise ValueError("refine needs at least one mask to know the image size; pass an empty (0, H, W) array")
    h, w = masks[0].shape
    ring = border_ring(h, w)
    kept = [m for m in masks if m.any() and m.mean() <= cfg.max_area and m[ring].mean() <= cfg.border_touch]
    kept = merge_overlapping(kept, cfg.merge_overlap)
    kept = [m for m in kept if m.mean() <= cfg.max_area]  # a merge may have made a background
    kept = group_small(kept, cfg.min_area * h * w, max(1, round(cfg.group_radius * min(h, w))))
    kept = sorted(kept, key=lambda m: -int(m.sum()))[:min(cfg.max_candidates, 255)]
    labels = np.zeros((h, w), np.uint8)
    for i, m in enumerate(kept):  # largest first, so smaller candidates stay visible on top
        labels[m] = i + 1
    return labels


def candidate_maps(model: SamModel, images: np.ndarray, cfg: RegionConfig) -> np.ndarray:
    """Candidate maps (N, H, W) uint8 of uint8 (N, H, W, 3) images of one size."""
    out = np.zeros(images.shape[:3], np.uint8)
    for lo in range(0, len(images), cfg.batch_size):
        batch = images[lo:lo + cfg.batch_size]
        for i, m in enumerate(sam_masks(model, batch, cfg)):
            if len(m):  # else no mask passed SAM's filters: no candidate
                out[lo + i] = refine(m, cfg)
    return out


def semantic_region(labels: np.ndarray, rng: np.random.Generator, max_regions: int) -> np.ndarray | None:
    """The union of 1..``max_regions`` distinct random candidates of a candidate map (None if it has none)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return None
    k = int(rng.integers(1, min(max_regions, len(ids)) + 1))
    return np.isin(labels, rng.choice(ids, size=k, replace=False))


# ----------------------------------------------------------------------------- the store on disk


class RegionStore:
    """Candidate maps by sample id from a ``sam_regions`` file, read lazily (one handle per process).

    ``available`` is False for a fallback file (no SAM weights, ``semantic_fallback: true``); then
    :meth:`get` returns None for every sample, as it does for samples the file does not hold.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.status, self.note, self.ids = "none", "no regions file", {}
        if self.path is not None:
            with h5py.File(self.path, "r") as f:
                self.status = str(f.attrs.get("status", "sam"))
                self.note = str(f.attrs.get("note", ""))
                self.ids = {s: i for i, s in enumerate(f["sample_id"].asstr()[:])}
        self._file, self._pid = None, None

    @property
    def available(self) -> bool:
        return self.status == "sam" and bool(self.ids)

    def get(self, sample_id: str) -> np.ndarray | None:
        i = self.ids.get(str(sample_id))
        if i is None:
            return None
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["labels"][i]

    def __getstate__(self) -> dict:  # DataLoader workers reopen the file
        return {**self.__dict__, "_file": None, "_pid": None}


def write_regions(path: str | Path, labels: np.ndarray, sample_ids: Sequence[str], attrs: Mapping) -> None:
    """Write a regions file atomically (``labels`` uint8 (N, H, W), one chunk per sample)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("labels", data=labels.astype(np.uint8), chunks=(1, *labels.shape[1:]) if len(labels) else None,
                         compression="gzip")
        f.create_dataset("sample_id", data=np.array([str(s) for s in sample_ids], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        for k, v in attrs.items():
            f.attrs[k] = v
