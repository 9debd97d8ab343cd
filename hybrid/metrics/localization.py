"""Anomaly detection and localisation metrics: image/pixel AUROC, AP, F1-max and AU-PRO.

These score the downstream detectors (the U-Net segmentation stage, Blaze localisation, PatchCore
few-shot) the way AnomalyDiffusion (sjtuplayer/anomalydiffusion ``test-localization.py``) and
DFMGAN report them: image-level AUROC / AP / F1-max from one score per image, pixel-level AUROC /
AP / F1-max over all test pixels of a category, and AU-PRO up to a false positive rate of 0.3.

- AUROC is the trapezoidal area under the ROC curve with tied scores as one step (sklearn's
  ``roc_auc_score``); AP is sklearn's ``average_precision_score`` (sum over thresholds of
  (R_n - R_{n-1}) P_n, no interpolation); F1-max is the largest 2PR/(P+R) over all thresholds of the
  precision-recall curve (AnomalyDiffusion's image F1-max; its pixel F1-max only tries the 21
  thresholds 0, 0.05, ..., 1, which is at most this value).
- Image level (:func:`binary_metrics`) is exact: one count per distinct score.
- Pixel level (:class:`PixelMetrics`) is streamed: positive and negative pixels are counted in
  ``bins`` equal bins over [lo, hi] (default 2**16 over [0, 1]; values outside are clipped into the
  end bins, with a warning), and the curves come from cumulative sums over bins, high to low.
  Memory is O(bins) whatever the number of images. The only approximation is that distinct scores
  sharing a bin count as tied, so the result is *exact whenever no bin holds two distinct scores*
  (scores on the bin grid; 8-bit maps k/255 with 2**16 bins), and otherwise off by at most the
  share of positive/negative pairs that share a bin (AUROC), which shrinks as bins grow.
- AU-PRO follows the MVTec AD definition (Bergmann et al., IJCV 2021; the MVTec AD evaluation
  code's ``compute_pro``): ground truth regions are the 8-connected components of each mask
  (``scipy.ndimage.label``); at a threshold, a region's overlap is the share of its pixels at or
  above it, PRO is the mean overlap over all regions of the category and FPR the share of anomaly-
  free pixels at or above it; AU-PRO is the trapezoidal area of PRO over FPR from 0 to ``max_fpr``
  (PRO interpolated at ``max_fpr``), divided by ``max_fpr``. The thresholds are the same bins:
  since the mean of per-region cumulative sums is the cumulative sum of the per-region histograms
  weighted by 1/area, one float64 vector of ``bins`` entries holds all regions, again exact up to
  binning. (AnomalyDiffusion's ``unet_utils/au_pro_util.py``, the MVTec 3D-AD code, samples only
  100 thresholds at quantiles of the anomaly-free scores, a coarser approximation of this curve.)
- Image scores from pixel maps (:func:`image_score`): the maximum of the smoothed map. Default a
  Gaussian of sigma 4 (anomalib's anomaly-map smoothing); ``box=21, sigma=0`` is what
  AnomalyDiffusion's (and DRAEM's) segmentation evaluation does: max of the 21x21 mean filter
  (zero padding, ``avg_pool2d``) of the anomaly probability map.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Array = np.ndarray | torch.Tensor


def _numpy(x: Array) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _maps(x: Array, name: str) -> np.ndarray:
    """(B,H,W) float64 from (B,H,W) or (B,1,H,W)."""
    a = _numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (B,H,W) or (B,1,H,W); got shape {a.shape}")
    return a


def _counts_metrics(pos: np.ndarray, neg: np.ndarray, what: str) -> dict[str, float]:
    """AUROC, AP and F1-max from positive / negative counts per score level, highest level first."""
    keep = (pos + neg) > 0
    tp, fp = np.cumsum(pos[keep], dtype=np.float64), np.cumsum(neg[keep], dtype=np.float64)
    n_pos, n_neg = (tp[-1], fp[-1]) if len(tp) else (0.0, 0.0)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} metrics need positives and negatives; got {n_pos:.0f} positive and "
                         f"{n_neg:.0f} negative {'pixels' if what == 'pixel' else 'samples'}")
    tpr, fpr = np.concatenate([[0.0], tp / n_pos]), np.concatenate([[0.0], fp / n_neg])
    precision, recall = tp / (tp + fp), tp / n_pos
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(recall),
                   where=precision + recall > 0)
    return {"auroc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)),
            "ap": float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision)),
            "f1max": float(f1.max())}


def binary_metrics(scores: Array, labels: Array, what: str = "image") -> dict[str, float]:
    """Exact ``{"auroc", "ap", "f1max"}`` of 1-D ``scores`` (higher = more anomalous) for 0/1 ``labels``."""
    s, y = _numpy(scores).astype(np.float64).ravel(), _numpy(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores have shape {_numpy(scores).shape} but labels {_numpy(labels).shape}")
    if np.isnan(s).any():
        raise ValueError(f"{what} scores contain NaN")
    levels, inverse = np.unique(s, return_inverse=True)
    y = y.astype(bool)
    pos = np.bincount(inverse[y], minlength=len(levels))[::-1]
    neg = np.bincount(inverse[~y], minlength=len(levels))[::-1]
    return _counts_metrics(pos, neg, what)


def auroc(scores: Array, labels: Array) -> float:
    """Area under the ROC curve (sklearn ``roc_auc_score``)."""
    return binary_metrics(scores, labels)["auroc"]


def average_precision(scores: Array, labels: Array) -> float:
    """Average precision (sklearn ``average_precision_score``)."""
    return binary_metrics(scores, labels)["ap"]


def f1_max(scores: Array, labels: Array) -> float:
    """Largest F1 over all thresholds of the precision-recall curve."""
    return binary_metrics(scores, labels)["f1max"]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,H,W) maps; kernel radius int(4 sigma + 0.5) (scipy's truncate=4,
    anomalib's kernel size), mirror padding (scipy ``mode="mirror"``) where the map is large enough,
    edge replication otherwise."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = maps[:, None]
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1))
    return x[:, 0]


def image_score(maps: Array, sigma: float = 4.0, reduce: str = "max", box: int | None = None) -> torch.Tensor:
    """One anomaly score per image, (B,), from (B,H,W) or (B,1,H,W) anomaly maps.

    The map is smoothed, then reduced with ``reduce`` ("max" or "mean"). Smoothing: the ``box`` x
    ``box`` mean filter with zero padding when ``box`` is given (``box=21, sigma=0`` reproduces
    AnomalyDiffusion's / DRAEM's image score), else a Gaussian of ``sigma`` (none when 0).
    """
    x = torch.as_tensor(maps).float()
    x = x[:, 0] if x.ndim == 4 and x.shape[1] == 1 else x
    if x.ndim != 3:
        raise ValueError(f"anomaly maps must be (B,H,W) or (B,1,H,W); got shape {tuple(x.shape)}")
    if box is not None:
        if box < 1 or box % 2 == 0:
            raise ValueError(f"box must be a positive odd size; got {box}")
        x = F.avg_pool2d(x[:, None], box, stride=1, padding=box // 2)[:, 0]
    elif sigma > 0:
        x = gaussian_blur(x, sigma)
    if reduce == "max":
        return x.amax(dim=(1, 2))
    if reduce == "mean":
        return x.mean(dim=(1, 2))
    raise ValueError(f"reduce must be 'max' or 'mean'; got {reduce!r}")


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) from x[0] to x_max, x non-decreasing, y interpolated at x_max."""
    i = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(np.diff(x[:i]) * (y[1:i] + y[: i - 1]) / 2))
    if i < len(x) and x[i - 1] < x_max:
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += (y[i - 1] + y_at) / 2 * (x_max - x[i - 1])
    return area


