"""Batched geometric augmentation: paired channels move together, identity, determinism, TPS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hybrid import augment as augment_module
from hybrid.augment import AugmentConfig, apply_params, augment, sample_params, tps_warp_grid

OFF = dict(tps_prob=0.0, rtp_prob=0.0, flip_lr=0.0, flip_tb=0.0)
FLAGS = ("tps", "rtp", "flip_lr", "flip_tb")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blob(h: int, w: int, x: float, y: float, sigma: float = 1.2) -> torch.Tensor:
    """A Gaussian spot centred at pixel (x=col, y=row), shape (H, W)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))


def stacked_sample(h: int, w: int, x: float, y: float) -> torch.Tensor:
    """Image (3 ch), edge and depth maps in [-1, 1] on a -1 background, all marked at (x, y)."""
    spot = blob(h, w, x, y)
    amps = torch.tensor([1.0, 0.6, 1.4, 2.0, 0.8], dtype=torch.float64)  # RGB, edge, depth
    return (amps[:, None, None] * spot - 1).float()


def centroids(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 2) centroid (x, y) of each channel's mass above the -1 background."""
    m = (x.double() + 1).clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(x.shape[2], dtype=torch.float64),
                            torch.arange(x.shape[3], dtype=torch.float64), indexing="ij")
    total = m.sum((2, 3))
    return torch.stack([(m * xs).sum((2, 3)) / total, (m * ys).sum((2, 3)) / total], -1)


def test_paired_channels_move_identically() -> None:
    h = w = 40
    x = stacked_sample(h, w, 17.0, 22.0)[None].repeat(6, 1, 1, 1)
    y = augment(x, AugmentConfig(), gen(3))
    c = centroids(y)
    assert (c - c[:, :1]).abs().max() < 1e-3  # image, edge and depth marks stay aligned
    moved = (c[:, 0] - torch.tensor([17.0, 22.0], dtype=torch.float64)).norm(dim=-1)
    assert (moved > 1.0).sum() >= 3  # and the transforms really moved them


@pytest.mark.parametrize("flip, expect",
                         [("flip_lr", (29 - 8.0, 5.0)), ("flip_tb", (8.0, 23 - 5.0))])
def test_forced_flip_lands_where_expected(flip: str, expect: tuple[float, float]) -> None:
    x = stacked_sample(24, 30, 8.0, 5.0)[None]
    cfg = AugmentConfig(**{**OFF, flip: 1.0})
    y = augment(x, cfg, gen(0))
    expected = torch.tensor(expect, dtype=torch.float64).expand(5, 2)  # all five channels
    assert torch.allclose(centroids(y)[0], expected, atol=1e-3)
    dims = [-1] if flip == "flip_lr" else [-2]
    assert torch.allclose(y, x.flip(dims), atol=1e-5)


def test_resize_translate_flip_match_their_params() -> None:
    h, w, px, py = 48, 40, 15.0, 27.0
    cfg = AugmentConfig(tps_prob=0.0, rtp_prob=1.0, rtp_scale=(0.8, 1.25), rtp_translate=0.15)
    params = sample_params(8, cfg, gen(11), h, w)
    x = stacked_sample(h, w, px, py)[None].repeat(8, 1, 1, 1)
    got = centroids(apply_params(x, params))[:, 0]
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)
    p = centre + params["rtp_scale"].double()[:, None] * (torch.tensor([px, py]) - centre)
    p = p + params["rtp_shift"].double()
    p[:, 0] = torch.where(params["flip_lr"], w - 1 - p[:, 0], p[:, 0])
    p[:, 1] = torch.where(params["flip_tb"], h - 1 - p[:, 1], p[:, 1])
    assert (got - p).norm(dim=-1).max() < 0.1


