"""Kernel Inception Distance as torch-fidelity computes it (``fidelity --kid``).

KID = mean (and std, ``np.std``) over ``subsets`` random subsets of the unbiased MMD^2 between
Inception-v3-compat ``pool`` features (2048-d) of the two image sets, with the polynomial kernel
``k(x, y) = (gamma x.y + coef0)^degree``, ``gamma = 1 / d`` by default, degree 3, coef0 1. Each
subset draws ``subset_size`` rows without replacement from set 1, then from set 2, with one
``numpy.random.RandomState(seed)`` (seed 2020), in torch-fidelity's order, so the subsets are
torch-fidelity's. Differences: the arithmetic is float64 (torch-fidelity keeps the float32 of the
features), and a subset size above a set's size is capped at it (torch-fidelity refuses it);
a set of fewer than 2 images is an error (the unbiased estimate needs pairs).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from hybrid.metrics.inception_score import inception_outputs

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3
KID_COEF0 = 1
KID_SEED = 2020


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE, gamma: float | None = None,
                      coef0: float = KID_COEF0) -> np.ndarray:
    """(len(x), len(y)) kernel matrix ``(gamma x.y + coef0)^degree``; ``gamma`` None means 1 / dim."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 of m x m kernel matrices: off-diagonal means of K_XX and K_YY, minus twice
    the full mean of K_XY (torch-fidelity's ``mmd2(..., mmd_est="unbiased")``)."""
    m = k_xx.shape[0]
    xx = k_xx.sum() - np.trace(k_xx)
    yy = k_yy.sum() - np.trace(k_yy)
    return float((xx + yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid_from_features(f1: np.ndarray | torch.Tensor, f2: np.ndarray | torch.Tensor, subsets: int = KID_SUBSETS,
                      subset_size: int = KID_SUBSET_SIZE, degree: int = KID_DEGREE, gamma: float | None = None,
                      coef0: float = KID_COEF0, seed: int = KID_SEED) -> tuple[float, float]:
    """(mean, std) over ``subsets`` random subsets of the unbiased polynomial-kernel MMD^2 between
    feature sets (N1, D) and (N2, D); ``subset_size`` is capped at the smaller set's size."""
    f1 = np.asarray(f1.cpu().numpy() if torch.is_tensor(f1) else f1, np.float64)
    f2 = np.asarray(f2.cpu().numpy() if torch.is_tensor(f2) else f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID needs two feature sets (N, D) of one dimension D; got {f1.shape} and {f2.shape}")
    n1, n2 = len(f1), len(f2)
    if min(n1, n2) < 2:
        raise ValueError(f"KID needs at least 2 samples in each set (the unbiased MMD uses pairs); got {n1} and {n2}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2; got {subsets} and {subset_size}")
    m = min(subset_size, n1, n2)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(n1, m, replace=False)]
        y = f2[rng.choice(n2, m, replace=False)]
        k = [polynomial_kernel(a, b, degree, gamma, coef0) for a, b in ((x, x), (x, y), (y, y))]
        mmds[i] = mmd2_unbiased(*k)
    return float(mmds.mean()), float(mmds.std())


def inception_pool(
    images: Iterable[np.ndarray] | np.ndarray,
    model: nn.Module,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Inception-v3-compat ``pool`` features (N, 2048) of uint8 RGB images (H, W, 3), batched, float64."""
    return inception_outputs(images, model, "pool", batch_size, device, progress, "KID").astype(np.float64)


def kid(
    images1: Iterable[np.ndarray] | np.ndarray,
    images2: Iterable[np.ndarray] | np.ndarray,
    model: nn.Module,
    batch_size: int = 32,
    device: str = "cpu",
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
    progress: bool = True,
) -> dict:
    """KID of two uint8 RGB image sets: ``{"kid_mean", "kid_std", "n_images1", "n_images2",
    "subsets", "subset_size", "seed"}`` (``subset_size`` as used, after the cap)."""
    f1 = inception_pool(images1, model, batch_size=batch_size, device=device, progress=progress)
    f2 = inception_pool(images2, model, batch_size=batch_size, device=device, progress=progress)
    mean, std = kid_from_features(f1, f2, subsets=subsets, subset_size=subset_size, seed=seed)
    return {"kid_mean": mean, "kid_std": std, "n_images1": len(f1), "n_images2": len(f2), "subsets": subsets,
            "subset_size": min(subset_size, len(f1), len(f2)), "seed": seed}