class PixelMetrics:
    """Streamed pixel AUROC / AP / F1-max and AU-PRO over all pixels of a category (see module doc).

    ``update(maps, masks)`` takes (B,H,W) or (B,1,H,W) anomaly maps (higher = more anomalous) and
    ground-truth masks of the same shape (values > 0.5 are anomalous: bool, {0,1} or {0,255});
    ``compute()`` returns ``{"pixel_auroc", "pixel_ap", "pixel_f1max"}`` and ``"aupro"`` when ``pro``.
    State: three length-``bins`` vectors, whatever the number of images. ``connectivity``: 2 for
    8-connected regions (MVTec AD), 1 for 4-connected.
    """

    def __init__(self, bins: int = 2**16, lo: float = 0.0, hi: float = 1.0, pro: bool = True,
                 max_fpr: float = 0.3, connectivity: int = 2) -> None:
        if bins < 2 or not hi > lo:
            raise ValueError(f"need bins >= 2 and hi > lo; got bins={bins}, lo={lo}, hi={hi}")
        if not 0 < max_fpr <= 1:
            raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}")
        self.bins, self.lo, self.hi, self.pro, self.max_fpr = bins, float(lo), float(hi), pro, max_fpr
        self.structure = ndimage.generate_binary_structure(2, connectivity)
        self.reset()

    def reset(self) -> None:
        self.pos = np.zeros(self.bins, dtype=np.int64)      # anomalous pixels per bin
        self.neg = np.zeros(self.bins, dtype=np.int64)      # anomaly-free pixels per bin
        self.region = np.zeros(self.bins, dtype=np.float64)  # sum over regions of (pixels per bin) / area
        self.n_regions = 0
        self.clipped = 0

    def bin_index(self, maps: np.ndarray) -> np.ndarray:
        """Bin of each value: floor((v - lo) / (hi - lo) * bins), clipped into [0, bins - 1] (hi is in
        the last bin; values outside [lo, hi] are counted in ``clipped``)."""
        v = maps.astype(np.float64)
        self.clipped += int(np.count_nonzero((v < self.lo) | (v > self.hi)))
        idx = np.floor((v - self.lo) * (self.bins / (self.hi - self.lo)))
        return np.clip(idx, 0, self.bins - 1).astype(np.int64)

    def update(self, maps: Array, masks: Array) -> None:
        m, g = _maps(maps, "anomaly maps"), _maps(masks, "masks")
        if m.shape != g.shape:
            raise ValueError(f"anomaly maps have shape {_numpy(maps).shape} but masks {_numpy(masks).shape}")
        if np.isnan(m).any():
            raise ValueError("anomaly maps contain NaN")
        g = g > 0.5
        idx = self.bin_index(m)
        self.pos += np.bincount(idx[g], minlength=self.bins)
        self.neg += np.bincount(idx[~g], minlength=self.bins)
        if not self.pro:
            return
        for b in np.flatnonzero(g.any(axis=(1, 2))):
            labels, n = ndimage.label(g[b], structure=self.structure)
            inside = labels[g[b]]
            area = np.bincount(inside, minlength=n + 1)
            self.region += np.bincount(idx[b][g[b]], weights=1.0 / area[inside], minlength=self.bins)
            self.n_regions += n

    def aupro(self) -> float:
        """Normalised area under the PRO curve for FPR in [0, max_fpr]."""
        n_neg = self.neg.sum()
        if self.n_regions == 0 or n_neg == 0:
            raise ValueError(f"AU-PRO needs anomalous regions and anomaly-free pixels; got "
                             f"{self.n_regions} regions and {n_neg} anomaly-free pixels")
        fpr = np.concatenate([[0.0], np.cumsum(self.neg[::-1]) / n_neg])
        pro = np.concatenate([[0.0], np.cumsum(self.region[::-1]) / self.n_regions])
        return float(_area_to(fpr, pro, self.max_fpr) / self.max_fpr)

    def compute(self) -> dict[str, float]:
        if self.clipped:
            warnings.warn(f"{self.clipped} anomaly-map values fell outside [{self.lo}, {self.hi}] and were "
                          "clipped into the end bins (ties there); pass lo/hi that cover the scores",
                          stacklevel=2)
        out = {f"pixel_{k}": v for k, v in _counts_metrics(self.pos[::-1], self.neg[::-1], "pixel").items()}
        if self.pro:
            out["aupro"] = self.aupro()
        return out