def test_tps_moves_control_points_to_their_destinations() -> None:
    h = w = 64
    cfg = AugmentConfig(**{**OFF, "tps_prob": 1.0}, tps_window=(0.7, 0.7), tps_shift=0.1)
    params = sample_params(4, cfg, gen(5), h, w)
    moved = (params["tps_dst"] - params["tps_src"]).abs().sum(-1) > 0
    assert moved.sum(1).tolist() == [9, 9, 9, 9]  # the inner 3x3 of the 5x5 lattice
    for key in ("tps_src", "tps_dst"):  # put the control points on pixel centres
        params[key][moved] = params[key][moved].round()
    assert (params["tps_dst"] - params["tps_src"])[moved].abs().mean() > 1.0  # a real warp
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    x = torch.stack([xs, ys, torch.zeros(h, w)])[None].repeat(4, 1, 1, 1)  # coordinates + marks
    for b, k in moved.nonzero().tolist():
        sx, sy = params["tps_src"][b, k].long().tolist()
        x[b, 2, sy, sx] = 1.0 + k
    y = apply_params(x, params)
    for b, k in moved.nonzero().tolist():
        dx, dy = params["tps_dst"][b, k].long().tolist()
        src = params["tps_src"][b, k]
        assert torch.allclose(y[b, :2, dy, dx], src, atol=1e-3)  # output at dst reads input at src
        assert abs(y[b, 2, dy, dx].item() - (1.0 + k)) < 1e-3  # so the marked pixel landed there


def test_tps_leaves_pixels_outside_the_window_unchanged() -> None:
    h = w = 48
    cfg = AugmentConfig(**{**OFF, "tps_prob": 1.0}, tps_window=(0.4, 0.5))
    params = sample_params(3, cfg, gen(9), h, w)
    x = torch.rand(3, 5, h, w, generator=gen(1)) * 2 - 1
    y = apply_params(x, params)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for b in range(3):
        x0, y0, x1, y1 = params["tps_box"][b].tolist()
        outside = (xs < x0 - 1) | (xs > x1 + 1) | (ys < y0 - 1) | (ys > y1 + 1)
        assert (y[b] - x[b])[:, outside].abs().max() < 1e-4
        assert (y[b] - x[b])[:, ~outside].abs().max() > 0.05  # inside it did warp


def test_disabled_or_zero_probabilities_is_exact_identity() -> None:
    x = torch.rand(3, 5, 16, 20, generator=gen(0))
    assert augment(x, AugmentConfig(enabled=False), gen(1)) is x
    assert augment(x, AugmentConfig(**OFF), gen(1)) is x
    y = augment(x, AugmentConfig(**{**OFF, "flip_lr": 0.5}), gen(2))
    params = sample_params(3, AugmentConfig(**{**OFF, "flip_lr": 0.5}), gen(2), 16, 20)
    untouched = ~params["flip_lr"]
    assert untouched.any() and params["flip_lr"].any()
    assert torch.equal(y[untouched], x[untouched])  # bit-identical, no resampling blur


def test_same_seed_same_result_and_draws_differ_per_sample_and_call() -> None:
    x = stacked_sample(32, 32, 12.0, 19.0)[None].repeat(4, 1, 1, 1)
    cfg = AugmentConfig()
    assert torch.equal(augment(x, cfg, gen(7)), augment(x, cfg, gen(7)))
    g = gen(7)
    reference, target = augment(x, cfg, g), augment(x, cfg, g)  # consecutive draws, as in training
    assert not torch.allclose(reference, target)
    for b in range(1, 4):  # identical inputs, different transforms per sample
        assert not torch.allclose(reference[0], reference[b])


def test_draw_count_does_not_depend_on_probabilities() -> None:
    g1, g2 = gen(4), gen(4)
    sample_params(5, AugmentConfig(), g1, 16, 16)
    sample_params(5, AugmentConfig(enabled=False, **OFF), g2, 16, 16)
    assert torch.equal(g1.get_state(), g2.get_state())  # resume stays exact whatever the config


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_and_device_are_kept(dtype: torch.dtype) -> None:
    x = torch.rand(2, 3, 16, 16, generator=gen(0)).to(dtype)
    y = augment(x, AugmentConfig(tps_prob=1.0), gen(1))
    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape
    assert torch.isfinite(y.float()).all()


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="float"):
        augment(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), AugmentConfig(), gen(0))
    params = sample_params(2, AugmentConfig(), gen(0), 8, 8)
    with pytest.raises(ValueError, match="sample_params"):
        apply_params(torch.zeros(2, 3, 8, 12), params)


