"""PiDiNet edge detector (Su et al., ICCV 2021) in plain torch, loading upstream checkpoints unchanged.

Config ``carv4`` with CDCM and CSAM on (upstream ``--sa --dil``). State_dict keys equal those of
hellozhuo/pidinet after stripping the ``module.`` prefix. The model maps an ImageNet-normalised RGB
batch (B,3,H,W) to ``[e1, e2, e3, e4, fused]``, each (B,1,H,W) after the sigmoid, at the input size.

Pixel difference convolutions (PDC) act on the flattened 3x3 kernel w[0..8]:
  cd (central):  conv(x, w) - conv1x1(x, sum(w))
  ad (angular):  conv(x, w - w[[3,0,1,6,4,2,7,8,5]])
  rd (radial):   a 5x5 kernel, outer ring +w[1..8], inner ring -w[1..8], padding 2
  cv:            plain convolution
``convert_pidinet`` bakes them into vanilla convs (3x3, or 5x5 for rd) with the same outputs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CARV4: tuple[str, ...] = ("cd", "ad", "rd", "cv") * 4
# variant -> (inplane, CDCM width); upstream pidinet / pidinet_small / pidinet_tiny with --dil
VARIANTS: dict[str, tuple[int, int]] = {"pidinet": (60, 24), "pidinet_small": (30, 12), "pidinet_tiny": (20, 8)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_AD_PERM = [3, 0, 1, 6, 4, 2, 7, 8, 5]
_RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
_RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


def pdc_kernel(op: str, weight: torch.Tensor) -> torch.Tensor:
    """The vanilla-conv kernel equal to PDC ``op`` with 3x3 ``weight`` (5x5 for rd, padding 2)."""
    o, i = weight.shape[:2]
    w = weight.reshape(o, i, 9)
    if op == "cv":
        return weight.clone()
    if op == "cd":
        w = w.clone()
        w[:, :, 4] = w[:, :, 4] - w.sum(dim=2)
        return w.reshape(weight.shape)
    if op == "ad":
        return (w - w[:, :, _AD_PERM]).reshape(weight.shape)
    if op == "rd":
        k = weight.new_zeros(o, i, 25)
        k[:, :, _RD_OUTER] = w[:, :, 1:]
        k[:, :, _RD_INNER] = -w[:, :, 1:]
        return k.reshape(o, i, 5, 5)
    raise ValueError(f"unknown pixel difference op {op!r}; expected one of cv, cd, ad, rd")


class PDCConv2d(nn.Module):
    """3x3 pixel difference convolution (stride 1, padding 1, no bias), upstream ``ops.Conv2d``."""

    def __init__(self, op: str, c_in: int, c_out: int, groups: int = 1) -> None:
        super().__init__()
        if op not in ("cv", "cd", "ad", "rd"):
            raise ValueError(f"unknown pixel difference op {op!r}; expected one of cv, cd, ad, rd")
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.empty(c_out, c_in // groups, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, g = self.weight, self.groups
        if self.op == "cd":  # the upstream two-conv form, so the converted model is a real check
            return F.conv2d(x, w, padding=1, groups=g) - F.conv2d(x, w.sum(dim=(2, 3), keepdim=True), groups=g)
        return F.conv2d(x, pdc_kernel(self.op, w), padding=2 if self.op == "rd" else 1, groups=g)


def _conv(op: str, c_in: int, c_out: int, groups: int, converted: bool) -> nn.Module:
    if not converted:
        return PDCConv2d(op, c_in, c_out, groups)
    k = 5 if op == "rd" else 3
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False)


class PDCBlock(nn.Module):
    """[max-pool 2x2] -> depthwise PDC -> ReLU -> 1x1 conv, plus the (1x1-projected) input."""

    def __init__(self, op: str, c_in: int, c_out: int, stride: int = 1, converted: bool = False) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.conv1 = _conv(op, c_in, c_in, c_in, converted)
        self.conv2 = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = self.pool(x)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 conv, sum of 3x3 convs at dilations 5/7/9/11."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=1)
        for j, d in enumerate((5, 7, 9, 11), start=1):
            setattr(self, f"conv2_{j}", nn.Conv2d(c_out, c_out, 3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention: x * sigmoid(conv3x3(conv1x1(relu(x))))."""

    def __init__(self, channels: int, mid: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, mid, kernel_size=1)
        self.conv2 = nn.Conv2d(mid, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    """1x1 conv to a single-channel edge logit map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet with CDCM + CSAM side branches; ``converted=True`` builds the vanilla-conv form."""

    def __init__(self, inplane: int = 60, dil: int = 24, pdcs: tuple[str, ...] = CARV4,
                 converted: bool = False) -> None:
        super().__init__()
        if len(pdcs) != 16:
            raise ValueError(f"PiDiNet needs 16 pixel difference ops (one per layer), got {len(pdcs)}")
        self.inplane, self.dil, self.pdcs, self.converted = inplane, dil, tuple(pdcs), converted
        c = inplane
        self.init_block = _conv(pdcs[0], 3, c, 1, converted)
        widths = [c, 2 * c, 4 * c, 4 * c]
        depths = [3, 4, 4, 4]
        layer, c_prev = 1, c
        for s, (width, depth) in enumerate(zip(widths, depths), start=1):
            for b in range(1, depth + 1):
                stride = 2 if (b == 1 and s > 1) else 1
                setattr(self, f"block{s}_{b}", PDCBlock(pdcs[layer], c_prev, width, stride, converted))
                layer, c_prev = layer + 1, width
        self.stages = [[f"block{s}_{b}" for b in range(1, d + 1)] for s, d in enumerate(depths, start=1)]
        self.dilations = nn.ModuleList(CDCM(w, dil) for w in widths)
        self.attentions = nn.ModuleList(CSAM(dil) for _ in widths)
        self.conv_reduces = nn.ModuleList(MapReduce(dil) for _ in widths)
        self.classifier = nn.Conv2d(4, 1, kernel_size=1)
        nn.init.constant_(self.classifier.weight, 0.25)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) normalised RGB -> [e1, e2, e3, e4, fused], each (B,1,H,W) in (0,1)."""
        size = x.shape[-2:]
        x = self.init_block(x)
        logits = []
        for i, names in enumerate(self.stages):
            for name in names:
                x = getattr(self, name)(x)
            e = self.conv_reduces[i](self.attentions[i](self.dilations[i](x)))
            logits.append(F.interpolate(e, size, mode="bilinear", align_corners=False))
        logits.append(self.classifier(torch.cat(logits, dim=1)))
        return [torch.sigmoid(e) for e in logits]


def build_pidinet(variant: str = "pidinet", converted: bool = False) -> PiDiNet:
    """A randomly initialised PiDiNet of ``variant`` (pidinet, pidinet_small, pidinet_tiny)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown PiDiNet variant {variant!r}; choose one of {sorted(VARIANTS)}")
    inplane, dil = VARIANTS[variant]
    return PiDiNet(inplane, dil, CARV4, converted)


