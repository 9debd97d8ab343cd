"""VGG ``features`` in plain torch with torchvision's state_dict keys (``features.<i>.weight``).

Used by the perceptual loss (VGG19, pix2pixHD slices) and by LPIPS (VGG16). Loads
torchvision's vgg16-397923af.pth / vgg19-dcbb9e9d.pth unchanged (the classifier keys are ignored).
"""

from __future__ import annotations

import torch
from torch import nn

# torchvision cfgs "D" (vgg16) and "E" (vgg19): ints are 3x3 conv widths, "M" is a 2x2 max-pool.
CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(arch: str) -> nn.Sequential:
    """The ``features`` Sequential of torchvision's VGG (no batch norm), same module indices."""
    if arch not in CFGS:
        raise ValueError(f"unknown VGG architecture {arch!r}; choose one of {sorted(CFGS)}")
    layers: list[nn.Module] = []
    c_in = 3
    for v in CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers)


class VGGFeatures(nn.Module):
    """``features`` wrapped so that ``state_dict()`` keys read ``features.<i>.weight``."""

    def __init__(self, arch: str = "vgg19") -> None:
        super().__init__()
        self.arch = arch
        self.features = make_features(arch)

    def load_upstream(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a torchvision checkpoint (full model or features only); strict on ``features``."""
        feats = {k: v for k, v in state_dict.items() if k.startswith("features.")}
        if not feats:
            raise KeyError(f"no 'features.*' keys in the {self.arch} checkpoint; is it a torchvision VGG?")
        self.load_state_dict(feats, strict=True)

    def slices(self, bounds: list[int]) -> list[nn.Sequential]:
        """Consecutive slices ``features[b_i:b_{i+1}]`` (pix2pixHD: [0, 2, 7, 12, 21, 30])."""
        return [self.features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