def test_config_from_dict() -> None:
    cfg = AugmentConfig.from_dict({"tps_window": [0.2, 0.5], "pad_mode": "zeros", "flip_tb": 0.0})
    assert cfg.tps_window == (0.2, 0.5) and cfg.pad_mode == "zeros" and cfg.flip_tb == 0.0
    with pytest.raises(ValueError, match=r"tps_windw.*valid keys.*tps_window"):
        AugmentConfig.from_dict({"tps_windw": [0.2, 0.5]})
    for bad in ({"tps_prob": 1.5}, {"tps_window": [0.8, 0.2]}, {"tps_shift": 0.3},
                {"rtp_scale": [0.0, 1.0]}, {"pad_mode": "wrap"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AugmentConfig.from_dict(bad)


def test_pad_mode_zeros_fills_outside() -> None:
    x = torch.ones(1, 2, 16, 16)
    cfg = AugmentConfig(**{**OFF, "rtp_prob": 1.0}, rtp_scale=(0.5, 0.5), rtp_translate=0.0)
    assert augment(x, cfg, gen(0))[0, :, 0, 0].tolist() == [1.0, 1.0]  # border replicates
    cfg.pad_mode = "zeros"
    y = augment(x, cfg, gen(0))
    assert y[0, :, 0, 0].abs().max() == 0 and y[0, :, 8, 8].tolist() == [1.0, 1.0]


def test_tps_warp_grid_reproduces_identity_and_translation() -> None:
    h, w = 12, 20
    src = torch.tensor([[[2.0, 3.0], [15.0, 2.0], [9.0, 10.0], [4.0, 8.0], [17.0, 9.0]]])
    ident = F.affine_grid(torch.eye(2, 3)[None], [1, 1, h, w], align_corners=False)
    assert torch.allclose(tps_warp_grid(src, src, h, w), ident, atol=1e-5)
    x = torch.rand(1, 2, h, w, generator=gen(0))
    grid = tps_warp_grid(src, src + torch.tensor([3.0, 2.0]), h, w)
    moved = F.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(moved[..., 2:, 3:], x[..., :-2, :-3], atol=1e-4)  # src content is at dst


def test_tps_warp_grid_at_some_points_gives_the_whole_grids_values_there() -> None:
    """The local anomaly's TPS evaluates its spline only at the region's pixels: each must get the
    value the whole grid has there, bit for bit, whatever the subset (the solver's column-major
    coefficients made MKL's product round a point by its position among the points)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(5, 160, 2))
        t = np.linspace(0, 1, 5)
        gy, gx = np.meshgrid(t, t, indexing="ij")
        src = np.stack([gx * (w - 1), gy * (h - 1)], -1).reshape(-1, 2)
        dst = src + rng.uniform(-0.1, 0.1, src.shape) * (w, h)
        s, d = torch.from_numpy(src).float()[None], torch.from_numpy(dst).float()[None]
        ys, xs = np.nonzero(rng.random((h, w)) < rng.uniform(0.05, 0.95))
        some = tps_warp_grid(s, d, h, w, torch.from_numpy(np.stack([xs, ys], -1)).float()[None])
        assert some.shape == (1, 1, len(xs), 2)
        assert torch.equal(some[0, 0], tps_warp_grid(s, d, h, w)[0, ys, xs])


# The dense path (default on CUDA) against the windowed one (default on the CPU): same numbers up to
# float rounding (1e-5 absolute on values in [-1, 1]: the batched spline evaluation may sum in a
# different order), and no host synchronisation.
DENSE_CASES = {
    "mixed": (AugmentConfig(tps_prob=0.4, rtp_prob=0.4, flip_lr=0.3, flip_tb=0.3), 12, 48, 40, 3),
    "all_tps": (AugmentConfig(tps_prob=1.0, rtp_prob=0.5), 5, 64, 64, 4),
    "tps_only": (AugmentConfig(**{**OFF, "tps_prob": 1.0}, pad_mode="zeros"), 3, 33, 57, 5),
}


@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_path_equals_the_windowed_path(case: str) -> None:
    cfg, b, h, w, seed = DENSE_CASES[case]
    params = sample_params(b, cfg, gen(seed), h, w)
    if case == "mixed":  # samples with and without each transform, and one with none at all
        for k in FLAGS:
            assert params[k].any() and not params[k].all(), k
        assert not torch.stack([params[k] for k in FLAGS], 1).any(1).all()
    else:
        assert params["tps"].all()
    x = torch.rand(b, 5, h, w, generator=gen(seed + 100)) * 2 - 1
    windowed = apply_params(x, params, dense=False)
    dense = apply_params(x, params, dense=True)
    assert dense.dtype == x.dtype and dense.shape == x.shape
    # The two paths evaluate the spline in a different float32 order: on some CPUs (an AMD EPYC) the
    # sampling positions then differ by up to ~1e-5 px, times this noise's gradient of up to 2 per px
    # (1.8e-5 seen); a wrong warp moves pixels by far more than the 1e-4 allowed.
    torch.testing.assert_close(dense, windowed, atol=1e-4, rtol=0)
    keep = ~torch.stack([params[k] for k in FLAGS], 1).any(1)
    assert torch.equal(dense[keep], x[keep])  # no transform: bit-identical, not resampled
    assert (dense[~keep] - x[~keep]).abs().amax() > 0.1  # the others really moved


def test_dense_path_with_nothing_drawn_is_exactly_x() -> None:
    params = sample_params(4, AugmentConfig(**OFF), gen(0), 20, 24)
    x = torch.rand(4, 3, 20, 24, generator=gen(1)) * 2 - 1
    assert apply_params(x, params, dense=False) is x
    assert torch.equal(apply_params(x, params, dense=True), x)  # warped, then every sample kept


def test_dense_path_in_batch_chunks_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    params = sample_params(5, AugmentConfig(tps_prob=0.7), gen(6), 32, 32)
    x = torch.rand(5, 2, 32, 32, generator=gen(7)) * 2 - 1
    whole = apply_params(x, params, dense=True)
    monkeypatch.setattr(augment_module, "_TPS_CHUNK", 2 * 32 * 32 * 25)  # two samples per call
    torch.testing.assert_close(apply_params(x, params, dense=True), whole, atol=1e-6, rtol=0)


class HostReads(TorchFunctionMode):
    """Records calls that read a tensor's values on the host or give it a data-dependent shape (each
    a device synchronisation on a GPU), on any tensor but the ``allowed`` host-resident ones."""

    READS = {"nonzero", "tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
             "masked_select", "unique"}

    def __init__(self, allowed: list[torch.Tensor]) -> None:
        super().__init__()
        self.allowed = {id(t) for t in allowed}
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) not in self.allowed:
            index = args[1] if len(args) > 1 and name in ("__getitem__", "__setitem__") else ()
            index = index if isinstance(index, tuple) else (index,)
            boolean = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            if name in self.READS or boolean:  # boolean-mask indexing: a data-dependent shape
                self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cfg", [AugmentConfig(tps_prob=0.5), AugmentConfig(**OFF)], ids=["drawn", "none"])
def test_dense_path_reads_nothing_on_the_host(cfg: AugmentConfig) -> None:
    params = sample_params(6, cfg, gen(2), 24, 28)
    x = torch.rand(6, 3, 24, 28, generator=gen(3))
    with HostReads([params["size"], params["pad_mode"]]) as reads:
        apply_params(x, params, dense=True)
    assert reads.calls == []
    with HostReads([params["size"], params["pad_mode"]]) as reads:  # the probe sees the windowed path's
        apply_params(x, params, dense=False)
    if cfg.tps_prob:
        assert params["tps"].any()
        assert set(reads.calls) == {"cpu", "__bool__", "nonzero", "tolist", "__getitem__", "__setitem__"}
    else:
        assert reads.calls == ["cpu", "__bool__"]  # the draws read back, then the early return


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode "
                    "checks device synchronisation (the CPU probe above checks the same path structurally)")
@pytest.mark.parametrize("pinned", [False, True])
def test_dense_path_on_cuda_does_not_synchronise(pinned: bool) -> None:
    # As in training: draws made on the host (pinned by the DataLoader on a GPU), the maps on the device.
    params = sample_params(6, AugmentConfig(tps_prob=0.5), gen(2), 40, 48)
    if pinned:
        params = {k: v if k in ("size", "pad_mode") else v.pin_memory() for k, v in params.items()}
    x_cpu = torch.rand(6, 3, 40, 48, generator=gen(3)) * 2 - 1
    x = x_cpu.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = apply_params(x, params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.is_cuda
    # Loose: CUDA's kernels round differently from the CPU's; this test is about synchronisation.
    torch.testing.assert_close(y.cpu(), apply_params(x_cpu, params), atol=1e-3, rtol=0)
