"""Kernel Inception Distance (torch-fidelity's formula) against an explicit reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hybrid.metrics.kid import kid, kid_from_features


def reference_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel, written out with loops."""
    m, d = x.shape

    def k(a, b):
        return (float(a @ b) / d + coef0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_one_full_subset_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.2, size=(12, 5))
    mean, std = kid_from_features(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(reference_mmd2(x, y), rel=1e-10, abs=1e-12) and std == 0


def test_subsets_are_torch_fidelitys_draws():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(15, 4)), rng.normal(0.5, 1.0, size=(20, 4))
    r = np.random.RandomState(2020)
    ref = []
    for _ in range(5):
        ref.append(reference_mmd2(x[r.choice(15, 8, replace=False)], y[r.choice(20, 8, replace=False)]))
    mean, std = kid_from_features(x, y, subsets=5, subset_size=8)
    assert mean == pytest.approx(np.mean(ref), rel=1e-10) and std == pytest.approx(np.std(ref), rel=1e-9)
    # torch tensors (float32 features) are accepted; the capped subset equals the smaller set
    assert kid_from_features(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=8) == (mean, std)
    assert kid_from_features(x, y, subsets=3, subset_size=1000) == kid_from_features(x, y, subsets=3, subset_size=15)


def test_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same, _ = kid_from_features(a, b, subsets=20, subset_size=100)
    shifted, _ = kid_from_features(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.02 and shifted > 0.5 and shifted > 50 * abs(same)


def test_errors():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid_from_features(x, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="one dimension"):
        kid_from_features(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="subset_size >= 2"):
        kid_from_features(x, x, subset_size=1)


class ColourPool(nn.Module):
    """A stand-in Inception: ``pool`` = mean colour, repeated to 2048-d."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pool": (x.float().mean(dim=(2, 3)) / 255).repeat(1, 683)[:, :2048]}


def test_kid_extracts_pool_features():
    rng = np.random.default_rng(3)
    dark = rng.integers(0, 60, (10, 8, 8, 3), dtype=np.uint8)
    light = rng.integers(180, 255, (12, 8, 8, 3), dtype=np.uint8)
    out = kid(dark, light, ColourPool(), batch_size=4, subsets=10, progress=False)
    assert out["n_images1"] == 10 and out["n_images2"] == 12 and out["subset_size"] == 10
    assert out["kid_mean"] > 0.1
    assert kid(dark, dark, ColourPool(), subsets=10, progress=False)["kid_mean"] < 1e-3
    with pytest.raises(ValueError, match="uint8"):
        kid(dark.astype(np.float32), light, ColourPool(), progress=False)
