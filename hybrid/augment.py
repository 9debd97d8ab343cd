"""Batched geometric augmentation: local thin-plate spline, resize-translate-pad and flips.

Each sample of a (B, C, H, W) batch gets ONE random transform, applied identically to all C
channels (image, edge and depth stacked as channels move together), as one backward sampling grid
per sample and a single ``F.grid_sample`` call for the batch. All randomness comes from the
caller's ``torch.Generator``; ``sample_params`` / ``apply_params`` let a caller apply the same draw
to several tensors. ``augment(x, cfg, g) == apply_params(x, sample_params(B, cfg, g, H, W))``.

Points are pixel indices ``(x, y)`` = (column, row), pixel centres at integers. Forward order is
local TPS -> resize-translate-pad -> flips; the grid inverts them, so content at a TPS source point
ends up at its destination.

Local TPS (AnomalyFactory / AnomalyHybrid, after DeepSIM): a random window holds a 5x5 lattice;
its 16 border points are fixed anchors and the inner 3x3 control points are shifted by independent
Uniform(-s, s) in x and y. The Bookstein spline (U(r) = r^2 log r plus affine terms) is fitted from
destination to source. Its displacement is faded to zero over the outer eighth of the window
(smoothstep), so the warp is continuous and exactly the identity outside the window, while every
control point (at most 1/8 of the window from its lattice spot) still lands exactly on its target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybrid.config import check_choices, check_keys, choice

PAD_MODES = ("border", "zeros", "reflection")
_FADE = 0.125  # width of the TPS fade-out ring, fraction of the window side
_TPS_CHUNK = 2**26  # dense path: most spline kernel entries (B * H * W * 25 float32) per batched call


@dataclass
class AugmentConfig:
    """Augmentation settings; probabilities are per sample."""

    enabled: bool = True  # master switch; False makes augment() the exact identity
    tps_prob: float = 0.99  # probability of a local TPS warp (AnomalyHybrid supplement: 0.99)
    tps_window: tuple[float, float] = (0.3, 0.7)  # TPS window side range, fraction of image side
    tps_shift: float = 0.1  # max control-point shift, fraction of the window side (<= 0.125)
    rtp_prob: float = 0.5  # probability of resize-translate-pad
    rtp_scale: tuple[float, float] = (0.8, 1.2)  # zoom range about the image centre
    rtp_translate: float = 0.1  # max translation, fraction of each image side
    flip_lr: float = 0.5  # probability of a left-right flip
    flip_tb: float = 0.5  # probability of a top-bottom flip
    pad_mode: str = choice(PAD_MODES, "border")  # fill outside the input: border (replicate), zeros, reflection

    def __post_init__(self) -> None:
        self.tps_window = _pair("tps_window", self.tps_window)
        self.rtp_scale = _pair("rtp_scale", self.rtp_scale)
        for name in ("tps_prob", "rtp_prob", "flip_lr", "flip_tb"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], "
                                 f"got {getattr(self, name)}")
        if not 0.0 < self.tps_window[0] <= self.tps_window[1] <= 1.0:
            raise ValueError(f"augment.tps_window must be (min, max) with 0 < min <= max <= 1, "
                             f"got {self.tps_window}")
        if not 0.0 <= self.tps_shift <= _FADE:
            raise ValueError(f"augment.tps_shift must be in [0, {_FADE}] (fraction of the window "
                             f"side), got {self.tps_shift}")
        if not 0.0 < self.rtp_scale[0] <= self.rtp_scale[1]:
            raise ValueError(f"augment.rtp_scale must be (min, max) with 0 < min <= max, "
                             f"got {self.rtp_scale}")
        if self.rtp_translate < 0:
            raise ValueError(f"augment.rtp_translate must be >= 0, got {self.rtp_translate}")
        check_choices(self, "augment")

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Build from a config section; unknown keys raise ValueError."""
        return cls(**check_keys(d, cls, "augment"))


def _pair(name: str, value: tuple[float, float] | list[float]) -> tuple[float, float]:
    """A config range as a float pair (YAML gives lists)."""
    if len(value) != 2:
        raise ValueError(f"augment.{name} must be a (min, max) pair, got {value!r}")
    return float(value[0]), float(value[1])