def convert_pidinet(model: PiDiNet) -> PiDiNet:
    """The vanilla-conv form of ``model``: every PDC kernel baked into a plain (depthwise) conv."""
    if model.converted:
        return model
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, PDCConv2d):
            state[f"{name}.weight"] = pdc_kernel(module.op, module.weight.detach())
    out = PiDiNet(model.inplane, model.dil, model.pdcs, converted=True)
    out.load_state_dict(state, strict=True)
    p = next(model.parameters())
    return out.to(device=p.device, dtype=p.dtype).train(model.training)


def upstream_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights of an upstream checkpoint ({'state_dict': ...} or bare), ``module.`` stripped."""
    sd = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_pidinet(checkpoint_path: str | Path, variant: str = "pidinet", converted: bool = False) -> PiDiNet:
    """Load an upstream PiDiNet checkpoint (e.g. table5_pidinet.pth) into ``variant``, in eval mode.

    ``converted=True`` returns the vanilla-conv form (same outputs, faster).
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"PiDiNet checkpoint {path} does not exist; see `hybrid models list`")
    model = build_pidinet(variant)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f"cannot read PiDiNet checkpoint {path} (corrupt or not a torch file?): {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"PiDiNet checkpoint {path} holds a {type(ckpt).__name__}, expected a state_dict")
    sd = upstream_state_dict(ckpt)
    init = sd.get("init_block.weight")
    if init is not None and init.shape[0] != model.inplane:
        guess = [v for v, (c, _) in VARIANTS.items() if c == init.shape[0]]
        raise ValueError(f"PiDiNet checkpoint {path} has {init.shape[0]} base channels, variant {variant!r} "
                         f"expects {model.inplane}; use variant={guess[0] if guess else '?'!r}")
    missing = sorted(set(model.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"PiDiNet checkpoint {path} does not match the {variant} (carv4, sa, dil) layout: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}; is it an original (not "
                         f"converted) hellozhuo/pidinet checkpoint trained with --sa --dil?")
    model.load_state_dict(sd, strict=True)
    model.eval()
    return convert_pidinet(model) if converted else model


def normalize_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 or 0..255 float RGB (B,3,H,W) -> the ImageNet-normalised float input PiDiNet expects."""
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
