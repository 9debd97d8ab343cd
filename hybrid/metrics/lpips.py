"""LPIPS v0.1 (Zhang et al. 2018; richzhang/PerceptualSimilarity 0.1.4) in plain torch.

The backbones are torchvision's ``features`` with torchvision's keys (VGG16, AlexNet,
SqueezeNet 1.1), cut into the official slices; the linear layers are the official v0.1 files
(keys ``lin0.model.1.weight`` ...). Features are computed once per image by :meth:`LPIPS.features`
and reused for any number of pairs: :meth:`LPIPS.distance_from_features` for paired batches,
:meth:`LPIPS.pairwise_from_features` for all pairs of two sets (an exact expansion of the squared
difference into one matrix product per layer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hybrid.models.vgg import VGGFeatures

# Per net: store names of the backbone and of the linear layers, slice bounds into ``features``
# (lpips/pretrained_networks.py) and the channels of each slice's output.
NETS: dict[str, dict] = {
    "vgg": {"backbone": "vgg16", "linear": "lpips_vgg", "bounds": (0, 4, 9, 16, 23, 30),
            "channels": (64, 128, 256, 512, 512)},
    "alex": {"backbone": "alexnet", "linear": "lpips_alex", "bounds": (0, 2, 5, 8, 10, 12),
             "channels": (64, 192, 384, 256, 256)},
    "squeeze": {"backbone": "squeezenet1_1", "linear": "lpips_squeeze", "bounds": (0, 2, 5, 8, 10, 11, 12, 13),
                "channels": (64, 128, 256, 384, 384, 512, 512)},
}


def alexnet_features() -> nn.Sequential:
    """torchvision ``alexnet().features`` (convs at indices 0, 3, 6, 8, 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class Fire(nn.Module):
    """SqueezeNet fire module (keys ``squeeze``, ``expand1x1``, ``expand3x3``)."""

    def __init__(self, c_in: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


def squeezenet1_1_features() -> nn.Sequential:
    """torchvision ``squeezenet1_1().features`` (conv at 0, Fire modules at 3, 4, 6, 7, 9-12)."""
    pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), pool(),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


class NetLin(nn.Module):
    """A 1x1 conv to one channel without bias; ``model.1`` keeps the upstream key (``model.0`` is dropout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LinearLayers(nn.Module):
    """``lin0`` ... ``lin{L-1}``: the layout of the official v0.1 ``<net>.pth`` files."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            self.add_module(f"lin{i}", NetLin(c))

    def weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"lin{i}").model[1].weight for i in range(len(self._modules))]


def to_lpips_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N,H,W,3) or (N,3,H,W) images -> float32 (N,3,H,W) in [-1,1]; float input passes through."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 127.5 - 1
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"LPIPS expects RGB images (N,3,H,W) in [-1,1] or uint8 (N,H,W,3); got {tuple(x.shape)}")
    return x.float().contiguous()


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16, AlexNet or SqueezeNet 1.1 backbone (random weights until loaded)."""

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(NETS)}")
        self.net = net
        spec = NETS[net]
        if net == "vgg":
            features = VGGFeatures("vgg16").features
        else:
            features = alexnet_features() if net == "alex" else squeezenet1_1_features()
        self.features_net = features
        self.slices = [features[a:b] for a, b in zip(spec["bounds"][:-1], spec["bounds"][1:])]
        self.lins = LinearLayers(spec["channels"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def load_backbone(self, state_dict: dict[str, torch.Tensor]) -> None:
        """A torchvision checkpoint (full model or features only); strict on ``features.*``."""
        feats = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
        if not feats:
            raise KeyError(f"no 'features.*' keys in the {NETS[self.net]['backbone']} checkpoint; is it torchvision's?")
        self.features_net.load_state_dict(feats, strict=True)

    def load_linear(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The official v0.1 linear layers (``lin<i>.model.1.weight``), strict."""
        self.lins.load_state_dict(state_dict, strict=True)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised feature maps of images (N,3,H,W) in [-1,1], one per slice."""
        h = (x - self.shift) / self.scale
        out = []
        for s in self.slices:
            h = s(h)
            out.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + 1e-10))
        return out

    def distance_from_features(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS (N,) between paired feature lists of equal batch size (or one side of batch 1)."""
        total = 0.0
        for a, b, w in zip(fa, fb, self.lins.weights()):
            total = total + F.conv2d((a - b) ** 2, w).mean(dim=(1, 2, 3))
        return total

    def squared_norms(self, f: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, L): per layer, the weighted squared norm sum_c w_c f_c^2 averaged over pixels."""
        return torch.stack([torch.linalg.vector_norm(f_l.to(dtype), dim=(2, 3)).square() @ w.to(dtype).flatten()
                            / (f_l.shape[2] * f_l.shape[3]) for f_l, w in zip(f, self.lins.weights())], dim=1)

    def pairwise_from_features(
        self,
        fa: list[torch.Tensor],
        fb: list[torch.Tensor],
        sq_a: torch.Tensor | None = None,
        sq_b: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """LPIPS of every pair, (Na, Nb), in ``dtype``.

        Expands sum_c w_c (a_c - b_c)^2 = |a|_w^2 + |b|_w^2 - 2 <w a, b>, so each layer is one
        matrix product; pass ``sq_a``/``sq_b`` (:meth:`squared_norms`) for sets used repeatedly.
        """
        if sq_a is None:
            sq_a = self.squared_norms(fa, dtype)
        if sq_b is None:
            sq_b = sq_a if fb is fa else self.squared_norms(fb, dtype)
        sq_a, sq_b = sq_a.to(dtype), sq_b.to(dtype)
        cross = 0.0
        for a, b, w in zip(fa, fb, self.lins.weights()):
            aw = (a.to(dtype) * w.to(dtype)).flatten(1)
            cross = cross + aw @ b.to(dtype).flatten(1).T / (a.shape[2] * a.shape[3])
        return sq_a.sum(1)[:, None] + sq_b.sum(1)[None, :] - 2 * cross

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS (N,) between paired images in [-1,1]."""
        return self.distance_from_features(self.features(a), self.features(b))


def load_lpips(net: str = "vgg", backbone: str | Path | None = None, linear: str | Path | None = None) -> LPIPS:
    """LPIPS with pretrained weights: explicit file paths, else the model store's registered files."""
    from hybrid.models.store import locate

    spec = NETS.get(net)
    if spec is None:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(NETS)}")
    model = LPIPS(net)
    model.load_backbone(torch.load(locate(spec["backbone"], backbone), map_location="cpu", weights_only=True))
    model.load_linear(torch.load(locate(spec["linear"], linear), map_location="cpu", weights_only=True))
    return model
