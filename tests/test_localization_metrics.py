"""Localisation metrics against sklearn, a plain per-threshold PRO loop and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from hybrid.metrics.localization import (
    LocalizationMetrics,
    PixelMetrics,
    binary_metrics,
    f1_max,
    image_score,
    localization_report,
)


def sk_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    f1 = 2 * p * r / np.maximum(p + r, 1e-300)
    return float(f1.max())


def sk_metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1max": sk_f1max(y, s)}


def reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """The textbook loop: every distinct score as a threshold, per-region overlaps, FPR on normal pixels."""
    structure = np.ones((3, 3), dtype=int)
    regions = []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure)
        regions += [m[lab == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    x, y = np.array(fprs), np.array(pros)
    keep = x <= max_fpr
    area = np.trapezoid(y[keep], x[keep])
    j = np.flatnonzero(~keep)
    if len(j) and x[keep][-1] < max_fpr:
        i = j[0]
        y_at = np.interp(max_fpr, [x[i - 1], x[i]], [y[i - 1], y[i]])
        area += (y[i - 1] + y_at) / 2 * (max_fpr - x[i - 1])
    return area / max_fpr


def blob_data(seed: int, n: int = 6, size: int = 24, levels: int | None = None):
    """Maps and masks with several blob regions per image (and one normal image)."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 1.5, 1.5)) > 0.35
    masks[0] = False
    maps = np.clip(0.5 * masks + 0.25 + 0.2 * rng.standard_normal(masks.shape), 0, 1)
    if levels is not None:   # centres of a grid of `levels` bins over [0, 1]
        maps = (np.floor(maps * levels).clip(0, levels - 1) + 0.5) / levels
    return maps, masks