def _lattice() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5x5 lattice on [0, 1]^2 as (25, 2) (x, y) points, and the mask of its inner 3x3."""
    t = torch.linspace(0.0, 1.0, 5)
    ys, xs = torch.meshgrid(t, t, indexing="ij")
    pts = torch.stack([xs, ys], -1).reshape(-1, 2)
    inner = ((pts > 0) & (pts < 1)).all(-1)
    return pts, inner


def sample_params(batch: int, cfg: AugmentConfig, generator: torch.Generator,
                  height: int, width: int) -> dict[str, torch.Tensor]:
    """Draw one transform per sample (on the generator's device; always the same number of draws).

    Keys: ``tps``/``rtp``/``flip_lr``/``flip_tb`` (B,) bool; ``tps_src``/``tps_dst`` (B, 25, 2)
    lattice points in pixels; ``tps_box`` (B, 4) window x0, y0, x1, y1; ``rtp_scale`` (B,);
    ``rtp_shift`` (B, 2) pixels; ``size`` (2,) = (H, W); ``pad_mode`` () index into PAD_MODES.
    """
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device)

    wh = torch.tensor([float(width), float(height)], device=generator.device)
    coin = rand(batch, 4)
    lo, hi = cfg.tps_window
    side = (lo + (hi - lo) * rand(batch, 1)) * wh  # (B, 2) window width, height
    x0y0 = -0.5 + rand(batch, 2) * (wh - side)  # image spans [-0.5, size - 0.5]
    lattice, inner = _lattice()
    lattice, inner = lattice.to(wh.device), inner.to(wh.device)
    src = x0y0[:, None] + lattice * side[:, None]
    shift = (2 * rand(batch, int(inner.sum()), 2) - 1) * cfg.tps_shift * side[:, None]
    dst = src.clone()
    dst[:, inner] += shift
    lo, hi = cfg.rtp_scale
    scale = lo + (hi - lo) * rand(batch)
    translate = (2 * rand(batch, 2) - 1) * cfg.rtp_translate * wh
    on = cfg.enabled
    return {
        "tps": on & (coin[:, 0] < cfg.tps_prob),
        "rtp": on & (coin[:, 1] < cfg.rtp_prob),
        "flip_lr": on & (coin[:, 2] < cfg.flip_lr),
        "flip_tb": on & (coin[:, 3] < cfg.flip_tb),
        "tps_src": src,
        "tps_dst": dst,
        "tps_box": torch.cat([x0y0, x0y0 + side], 1),
        "rtp_scale": scale,
        "rtp_shift": translate,
        "size": torch.tensor([height, width]),
        "pad_mode": torch.tensor(PAD_MODES.index(cfg.pad_mode)),
    }


def apply_params(x: torch.Tensor, params: dict[str, torch.Tensor], dense: bool | None = None) -> torch.Tensor:
    """Warp every channel of each sample of ``x`` (B, C, H, W) by its drawn transform.

    Samples that drew no transform come back bit-identical. ``dense`` (default ``x.is_cuda``) picks
    the path. Windowed (CPU): each TPS sample's spline is evaluated inside its window only (~3x
    faster on a CPU, measured) and ``x`` itself is returned if no sample drew anything, which
    reads the draws on the host. Dense (GPU): every sample's spline at every pixel in batched
    calls, masked by the draws, with no host synchronisation (no ``nonzero``/``item``/``cpu``, no
    data-dependent shapes; params on the host are copied without blocking); equal to the windowed
    path up to float rounding.
    ``params["size"]`` and ``params["pad_mode"]`` must stay on the host.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augment expects a float (B, C, H, W) tensor, got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if tuple(params["size"].tolist()) != (h, w) or params["tps"].shape[0] != b:
        raise ValueError(f"params were drawn for batch {params['tps'].shape[0]} at size "
                         f"{tuple(params['size'].tolist())}, but x is {tuple(x.shape)}; draw them "
                         f"with sample_params(batch={b}, height={h}, width={w})")
    dense = x.is_cuda if dense is None else dense
    keys = ("tps", "rtp", "flip_lr", "flip_tb")
    per_sample = {k: v for k, v in params.items() if k not in ("size", "pad_mode")}
    if dense:
        p = {k: v.to(x.device, non_blocking=True) for k, v in per_sample.items()}
        flags = torch.stack([p[k] for k in keys], 1)
    else:
        flags = torch.stack([params[k] for k in keys], 1).cpu()
        if not flags.any():
            return x
        p = {k: v.to(x.device) for k, v in per_sample.items()}
    # Undo the flips (applied last), then resize-translate-pad: per axis p = a * q + c, with
    # q' = sign * q + flip * last and p = centre + (q' - shift - centre) / scale; then the TPS.
    last = _xy(w - 1.0, h - 1.0, x.device)
    flip = torch.stack([p["flip_lr"], p["flip_tb"]], 1).float()
    scale = torch.where(p["rtp"], p["rtp_scale"], 1.0)[:, None]
    shift = torch.where(p["rtp"][:, None], p["rtp_shift"], 0.0)
    a = (1 - 2 * flip) / scale
    c = (flip * last - shift - last / 2) / scale + last / 2
    pts = torch.addcmul(c[:, None], _pixel_grid(h, w, x.device), a[:, None])  # (B, H*W, 2)
    if dense:  # fit where the params were drawn (the host in training), then copy without blocking
        coef = _tps_fit(params["tps_dst"], params["tps_src"]).to(x.device, non_blocking=True)
        pts = pts + _dense_tps_displacement(p, coef, pts)
    elif flags[:, 0].any():
        pts = pts + _local_tps_displacement(p, pts)
    grid = (2 * pts + 1) / _xy(w, h, x.device) - 1  # align_corners=False
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = F.grid_sample(x.to(dtype), grid.reshape(b, h, w, 2).to(dtype), mode="bilinear",
                        padding_mode=PAD_MODES[int(params["pad_mode"])], align_corners=False)
    keep = ~flags.any(1).to(x.device)[:, None, None, None]
    return torch.where(keep, x, out.to(x.dtype))


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random geometric transform per sample, shared by all channels of that sample."""
    b, _, h, w = x.shape
    return apply_params(x, sample_params(b, cfg, generator, h, w))


def _local_tps_displacement(p: dict[str, torch.Tensor], pts: torch.Tensor) -> torch.Tensor:
    """Backward displacement (B, N, 2) of each sample's windowed TPS at the points ``pts``."""
    fade = _tps_fade(p["tps_box"], pts)
    coef = _tps_fit(p["tps_dst"], p["tps_src"])
    disp = torch.zeros_like(pts)
    for b in p["tps"].nonzero().flatten().tolist():  # evaluate inside the window only: ~3x faster than dense
        m = fade[b] > 0
        q = pts[b, m][None]
        src = _tps_eval(coef[b:b + 1], p["tps_dst"][b:b + 1], q)
        disp[b, m] = fade[b, m, None] * (src - q)[0]
    return disp