class LocalizationMetrics:
    """Image- and pixel-level metrics of one category, streamed over batches.

    ``update(maps, masks, scores=None, labels=None)``: image scores default to
    :func:`image_score` of the maps (``sigma``, ``box``, ``reduce``), image labels to "the mask has
    an anomalous pixel". Keeps one (score, label) per image and a :class:`PixelMetrics`.
    ``compute()`` returns image_auroc, image_ap, image_f1max, pixel_auroc, pixel_ap, pixel_f1max,
    aupro (without aupro when ``pro`` is False).
    """

    def __init__(self, bins: int = 2**16, lo: float = 0.0, hi: float = 1.0, pro: bool = True,
                 max_fpr: float = 0.3, sigma: float = 4.0, box: int | None = None, reduce: str = "max") -> None:
        self.pixels = PixelMetrics(bins, lo, hi, pro, max_fpr)
        self.sigma, self.box, self.reduce = sigma, box, reduce
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, maps: Array, masks: Array, scores: Array | None = None, labels: Array | None = None) -> None:
        self.pixels.update(maps, masks)
        if scores is None:
            scores = image_score(maps, self.sigma, self.reduce, self.box)
        if labels is None:
            labels = (_maps(masks, "masks") > 0.5).any(axis=(1, 2))
        s, y = _numpy(scores).ravel(), _numpy(labels).ravel()
        if len(s) != len(_maps(maps, "anomaly maps")) or len(y) != len(s):
            raise ValueError(f"need one image score and label per map; got {len(s)} scores and {len(y)} "
                             f"labels for maps of shape {_numpy(maps).shape}")
        self.scores.append(s.astype(np.float64))
        self.labels.append(y.astype(bool))

    def compute(self) -> dict[str, float]:
        image = binary_metrics(np.concatenate(self.scores), np.concatenate(self.labels), "image")
        return {**{f"image_{k}": v for k, v in image.items()}, **self.pixels.compute()}


def localization_report(maps: Array, masks: Array, scores: Array | None = None, labels: Array | None = None,
                        **kwargs) -> dict[str, float]:
    """All metrics of in-memory maps and masks at once; ``kwargs`` go to :class:`LocalizationMetrics`."""
    metrics = LocalizationMetrics(**kwargs)
    metrics.update(maps, masks, scores, labels)
    return metrics.compute()