def test_binary_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) + 0.4 * y, 1)   # many ties
    got = binary_metrics(s, y)
    for k, v in sk_metrics(y, s).items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert f1_max(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(got["f1max"])


def test_binary_metrics_hand_worked():
    # positives 0.9, 0.4; negatives 0.6, 0.1: 3 of 4 pairs ordered, AP = (1 + 2/3)/2, F1 at 0.4 = 0.8
    got = binary_metrics([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0])
    assert got == pytest.approx({"auroc": 0.75, "ap": 5 / 6, "f1max": 0.8})


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bins", [64, 1000])
def test_pixel_metrics_exact_on_bin_grid_and_streamed(bins):
    maps, masks = blob_data(1, levels=bins)
    pm = PixelMetrics(bins=bins)
    for i in range(0, len(maps), 2):   # streamed in batches of two
        pm.update(maps[i : i + 2], masks[i : i + 2])
    got = pm.compute()
    ref = sk_metrics(masks.ravel(), maps.ravel())
    for k, v in ref.items():
        assert got[f"pixel_{k}"] == pytest.approx(v, abs=1e-12), k
    assert got["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-12)
    one = PixelMetrics(bins=bins)
    one.update(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None])  # (B,1,H,W), torch
    assert one.compute() == pytest.approx(got, abs=1e-12)


def test_pixel_metrics_continuous_scores_close_to_exact():
    maps, masks = blob_data(2, n=8, size=32)
    got = localization_report(maps, masks, sigma=0)
    ref = sk_metrics(masks.ravel(), maps.ravel())
    for k, v in ref.items():
        assert got[f"pixel_{k}"] == pytest.approx(v, abs=1e-3), k
    assert got["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-3)
    assert 0.5 < got["aupro"] < 1   # informative data, not a degenerate curve


def test_eight_bit_maps_are_exact_with_default_bins():
    maps, masks = blob_data(3)
    maps = np.round(maps * 255) / 255
    pm = PixelMetrics()
    pm.update(maps, masks)
    got = pm.compute()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert got["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-12)


def test_memory_does_not_grow_with_images():
    pm = PixelMetrics(bins=256)
    sizes = None
    for seed in range(5):
        maps, masks = blob_data(seed, n=3, size=16)
        pm.update(maps, masks)
        now = [pm.pos.nbytes, pm.neg.nbytes, pm.region.nbytes]
        assert sizes is None or now == sizes
        sizes = now
    assert pm.n_regions > 5


def test_aupro_hand_worked():
    masks = np.zeros((1, 4, 5), dtype=bool)
    masks[0, 0, :2] = True   # region A
    masks[0, 3, 3:] = True   # region B (not touching A)
    perfect = masks.astype(float)
    pm = PixelMetrics(bins=16)
    pm.update(perfect, masks)
    assert pm.compute()["aupro"] == pytest.approx(1.0)
    inverted = PixelMetrics(bins=16)
    inverted.update(1 - perfect, masks)
    assert inverted.aupro() == pytest.approx(0.0)
    # A found before any false positive, B never above the normal pixels: PRO 0.5 on [0, 0.3]
    half = np.full(masks.shape, 0.5)
    half[0, 0, :2], half[0, 3, 3:] = 1.0, 0.0
    pm = PixelMetrics(bins=16)
    pm.update(half, masks)
    assert pm.aupro() == pytest.approx(0.5)
    # one region at 0.5; 3 of 16 normal pixels at 0.9 (FPR 3/16 first, PRO still 0), the rest 0.1
    m2 = np.zeros((1, 4, 5), dtype=bool)
    m2[0, 1:3, 1:3] = True
    s2 = np.where(m2, 0.5, 0.1)
    s2[0, 0, :3] = 0.9
    pm = PixelMetrics(bins=16)
    pm.update(s2, m2)
    assert pm.aupro() == pytest.approx((0.3 - 3 / 16) / 0.3)


def test_regions_are_eight_connected_by_default():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True   # diagonal neighbours: one region in MVTec AD
    maps = np.zeros((1, 6, 6))
    eight, four = PixelMetrics(bins=8), PixelMetrics(bins=8, connectivity=1)
    eight.update(maps, masks)
    four.update(maps, masks)
    assert (eight.n_regions, four.n_regions) == (1, 2)


def test_pixel_metrics_errors():
    pm = PixelMetrics(bins=8)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pm.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        pm.update(np.full((1, 4, 4), np.nan), np.zeros((1, 4, 4), dtype=bool))
    pm.update(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="0 positive"):
        pm.compute()
    pm = PixelMetrics(bins=8)
    pm.update(np.random.default_rng(0).random((1, 4, 4)), np.ones((1, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="0 negative"):
        pm.compute()
    with pytest.raises(ValueError, match="image metrics need positives"):
        binary_metrics([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="hi > lo"):
        PixelMetrics(lo=1, hi=1)


def test_out_of_range_scores_warn_and_clip():
    maps, masks = blob_data(4)
    pm = PixelMetrics(bins=64)
    pm.update(maps * 2, masks)
    with pytest.warns(UserWarning, match="clipped"):
        pm.compute()
    assert pm.clipped == np.count_nonzero(maps * 2 > 1)


def test_image_score_gaussian_and_box_match_scipy():
    rng = np.random.default_rng(5)
    maps = rng.random((3, 40, 36)).astype(np.float32)
    got = image_score(torch.from_numpy(maps), sigma=4).numpy()
    ref = [ndimage.gaussian_filter(m.astype(np.float64), 4, mode="mirror", truncate=4.0).max() for m in maps]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    got = image_score(maps[:, None], box=21, reduce="mean").numpy()   # (B,1,H,W) numpy input
    ref = [ndimage.uniform_filter(m.astype(np.float64), 21, mode="constant").mean() for m in maps]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(image_score(maps, sigma=0).numpy(), maps.max(axis=(1, 2)))
    with pytest.raises(ValueError, match="reduce"):
        image_score(maps, reduce="median")


def test_localization_report_image_level():
    maps, masks = blob_data(6, n=10)
    rep = localization_report(maps, masks)
    labels = masks.any(axis=(1, 2))
    scores = image_score(maps).numpy()
    assert set(rep) == {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
                        "aupro"}
    assert rep["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert rep["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    lm = LocalizationMetrics(pro=False)
    lm.update(maps, masks, scores=np.arange(10.0), labels=np.arange(10) % 2)
    rep = lm.compute()
    assert "aupro" not in rep and rep["image_auroc"] == pytest.approx(roc_auc_score(np.arange(10) % 2, np.arange(10)))
