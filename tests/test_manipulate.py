import numpy as np
import pytest
import torch
from scipy import ndimage

from hybrid.manipulate import (
    MANIPULATIONS,
    ManipulateConfig,
    background_value,
    draw_region,
    draw_regions,
    foreground,
    local_anomaly,
    merge,
    reference_affine,
    remove,
    replace,
    sample_region,
    tps,
)

H = W = 32


def scene(seed: int, depth: bool = True) -> dict[str, torch.Tensor]:
    """A bright disc on a dark background; depth nearer on the disc; edges on its rim; stripes of
    texture on the disc so that warps show."""
    rng = np.random.default_rng(seed)
    cy, cx, r = 16 + rng.uniform(-2, 2), 16 + rng.uniform(-2, 2), rng.uniform(8, 11)
    yy, xx = np.mgrid[0:H, 0:W]
    dist = np.hypot(xx - cx, yy - cy)
    disc = dist < r
    near = np.where(disc, 1 - dist / r, 0.0) * 1.6 - 0.6
    rim = (np.abs(dist - r) < 1) | (disc & (np.sin(xx * 1.3 + seed) > 0.8))
    image = np.where(disc, 0.7, -0.8)[None].repeat(3, 0) + 0.1 * np.sin(xx / 3.0)[None]
    out = {"image": torch.tensor(image, dtype=torch.float32),
           "edge": torch.tensor(np.where(rim, 1.0, -1.0), dtype=torch.float32)[None]}
    if depth:
        out["depth"] = torch.tensor(near, dtype=torch.float32)[None]
    return out


def maps(s: dict) -> dict:
    return {k: s[k] for k in ("edge", "depth") if k in s}


