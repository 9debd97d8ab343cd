"""pix2pixHD MultiscaleDiscriminator: ``num_D`` PatchGANs on an image pyramid.

Input = concat(conditions, image). Each scale returns its intermediate features (for the
feature-matching loss) with the patch prediction last; the next scale sees the input
average-pooled by 2 (AvgPool2d(3, 2, 1, count_include_pad=False)).
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid.models.generator import init_weights


class NLayerDiscriminator(nn.Module):
    """Kernel 4, pad 2: conv s2 + LReLU, (n_layers-1) x [conv s2 + IN + LReLU], conv s1 + IN +
    LReLU, conv s1 -> 1 channel; widths double from ``ndf`` up to 512. No sigmoid (LSGAN)."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        blocks = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 2), nn.LeakyReLU(0.2, True))]
        nf = ndf
        for n in range(1, n_layers + 1):
            prev, nf = nf, min(nf * 2, 512)
            stride = 2 if n < n_layers else 1
            blocks.append(nn.Sequential(nn.Conv2d(prev, nf, 4, stride, 2), nn.InstanceNorm2d(nf),
                                        nn.LeakyReLU(0.2, True)))
        blocks.append(nn.Sequential(nn.Conv2d(nf, 1, 4, 1, 2)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``forward(x)`` -> one feature list per scale (full resolution first), prediction last."""

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, num_D: int = 2) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "ndf": ndf, "n_layers": n_layers, "num_D": num_D}
        self.num_D, self.n_layers = num_D, n_layers
        self.scales = nn.ModuleList([NLayerDiscriminator(in_channels, ndf, n_layers) for _ in range(num_D)])
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, scale in enumerate(self.scales):
            if i:
                x = self.downsample(x)
            out.append(scale(x))
        return out
