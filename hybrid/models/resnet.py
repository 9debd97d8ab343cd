"""ResNet-18/34/50 and Wide-ResNet-50-2 in plain torch with torchvision's state_dict keys.

Module names match torchvision (``conv1``, ``bn1``, ``layer1``..``layer4`` of BasicBlock/Bottleneck
with ``downsample.0/1``, ``fc``; stride on the 3x3 conv of Bottleneck, i.e. "ResNet v1.5"), so
resnet18-f37072fd.pth, resnet34-b627a593.pth, resnet50-0676ba61.pth and
wide_resnet50_2-95faca4d.pth load unchanged with ``strict=True``. Used by PatchCore (intermediate
maps via :meth:`ResNet.features`) and the defect classifier (:meth:`ResNet.replace_fc`).

Weights (``load_resnet``): ``real`` loads the registered file through the model store and fails
with its message when missing; ``random`` is a seeded torchvision-style init; ``auto`` takes the
real file when the store finds it and a random stand-in, with a warning, when it does not. The
returned model says which in ``random_stand_in`` and ``weights_label``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first) and an identity or 1x1-conv shortcut."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64) -> None:
        super().__init__()
        if base_width != 64:
            raise ValueError("BasicBlock only supports base_width=64")
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels); ``base_width`` 128 makes Wide-ResNet-50-2."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 base_width: int = 64) -> None:
        super().__init__()
        width = planes * base_width // 64
        self.conv1 = _conv(c_in, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv(width, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


# arch -> (block, blocks per stage, base width); the store name equals the arch name.
ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128),
}


class ResNet(nn.Module):
    """torchvision's ResNet; ``forward`` gives logits, ``features`` the intermediate maps.

    Inputs are normalised RGB (N,3,H,W) (see :func:`normalize`), as for torchvision.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 1000) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown ResNet architecture {arch!r}; choose one of {sorted(ARCHS)}")
        block, counts, base_width = ARCHS[arch]
        self.arch = arch
        self.random_stand_in = True  # until real weights are loaded (load_resnet sets it)
        self.weights_label = "untrained"
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c_in = 64
        for i, (n, planes) in enumerate(zip(counts, (64, 128, 256, 512)), start=1):
            stride = 1 if i == 1 else 2
            down = None
            if stride != 1 or c_in != planes * block.expansion:
                down = nn.Sequential(_conv(c_in, planes * block.expansion, 1, stride),
                                     nn.BatchNorm2d(planes * block.expansion))
            blocks = [block(c_in, planes, stride, down, base_width)]
            c_in = planes * block.expansion
            blocks += [block(c_in, planes, base_width=base_width) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

    @property
    def channels(self) -> dict[str, int]:
        """Output channels of layer1..layer4 (64/128/256/512 for ResNet-18/34, x4 for the others)."""
        return {name: planes * ARCHS[self.arch][0].expansion for name, planes in zip(LAYERS, (64, 128, 256, 512))}

    def features(self, x: torch.Tensor, layers: tuple[str, ...] = ("layer2", "layer3")) -> dict[str, torch.Tensor]:
        """The maps of ``layers`` (any of layer1..layer4), running the net only as far as needed."""
        unknown = [n for n in layers if n not in LAYERS]
        if unknown:
            raise ValueError(f"unknown ResNet layers {unknown}; choose from {LAYERS}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: dict[str, torch.Tensor] = {}
        for name in LAYERS[:max(LAYERS.index(n) for n in layers) + 1]:
            x = getattr(self, name)(x)
            if name in layers:
                out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x, ("layer4",))["layer4"]
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def replace_fc(self, num_classes: int, seed: int | None = None) -> nn.Linear:
        """A fresh ``fc`` with ``num_classes`` outputs (fine-tuning); seeded when ``seed`` is given."""
        fc = nn.Linear(self.fc.in_features, num_classes)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            bound = 1 / math.sqrt(fc.in_features)  # nn.Linear's default uniform init, seeded
            with torch.no_grad():
                fc.weight.copy_(torch.rand(fc.weight.shape, generator=g) * 2 * bound - bound)
                fc.bias.copy_(torch.rand(fc.bias.shape, generator=g) * 2 * bound - bound)
        self.fc = fc.to(self.fc.weight.device)
        return self.fc


def resnet(arch: str = "resnet18", num_classes: int = 1000) -> ResNet:
    """An untrained ``arch`` (torchvision's default init, unseeded)."""
    return ResNet(arch, num_classes)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """RGB (N,3,H,W) in 0..1 (float) or 0..255 (uint8) -> ImageNet-normalised float."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def seeded_init(model: ResNet, seed: int = 0) -> ResNet:
    """torchvision's init, seeded: He-normal (fan_out) convs, BatchNorm 1/0, uniform ``fc``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    model.replace_fc(model.fc.out_features, seed=seed + 1)
    model.random_stand_in, model.weights_label = True, f"random stand-in (seed {seed})"
    return model


def load_resnet(arch: str = "resnet18", weights: str = "auto", path: str | Path | None = None,
                seed: int = 0) -> ResNet:
    """``arch`` in eval mode with ImageNet weights (``real``), a seeded random init (``random``), or
    the real file when the model store finds it and else the random stand-in with a warning (``auto``).

    ``path``: an explicit checkpoint (else the store's lookup of the registered name ``arch``).
    ``real`` raises the store's MissingWeightsError naming the file when it is missing.
    """
    from hybrid.models.store import resolve_mode

    p = resolve_mode(arch, weights, path)
    model = ResNet(arch)
    if p is None:
        return seeded_init(model, seed).eval()
    try:
        model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{p} is not torchvision's {arch} checkpoint: {e}") from e
    model.random_stand_in, model.weights_label = False, f"real: {Path(p).name}"
    return model.eval()
