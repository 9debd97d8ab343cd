"""Model-free anomaly baselines: Perlin (DRAEM) and CutPaste (normal, scar)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from hybrid.baselines import (
    CutPasteConfig,
    PerlinConfig,
    TextureFolder,
    cutpaste,
    perlin_mask,
    perlin_noise,
    synthesize,
)

H, W = 48, 64
CASES = [("perlin", PerlinConfig()), ("cutpaste", CutPasteConfig()), ("cutpaste", CutPasteConfig(variant="scar"))]
IDS = ["perlin", "cutpaste-normal", "cutpaste-scar"]


def dataset(n: int = 6, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: every pixel distinct enough that edits show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for _ in range(n):
        base = rng.uniform(40, 200, 3) + np.stack([xx * rng.uniform(-1, 1), yy * rng.uniform(-1, 1), xx - yy], -1)
        out.append(np.clip(base + rng.normal(0, 12, (H, W, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("method,cfg", CASES, ids=IDS)
def test_only_masked_pixels_change_and_masks_are_binary_nonempty(method, cfg):
    imgs = dataset()
    out, masks = synthesize(imgs, method, seed=3, cfg=cfg)
    assert out.shape == imgs.shape and out.dtype == np.uint8
    assert masks.shape == imgs.shape[:3] and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 255}
    for img, o, m in zip(imgs, out, masks):
        assert m.any()
        assert np.array_equal(o[m == 0], img[m == 0])  # bit-identical outside the mask
    assert any((o != i).any() for o, i in zip(out, imgs))


@pytest.mark.parametrize("method,cfg", CASES, ids=IDS)
def test_seeded_and_independent_of_batching(method, cfg):
    imgs = dataset()
    a = synthesize(imgs, method, seed=7, cfg=cfg, sources=imgs)
    b = synthesize(imgs, method, seed=7, cfg=cfg, sources=imgs)
    c = synthesize(imgs, method, seed=8, cfg=cfg, sources=imgs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    parts = [synthesize(imgs[lo:hi], method, seed=7, cfg=cfg, sources=imgs, start=lo)
             for lo, hi in [(0, 1), (1, 4), (4, 6)]]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), a[0])
    assert np.array_equal(np.concatenate([p[1] for p in parts]), a[1])
    solo = synthesize(imgs[4:5], method, seed=7, cfg=cfg, sources=imgs, start=4)
    assert np.array_equal(solo[0][0], a[0][4])


def test_cutpaste_normal_pastes_a_rectangle_cut_from_the_image():
    img = dataset(1)[0]
    for s in range(20):
        out, mask = cutpaste(img, np.random.default_rng(s), CutPasteConfig(jitter=0.0))
        ys, xs = np.nonzero(mask)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert mask.sum() == h * w  # a full rectangle
        assert 0.02 * H * W * 0.7 <= h * w <= 0.15 * H * W * 1.3
        assert 0.3 / 1.5 <= w / h <= 3.3 * 1.5
        patch = out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]  # unjittered: a copy of some window
        windows = np.lib.stride_tricks.sliding_window_view(img, patch.shape)
        assert (windows == patch).all(axis=(-3, -2, -1)).any()


def test_cutpaste_scar_is_thin_rotated_and_scales_with_resolution():
    big = cv2.resize(dataset(1)[0], (512, 512))
    cfg = CutPasteConfig(variant="scar")
    areas, tilted = [], 0
    for s in range(10):
        _, mask = cutpaste(big, np.random.default_rng(s), cfg)
        areas.append(mask.sum())
        ys, xs = np.nonzero(mask)
        assert np.ptp(ys) + 1 <= math.ceil((16 + 25) * 2 * math.cos(math.pi / 4)) + 2
        tilted += mask.sum() < (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # not an upright rectangle
    assert tilted >= 5
    # 512 px: 2x the sizes at 256 px, so 4x the area: between 4*2*10 and 4*16*25 pixels
    assert 4 * 2 * 10 * 0.8 <= min(areas) and max(areas) <= 4 * 16 * 25 * 1.2


def test_perlin_noise_and_mask():
    rng = np.random.default_rng(0)
    n = perlin_noise(64, 48, (4, 2), rng)
    assert n.shape == (64, 48) and n.dtype == np.float32 and np.abs(n).max() <= math.sqrt(2)
    assert n[0, 0] == 0  # lattice points are zeros of gradient noise
    m = perlin_mask(32, 32, np.random.default_rng(1), PerlinConfig())
    assert m.dtype == bool and m.any()
    # A threshold the noise never reaches: the fallback (top 10% of the last draw) keeps it non-empty.
    m = perlin_mask(32, 32, np.random.default_rng(1), PerlinConfig(threshold=0.999, max_tries=2))
    assert 0 < m.mean() <= 0.2


def test_perlin_blend_range_and_textures(tmp_path):
    imgs = dataset(3)
    tex = tmp_path / "dtd" / "banded"
    tex.mkdir(parents=True)
    cv2.imwrite(str(tex / "a.png"), np.full((20, 30, 3), (255, 0, 0), np.uint8))  # BGR: pure blue in RGB
    folder = TextureFolder(tmp_path / "dtd")
    assert len(folder) == 1 and folder.get(0, H, W).shape == (H, W, 3)
    cfg = PerlinConfig(beta=(0.0, 0.0), jitter=0.0, textures=str(tmp_path / "dtd"))
    out, masks = synthesize(imgs, "perlin", seed=1, cfg=cfg)
    assert (out[masks == 255] == (0, 0, 255)).all()  # beta 0: the texture replaces the image
    out, masks = synthesize(imgs, "perlin", seed=1, cfg=PerlinConfig(beta=(1.0, 1.0)), sources=folder)
    assert np.array_equal(out, imgs)  # beta 1: the image is kept


def test_texture_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        TextureFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.* is empty"):
        TextureFolder(tmp_path / "empty")
    d = tmp_path / "junk"
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"junk holds no readable images.*notes\.txt.*broken\.jpg"):
        TextureFolder(d)
    with pytest.raises(ValueError, match="junk"):
        synthesize(dataset(1), "perlin", seed=0, cfg=PerlinConfig(textures=str(d)))


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match=r"baselines\.perlin\.beta"):
        PerlinConfig(beta=(0.9, 0.1))
    with pytest.raises(ValueError, match=r"baselines\.perlin\.scale_exponents"):
        PerlinConfig(scale_exponents=(3, 3))
    with pytest.raises(ValueError, match=r"baselines\.cutpaste\.variant"):
        CutPasteConfig(variant="3way")
    with pytest.raises(ValueError, match=r"baselines\.cutpaste\.area"):
        CutPasteConfig(area=(0.1, 2.0))
    with pytest.raises(ValueError, match=r"unknown baselines\.cutpaste config key"):
        CutPasteConfig.from_dict({"areas": (0.1, 0.2)})
    assert PerlinConfig.from_dict({"beta": [0.1, 0.5]}).beta == (0.1, 0.5)
    with pytest.raises(ValueError, match="unknown baseline"):
        synthesize(dataset(1), "draem", seed=0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        synthesize(dataset(1).astype(np.float32), "cutpaste", seed=0)