def _dense_tps_displacement(p: dict[str, torch.Tensor], coef: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``_local_tps_displacement`` without host synchronisation: every sample's spline at every point.

    The spline is evaluated over batch chunks of at most ``_TPS_CHUNK`` kernel entries (whole
    samples; the chunks follow from the shapes alone), faded, and zeroed for samples without a TPS.
    """
    fade = _tps_fade(p["tps_box"], pts)
    ctrl = p["tps_dst"]
    step = max(1, _TPS_CHUNK // (pts.shape[1] * ctrl.shape[1]))
    src = torch.cat([_tps_eval(coef[i:i + step], ctrl[i:i + step], pts[i:i + step])
                     for i in range(0, pts.shape[0], step)])
    return torch.where(p["tps"][:, None, None], fade[..., None] * (src - pts), 0.0)


def _tps_fade(box: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """(B, N) smoothstep fade-out of each sample's TPS at the points, its window ``box`` (B, 4)."""
    u = (pts - box[:, None, :2]) / (box[:, None, 2:] - box[:, None, :2])  # window coordinates
    t = ((0.5 - (u - 0.5).abs()) / _FADE).clamp(0, 1)  # 0 on/outside the border, 1 inside the ring
    return (t * t * (3 - 2 * t)).prod(-1)


def tps_warp_grid(src_pts: torch.Tensor, dst_pts: torch.Tensor,
                  height: int, width: int, points: torch.Tensor | None = None) -> torch.Tensor:
    """``F.grid_sample`` grid (B, H, W, 2), align_corners=False, of the TPS moving src to dst.

    ``src_pts``/``dst_pts`` are (B, K, 2) pixel (x, y) points, K >= 3 not all collinear. The spline
    is global (no window); mask the result yourself for a local warp. ``points`` (B, N, 2): pixel
    (x, y) of an image of ``height`` x ``width`` where alone the grid is wanted, given as (B, 1, N, 2):
    each point gets the very values it has in the whole grid (see :func:`_tps_eval`).
    """
    pts = _pixel_grid(height, width, src_pts.device).expand(src_pts.shape[0], -1, -1) if points is None else points
    src = _tps_eval(_tps_fit(dst_pts, src_pts), dst_pts, pts)
    grid = (2 * src + 1) / torch.tensor([width, height], device=src.device) - 1
    return grid.reshape(-1, height, width, 2) if points is None else grid[:, None]


def _xy(x: float, y: float, device: torch.device) -> torch.Tensor:
    """The pair (x, y) as a (2,) float tensor made on ``device`` (no blocking host-to-device copy).

    Exact for the integer sizes it is used with."""
    return torch.arange(2.0, device=device) * (y - x) + x


def _pixel_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """All pixel centres as (1, H*W, 2) float (x, y), row-major."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                            indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, -1, 2).float()


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """U(|a_i - b_j|) = r^2 log r = d2 log(d2) / 2 as (B, N, K), built per axis to save memory.

    Computed as (B, K, N) and returned transposed: each operation then runs along the N points,
    not along the K (25) control points, which vectorises (a third faster on a CPU; the same values)."""
    at = a.transpose(1, 2).contiguous()  # (B, 2, N)
    d2 = (at[:, None, 0] - b[..., 0, None]).square_()
    d2 += (at[:, None, 1] - b[..., 1, None]).square_()
    return d2.clamp_min(1e-20).log_().mul_(d2).mul_(0.5).transpose(1, 2)


def _tps_fit(ctrl: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficients (B, K + 3, 2) of the spline f with f(ctrl_k) = target_k, solved in float64.

    The spline is invariant to uniform scaling, so points are fitted in units of the largest
    coordinate span; ``_tps_eval`` applies the same scaling.
    """
    c = ctrl.double() / _unit(ctrl)
    b, k, _ = c.shape
    ones = torch.ones(b, k, 1, dtype=c.dtype, device=c.device)
    poly = torch.cat([ones, c], -1)
    lhs = torch.zeros(b, k + 3, k + 3, dtype=c.dtype, device=c.device)
    lhs[:, :k, :k] = _tps_kernel(c, c)
    lhs[:, :k, k:] = poly
    lhs[:, k:, :k] = poly.transpose(1, 2)
    rhs = torch.cat([target.double(), torch.zeros(b, 3, 2, dtype=c.dtype, device=c.device)], 1)
    return torch.linalg.solve_ex(lhs, rhs)[0]  # solve() checks for errors: a host sync on a GPU


def _tps_eval(coef: torch.Tensor, ctrl: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Evaluate the fitted spline at ``pts`` (B, N, 2) in float32. Each point's value depends on that
    point alone, so a subset of points gets the very values of the whole set: the coefficients are
    made row-major (the solver's are column-major, and MKL's product with those rounds a row
    by its position among the points)."""
    unit = _unit(ctrl)
    c, q = (ctrl / unit).float(), (pts / unit).float()
    coef = coef.float().contiguous()
    k = c.shape[1]
    affine = coef[:, k][:, None] + q @ coef[:, k + 1:]
    return torch.baddbmm(affine, _tps_kernel(q, c), coef[:, :k])


def _unit(ctrl: torch.Tensor) -> torch.Tensor:
    """A per-sample length scale (B, 1, 1) for conditioning: the control points' largest span."""
    span = (ctrl.amax(1) - ctrl.amin(1)).amax(-1)
    return span.clamp_min(1.0)[:, None, None]