def some_region(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(draw_region(H, W, np.random.default_rng(seed), ManipulateConfig(area=(0.1, 0.1))))[None]


def test_remove_clears_edges_and_flattens_depth_only_inside_the_region():
    t, r, region = maps(scene(0)), maps(scene(1)), some_region()
    out = remove(t, r, region, np.random.default_rng(0), ManipulateConfig())
    assert (out["edge"][region] == -1).all()
    assert torch.equal(out["edge"][~region], t["edge"][~region])
    assert torch.equal(out["depth"][~region], t["depth"][~region])
    assert torch.allclose(out["depth"][region], background_value(t["depth"]).flatten().expand(int(region.sum())))
    assert background_value(t["depth"]).item() == pytest.approx(-0.6)  # the far background of the scene


def test_replace_copies_reference_values_exactly_and_leaves_the_outside_bit_identical():
    t, r, region = maps(scene(0)), maps(scene(1)), some_region(3)
    out = replace(t, r, region, np.random.default_rng(0), ManipulateConfig())
    for k in t:
        assert torch.equal(out[k][region], r[k][region])
        assert torch.equal(out[k][~region], t[k][~region])


def test_merge_takes_the_edge_maximum_and_a_depth_blend_inside_the_region():
    t, r = maps(scene(0)), maps(scene(5))
    region = torch.zeros(1, H, W, dtype=torch.bool)
    region[:, 10:22, 12:20] = True  # on both discs, whose depths differ there
    out = merge(t, r, region, np.random.default_rng(0), ManipulateConfig(merge_weight=(0.3, 0.7)))
    assert torch.equal(out["edge"][region], torch.maximum(t["edge"], r["edge"])[region])
    lo, hi = torch.minimum(t["depth"], r["depth"]), torch.maximum(t["depth"], r["depth"])
    inside = out["depth"][region]
    assert ((inside >= lo[region] - 1e-6) & (inside <= hi[region] + 1e-6)).all()
    w = (inside - r["depth"][region]) / (t["depth"][region] - r["depth"][region])
    differs = (t["depth"] - r["depth"]).abs()[region] > 1e-3
    assert 0.3 <= w[differs].min() and w[differs].max() <= 0.7 and w[differs].std() < 1e-4  # one weight
    assert torch.equal(out["depth"][~region], t["depth"][~region])


def test_tps_moves_content_only_inside_the_region():
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    t = {"edge": (torch.sin(xx * 0.9) * torch.cos(yy * 0.7))[None].float(), "depth": (xx / W * 2 - 1)[None].float()}
    region = torch.zeros(1, H, W, dtype=torch.bool)
    region[:, 8:24, 6:26] = True
    out = tps(t, t, region, np.random.default_rng(4), ManipulateConfig(tps_shift=0.12))
    for k in t:
        assert torch.equal(out[k][~region], t[k][~region])
        assert (out[k][region] - t[k][region]).abs().max() > 0.05
        assert out[k].min() >= t[k].min() - 1e-5 and out[k].max() <= t[k].max() + 1e-5  # moved, not invented


def test_tps_is_the_whole_box_warp_inside_an_irregular_region():
    """Evaluated at the region's pixels only, the TPS gives the values of the box's whole warp
    (its grid sampled everywhere in the box, then kept inside the region), bit for bit."""
    import torch.nn.functional as F

    from hybrid.augment import tps_warp_grid

    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    t = {"edge": (torch.sin(xx * 0.9) * torch.cos(yy * 0.7))[None].float(), "depth": (xx / W * 2 - 1)[None].float()}
    cfg = ManipulateConfig(tps_shift=0.12)
    for seed in range(5):
        region = torch.from_numpy(np.random.default_rng(seed).random((1, H, W)) < 0.5)
        region[:, :3] = False  # a box smaller than the image
        out = tps(t, t, region, np.random.default_rng(seed), cfg)
        rng = np.random.default_rng(seed)  # tps's draws, repeated: the box and its lattice
        ys, xs = np.nonzero(region[0].numpy())
        x0, x1, y0, y1 = max(xs.min() - 2, 0), min(xs.max() + 2, W - 1), max(ys.min() - 2, 0), min(ys.max() + 2, H - 1)
        g = np.linspace(0.0, 1.0, 5)
        gy, gx = np.meshgrid(g, g, indexing="ij")
        src = np.stack([gx * (x1 - x0), gy * (y1 - y0)], -1).reshape(-1, 2)
        inner = ((gx > 0) & (gx < 1) & (gy > 0) & (gy < 1)).ravel()
        dst = src.copy()
        dst[inner] += rng.uniform(-cfg.tps_shift, cfg.tps_shift, (int(inner.sum()), 2)) * (x1 - x0, y1 - y0)
        grid = tps_warp_grid(torch.from_numpy(src).float()[None], torch.from_numpy(dst).float()[None],
                             y1 - y0 + 1, x1 - x0 + 1)
        for k, v in t.items():
            whole = v.clone()
            whole[:, y0:y1 + 1, x0:x1 + 1] = F.grid_sample(v[None, :, y0:y1 + 1, x0:x1 + 1], grid, mode="bilinear",
                                                            padding_mode="border", align_corners=False)[0]
            assert torch.equal(out[k], torch.where(region, whole, v))


@pytest.mark.parametrize("mode", ["depth", "color"])
def test_object_aware_regions_fall_inside_the_foreground(mode):
    cfg = ManipulateConfig(object_aware=1.0, foreground=mode, area=(0.02, 0.08), regions=(1, 3))
    for seed in range(6):
        t, r = scene(seed, depth=mode == "depth"), scene(seed + 10, depth=mode == "depth")
        fg = foreground(t, mode)
        assert fg is not None and 0.1 < fg.mean() < 0.6
        region, _ = sample_region(t, r, np.random.default_rng(seed), cfg)
        assert region.any() and not (region & ~fg).any()


def test_foreground_is_none_for_a_texture_without_an_object():
    rng = np.random.default_rng(0)
    texture = {"image": torch.tensor(rng.uniform(-1, 1, (3, H, W)), dtype=torch.float32),
               "depth": torch.zeros(1, H, W)}
    assert foreground(texture, "auto", 0.1) is None  # regions are then drawn anywhere


@pytest.mark.parametrize("shape", ["blob", "ellipse", "rectangle", "polygon"])
def test_region_area_stays_within_the_configured_bounds(shape):
    cfg = ManipulateConfig(shapes={shape: 1.0}, area=(0.02, 0.05), aspect=(0.2, 5.0))
    for seed in range(8):
        m = draw_region(64, 64, np.random.default_rng(seed), cfg)
        assert 0.02 * 64 * 64 - 1 <= m.sum() <= 0.05 * 64 * 64 + 1


def test_region_is_the_union_of_the_target_and_the_moved_reference_regions():
    import cv2

    cfg = ManipulateConfig(object_aware=0.0, reference_scale=(1.2, 1.2), reference_shift=0.1)
    t, r = scene(0), scene(1)
    added = 0
    for seed in range(5):
        region, affine = sample_region(t, r, np.random.default_rng(seed), cfg)
        rng = np.random.default_rng(seed)  # replay the draws: coin, target regions, affine, reference regions
        rng.random()
        own = draw_regions(H, W, rng, cfg)
        again = reference_affine(H, W, rng, cfg)
        ref = draw_regions(H, W, rng, cfg)
        moved = cv2.warpAffine(ref.astype(np.uint8), again, (W, H), flags=cv2.INTER_NEAREST).astype(bool)
        np.testing.assert_array_equal(affine, again)
        assert abs(again[0, 0]) == pytest.approx(1.2) and abs(again[1, 1]) == pytest.approx(1.2)
        np.testing.assert_array_equal(region, own | moved)
        added += int((moved & ~own).sum())
    assert added > 0


@pytest.mark.parametrize("name", sorted(MANIPULATIONS))
def test_local_anomaly_is_seeded_and_touches_only_its_region(name):
    t, r = scene(2), scene(3)
    cfg = ManipulateConfig(area=(0.05, 0.1))
    a, region = local_anomaly(t, r, name, np.random.default_rng(11), cfg)
    b, region_b = local_anomaly(t, r, name, np.random.default_rng(11), cfg)
    assert torch.equal(region, region_b) and all(torch.equal(a[k], b[k]) for k in a)
    assert region.dtype == torch.bool and region.shape == (1, H, W) and region.any()
    assert set(a) == {"edge", "depth"}
    for k in a:
        assert torch.equal(a[k][~region], t[k][~region])
    assert any(not torch.equal(a[k][region], t[k][region]) for k in a)


def test_unknown_manipulation_names_it_and_lists_the_valid_ones():
    t = scene(0)
    with pytest.raises(ValueError, match=r"'smash'.*merge, remove, replace, tps"):
        local_anomaly(t, t, "smash", np.random.default_rng(0), ManipulateConfig())
    with pytest.raises(ValueError, match=r"'crack'.*merge, remove, replace, tps"):
        ManipulateConfig.from_dict({"manipulations": ["merge", "crack"]})
    with pytest.raises(ValueError, match="unknown manipulate config key"):
        ManipulateConfig.from_dict({"areas": [0.1, 0.2]})


def test_mask_region_is_the_union_of_both_masks_after_their_transforms_and_nothing_else():
    from hybrid.manipulate import mask_region, reference_affine, warp

    h, w = 40, 48
    target, reference = np.zeros((h, w), bool), np.zeros((h, w), bool)
    target[5:12, 6:20] = True
    reference[25:33, 30:36] = True
    cfg = ManipulateConfig(reference_shift=0.1, reference_flip=0.5)
    for seed in range(5):
        region, affine = mask_region(target, reference, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(affine, reference_affine(h, w, np.random.default_rng(seed), cfg))
        moved = warp(reference, affine, nearest=True)
        assert moved.any()
        np.testing.assert_array_equal(region, target | moved)
    grown, _ = mask_region(target, reference, np.random.default_rng(0), ManipulateConfig(mask_dilation=2))
    exact, _ = mask_region(target, reference, np.random.default_rng(0), ManipulateConfig())
    dist = ndimage.distance_transform_edt(~exact)
    assert (grown >= exact).all() and grown[dist > 2].sum() == 0 and grown[(dist > 0) & (dist <= 1)].all()


# ------------------------------------------- the polygon, computed faster: the same fields and regions
def reference_polygon_field(height, width, centre, radius, aspect, angle, rng):
    """shape_field("polygon", ...) as it was before it was made faster (the reference, bit for bit)."""
    import math

    dx = np.arange(width, dtype=np.float32)[None] - np.float32(centre[0])
    dy = np.arange(height, dtype=np.float32)[:, None] - np.float32(centre[1])
    c, s, k = math.cos(angle), math.sin(angle), math.sqrt(aspect)
    u = dx * np.float32(c / (k * radius)) + dy * np.float32(s / (k * radius))  # (H, W) by broadcasting
    v = dx * np.float32(-s * k / radius) + dy * np.float32(c * k / radius)
    n = int(rng.integers(3, 9))  # vertex angles: jittered by < 0.2 of the spacing, so gaps < pi
    theta = np.sort(np.mod((np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * math.pi / n
                           + rng.uniform(0, 2 * math.pi), 2 * math.pi))
    r = rng.uniform(0.5, 1.0, n)
    phi = np.mod(np.arctan2(v, u), 2 * math.pi)
    i = (np.searchsorted(theta, phi, side="right") - 1) % n  # the vertex before phi
    j = (i + 1) % n
    rel, gap = np.mod(phi - theta[i], 2 * math.pi), np.mod(theta[j] - theta[i], 2 * math.pi)
    edge = r[i] * r[j] * np.sin(gap) / (r[i] * np.sin(rel) + r[j] * np.sin(gap - rel))
    return -np.hypot(u, v) / edge


def reference_shape_field(shape, height, width, centre, radius, aspect, angle, rng):
    """shape_field as it was before regions were scored in windows (the reference, bit for bit)."""
    import math

    import cv2

    if shape == "polygon":
        return reference_polygon_field(height, width, centre, radius, aspect, angle, rng)
    dx = np.arange(width, dtype=np.float32)[None] - np.float32(centre[0])
    dy = np.arange(height, dtype=np.float32)[:, None] - np.float32(centre[1])
    c, s, k = math.cos(angle), math.sin(angle), math.sqrt(aspect)
    u = dx * np.float32(c / (k * radius)) + dy * np.float32(s / (k * radius))
    v = dx * np.float32(-s * k / radius) + dy * np.float32(c * k / radius)
    if shape == "ellipse":
        return -(u * u + v * v)
    if shape == "rectangle":
        return -np.maximum(np.abs(u), np.abs(v))
    cells = int(np.clip(round(max(height, width) / (0.7 * radius)), 4, 64))
    noise = cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    noise = (noise - noise.mean()) / (noise.std() + 1e-8)
    return -(u * u + v * v) + 0.8 * noise


def reference_top_pixels(score, allowed, k):
    flat = score.ravel() if allowed is None else np.where(allowed, score, -np.inf).ravel()
    k = int(min(max(k, 1), flat.size if allowed is None else allowed.sum()))
    out = np.zeros(flat.size, bool)
    if k > 0:
        out[np.argpartition(-flat, k - 1)[:k]] = True
    return out.reshape(score.shape)


def reference_draw_region(height, width, rng, cfg, allowed=None, polygon_field=reference_polygon_field,
                          candidates=None):
    """draw_region as it was: every shape's whole field, then its top pixels (``candidates``, the
    centres draw_regions works out once, is ignored: they are worked out here as they were)."""
    import math

    names = list(cfg.shapes)
    weights = np.array([cfg.shapes[n] for n in names], float)
    shape = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    area = rng.uniform(*cfg.area) * height * width
    aspect = math.exp(rng.uniform(math.log(cfg.aspect[0]), math.log(cfg.aspect[1])))
    angle = rng.uniform(0, math.pi)
    cand = np.flatnonzero(allowed) if allowed is not None and allowed.any() else np.arange(height * width)
    cy, cx = divmod(int(cand[rng.integers(len(cand))]), width)
    args = (height, width, (cx, cy), math.sqrt(area / math.pi), aspect, angle, rng)
    score = polygon_field(*args) if shape == "polygon" else reference_shape_field(shape, *args)
    return reference_top_pixels(score, allowed, round(area))


def some_allowed(kind: int, height: int, width: int, rng: np.random.Generator):
    """None, or an object-like disc, a sparse scatter, one thin column, two small far-apart squares (the
    top k then reach far from the centre), or nothing at all."""
    yy, xx = np.mgrid[:height, :width]
    if kind == 1:
        return np.hypot(xx - rng.uniform(0, width), yy - rng.uniform(0, height)) < rng.uniform(3, width)
    if kind == 2:
        return rng.random((height, width)) < rng.uniform(0.002, 0.5)
    if kind == 3:
        return xx == rng.integers(width)
    if kind == 4:
        return ((xx < 4) & (yy < 4)) | ((xx >= width - 6) & (yy >= height - 6))
    if kind == 5:
        return np.zeros((height, width), bool)
    return None


SIZES = [(64, 64), (256, 256), (48, 80)]


def test_polygon_field_is_bit_identical_to_the_reference():
    from hybrid.manipulate import shape_field

    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = SIZES[trial % 3]
        args = (height, width, (float(rng.integers(width)), float(rng.integers(height) + rng.uniform(-1, 1))),
                rng.uniform(0.5, 60), float(np.exp(rng.uniform(-2, 2))), rng.uniform(0, np.pi))
        seed = int(rng.integers(1 << 31))
        got, want = shape_field("polygon", *args, np.random.default_rng(seed)), \
            reference_polygon_field(*args, np.random.default_rng(seed))
        assert got.dtype == want.dtype == np.float64
        np.testing.assert_array_equal(got.view(np.uint64), want.view(np.uint64))  # bits, signed zeros too


@pytest.mark.parametrize("shape", ["ellipse", "rectangle", "blob"])
def test_fields_of_each_shape_are_those_of_the_reference(shape):
    """Every shape's field is computed by windows; over the whole image it must be the old field, bit for bit."""
    from hybrid.manipulate import shape_field

    rng = np.random.default_rng(3)
    for trial in range(30):
        height, width = SIZES[trial % 3]
        args = (height, width, (float(rng.integers(width)), float(rng.integers(height))), rng.uniform(0.5, 60),
                float(np.exp(rng.uniform(-2, 2))), rng.uniform(0, np.pi))
        seed = int(rng.integers(1 << 31))
        got = shape_field(shape, *args, np.random.default_rng(seed))
        want = reference_shape_field(shape, *args, np.random.default_rng(seed))
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", ["polygon", "ellipse", "rectangle", "blob"])
@pytest.mark.parametrize("area", [(0.005, 0.04), (0.0005, 0.4)])
def test_regions_of_each_shape_are_those_of_the_reference(shape, area):
    """Each shape is scored in a window about its centre: its regions must be the whole field's (masks
    that pull the top pixels far from the centre, tiny and large areas, thin shapes, ties about pixel
    centres), drawn with the same random numbers."""
    cfg = ManipulateConfig(shapes={shape: 1.0}, area=area, aspect=(0.1, 10.0))
    mask_rng = np.random.default_rng(1)
    for trial in range(200 if shape == "polygon" else 120):
        height, width = SIZES[trial % 3]
        allowed = some_allowed(trial // 3 % 6, height, width, mask_rng)
        rng, ref = np.random.default_rng(trial), np.random.default_rng(trial)
        np.testing.assert_array_equal(draw_region(height, width, rng, cfg, allowed),
                                      reference_draw_region(height, width, ref, cfg, allowed))
        assert rng.bit_generator.state == ref.bit_generator.state  # the same draws: what follows is unchanged


def test_regions_of_all_shapes_and_sample_region_are_those_of_the_reference():
    cfg = ManipulateConfig()
    mask_rng = np.random.default_rng(2)
    for trial in range(60):
        height, width = SIZES[trial % 3]
        allowed = some_allowed(trial // 3 % 3, height, width, mask_rng)
        rng, ref = np.random.default_rng(trial), np.random.default_rng(trial)
        want = np.zeros((height, width), bool)
        for _ in range(int(ref.integers(cfg.regions[0], cfg.regions[1] + 1))):
            want |= reference_draw_region(height, width, ref, cfg, allowed)
        np.testing.assert_array_equal(draw_regions(height, width, rng, cfg, allowed), want)
        assert rng.bit_generator.state == ref.bit_generator.state


@pytest.mark.parametrize("object_aware", [0.0, 1.0])
def test_sample_region_is_that_of_the_reference(object_aware, monkeypatch):
    import hybrid.manipulate as manipulate

    cfg = ManipulateConfig(shapes={"polygon": 3.0, "ellipse": 1.0}, object_aware=object_aware, area=(0.02, 0.2))
    pairs = [(scene(seed), scene(seed + 1, depth=seed % 2 == 0)) for seed in range(20)]
    got = [sample_region(t, r, np.random.default_rng(seed), cfg) for seed, (t, r) in enumerate(pairs)]
    monkeypatch.setattr(manipulate, "draw_region", reference_draw_region)  # draw_regions' too
    for seed, ((t, r), (region, affine)) in enumerate(zip(pairs, got)):
        want_region, want_affine = sample_region(t, r, np.random.default_rng(seed), cfg)
        np.testing.assert_array_equal(region, want_region)
        np.testing.assert_array_equal(affine, want_affine)


def test_polygon_regions_with_tied_scores_are_the_argpartition_pick_of_the_whole_field(monkeypatch):
    """Scores in steps of 1/4: ties at the k-th score are the rule, and which tied pixels are taken is
    np.argpartition's pick over the whole field, which a window must not change."""
    import hybrid.manipulate as manipulate

    score = manipulate._polygon_score
    monkeypatch.setattr(manipulate, "_polygon_score", lambda u, v, polygon: np.floor(score(u, v, polygon) * 4) / 4)
    cfg = ManipulateConfig(shapes={"polygon": 1.0})
    for trial in range(30):
        height, width = SIZES[trial % 3]
        allowed = some_allowed(trial // 3 % 2, height, width, np.random.default_rng(trial))
        got = draw_region(height, width, np.random.default_rng(trial), cfg, allowed)
        want = reference_draw_region(height, width, np.random.default_rng(trial), cfg, allowed,
                                     lambda *a: np.floor(reference_polygon_field(*a) * 4) / 4)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("steps", [0, 4, 64])
def test_top_pixels_are_the_argpartition_pick_of_the_whole_field(steps):
    """top_pixels finds the k-th score among the pixels above a sampled threshold; the pixels must be
    those of np.argpartition over the whole field, with ties at the k-th score (scores in steps of
    1/steps), masks that leave fewer than k pixels, and k from one pixel to the whole image."""
    from hybrid.manipulate import top_pixels

    rng = np.random.default_rng(steps)
    for trial in range(150):
        height, width = SIZES[trial % 3]
        score = -np.hypot(*(np.mgrid[:height, :width] - rng.uniform(0, 64, (2, 1, 1))))
        score = score + rng.normal(0, 0.3, score.shape) if trial % 2 else score
        score = np.floor(score * steps) / steps if steps else score
        allowed = some_allowed(trial // 3 % 6, height, width, rng)
        k = int(rng.choice([1, 7, rng.integers(1, height * width // 10 + 2), height * width]))
        np.testing.assert_array_equal(top_pixels(score, allowed, k), reference_top_pixels(score, allowed, k))


def test_shape_choice_is_that_of_rng_choice_with_the_same_draw():
    """The region's shape is chosen without rng.choice's argument checks: the same index from the
    same draw, for any weights the config accepts (zeros, one shape, uneven sums)."""
    from hybrid.manipulate import _choose

    for weights in [(1.0, 1.0, 1.0, 1.0), (3.0, 0.0, 1.0, 0.5), (1.0,), (0.0, 0.0, 2.0), (1e-9, 7.0, 0.1, 1e3)]:
        w = np.array(weights, float)
        for seed in range(300):
            rng, ref = np.random.default_rng(seed), np.random.default_rng(seed)
            assert _choose(rng, weights) == int(ref.choice(len(w), p=w / w.sum()))
            assert rng.bit_generator.state == ref.bit_generator.state


def reference_foreground(maps, mode="auto", threshold=0.1):
    """foreground as it was, in torch (the reference, pixel for pixel)."""
    from hybrid.data.shards import unit_tensor
    from hybrid.manipulate import _ring_pixels

    def background_value(x):  # the border ring's median, as torch computes it
        return x.flatten(1).index_select(1, _ring_pixels(*x.shape[-2:])).median(dim=1).values[:, None, None]

    def usable(fg):
        frac = float(fg.float().mean())
        return fg.cpu().numpy() if 0.01 <= frac <= 0.9 else None

    if mode in ("auto", "depth") and "depth" in maps:
        d = maps["depth"]
        fg = usable((d - background_value(d))[0] > 2 * threshold)
        if fg is not None or mode == "depth":
            return fg
    if mode in ("auto", "color") and "image" in maps:
        im = unit_tensor(maps["image"])
        return usable(((im - background_value(im)).abs() > 2 * threshold).any(0))
    return None


@pytest.mark.parametrize("mode", ["auto", "depth", "color"])
def test_foreground_is_that_of_the_torch_reference(mode):
    """Foregrounds are found in numpy: the same pixels as torch's median and comparison, with values
    exactly at the threshold, medians of even and odd rings, fractions at the usable bounds, and
    stored (uint8) or float images."""
    from hybrid.manipulate import border_ring, foreground

    rng = np.random.default_rng(0)
    step = np.float32(0.2)
    for trial in range(60):
        h, w = [(100, 100), (64, 48), (37, 53)][trial % 3]
        depth = np.where(rng.random((h, w)) < rng.uniform(0, 1), rng.choice([0, 0.25, 0.5, -0.5], (h, w)), 0.0)
        depth = depth.astype(np.float32)
        if trial % 4 == 1:  # exactly at, just below and just above the threshold over the median 0
            depth = rng.choice(np.array([0, step, np.nextafter(step, 0), np.nextafter(step, 1)], np.float32), (h, w))
            depth[border_ring(h, w)] = 0
        if trial % 4 == 2:  # an object of exactly 1% or 90% of a 100 x 100 image, and one pixel more
            depth = np.zeros((h, w), np.float32)
            depth.ravel()[rng.permutation(h * w)[:int(rng.choice([100, 101, 9000, 9001, 99]))]] = 1.0
        image = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        image[:, h // 4:h // 2] = rng.integers(0, 256, 3, dtype=np.uint8)[:, None, None]
        maps = {"depth": torch.from_numpy(depth)[None],
                "image": torch.from_numpy(image) if trial % 2 else torch.from_numpy(image / 127.5 - 1).float()}
        got, want = foreground(maps, mode), reference_foreground(maps, mode)
        assert (got is None) == (want is None), trial
        if want is not None:
            np.testing.assert_array_equal(got, want)
