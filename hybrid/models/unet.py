"""Segmentation networks for the downstream localisation benchmark (train on generated anomalies).

Two designs, both plain torch, with parameter names as upstream so their state dicts load as is:

- :class:`UNet`: the classic U-Net (Ronneberger et al., MICCAI 2015) as implemented in
  milesial/Pytorch-UNet (``unet/unet_parts.py``, ``unet/unet_model.py``): DoubleConv (3x3 conv
  without bias, BN, ReLU, twice), four downs (2x2 max-pool + DoubleConv) with widths
  w, 2w, 4w, 8w, 16w (w = 64 upstream), four ups (2x2 transposed conv, or bilinear upsampling with
  the deepest width halved, ``factor`` 2) that pad to the skip's size and concatenate it, and a
  1x1 OutConv. Any input size works (the ups pad); ``out_channels=1`` gives one anomaly logit.
- :class:`DiscriminativeSubNetwork`: DRAEM's segmentation network (Zavrtanik et al., ICCV 2021,
  VitjanZ/DRAEM ``model_unet.py``). This is what AnomalyDiffusion's downstream localisation
  (sjtuplayer/anomalydiffusion ``train-localization.py``, ``unet_utils/model_unet.py``) trains:
  ``out_channels=2``, softmax, focal loss, weights from :func:`draem_weights_init`; its image
  score is the max of the 21x21 mean-filtered anomaly channel
  (:func:`hybrid.metrics.localization.image_score` with ``box=21, sigma=0``). Six encoder blocks
  (w, 2w, 4w, 8w, 8w, 8w) with five max-pools, so H and W must be multiples of 32.

Both save as ``config.json`` (constructor arguments + ``arch``) and ``model.safetensors``;
:meth:`Segmenter.from_pretrained` on the base class loads either design.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


class Segmenter(nn.Module):
    """Base of the segmentation networks: ``config``, :meth:`anomaly_map` and pretrained I/O."""

    arch: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Segmenter]]] = {}
    config: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "arch" in cls.__dict__:   # a design of its own, not a subclass that only tweaks one
            Segmenter.registry[cls.arch] = cls

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B,H,W) anomaly probability: sigmoid of one logit channel, else softmax channel 1."""
        out = self(x)
        return torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else out.softmax(dim=1)[:, 1]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"arch": self.arch, **self.config}, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, d / "model.safetensors")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Segmenter:
        """The model saved in ``directory`` in eval mode; ``Segmenter.from_pretrained`` loads any design."""
        d = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} is missing; not a Segmenter.save_pretrained directory")
        config = json.loads((d / "config.json").read_text())
        arch = config.pop("arch", None)
        if arch not in Segmenter.registry:
            raise ValueError(f"{d / 'config.json'} has arch {arch!r}; known: {sorted(Segmenter.registry)}")
        klass = Segmenter.registry[arch]
        if not issubclass(klass, cls):
            raise ValueError(f"{d} holds a {klass.__name__} ({arch!r}), not a {cls.__name__}")
        model = klass(**config)
        model.load_state_dict(load_file(d / "model.safetensors"))
        return model.to(device).eval()


# ------------------------------------------------------------------------------------------- U-Net


class DoubleConv(nn.Module):
    """(3x3 conv without bias => BN => ReLU) x 2 (milesial ``DoubleConv``)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None) -> None:
        super().__init__()
        mid = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Upsample x2 (bilinear, or 2x2 transposed conv halving the channels), pad to the skip, concat
    [skip, up], DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool) -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet(Segmenter):
    """milesial/Pytorch-UNet's U-Net (see module doc); returns (B, out_channels, H, W) logits."""

    arch = "unet"

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_width: int = 64,
                 bilinear: bool = False) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base_width": base_width,
                       "bilinear": bilinear}
        w, factor = base_width, 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, w)
        self.down1, self.down2, self.down3 = Down(w, 2 * w), Down(2 * w, 4 * w), Down(4 * w, 8 * w)
        self.down4 = Down(8 * w, 16 * w // factor)
        self.up1 = Up(16 * w, 8 * w // factor, bilinear)
        self.up2 = Up(8 * w, 4 * w // factor, bilinear)
        self.up3 = Up(4 * w, 2 * w // factor, bilinear)
        self.up4 = Up(2 * w, w, bilinear)
        self.outc = OutConv(w, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.up1(self.down4(x4), x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        return self.outc(self.up4(x, x1))


# ------------------------------------------------------------------------------- DRAEM / AnomalyDiffusion


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """DRAEM encoder/decoder block: (3x3 conv => BN => ReLU) x 2, convs with bias."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """DRAEM up step: bilinear x2 (align_corners), 3x3 conv => BN => ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class EncoderDiscriminative(nn.Module):
    def __init__(self, in_channels: int, base_width: int) -> None:
        super().__init__()
        w = [base_width * m for m in (1, 2, 4, 8, 8, 8)]
        for i, (c_in, c_out) in enumerate(zip([in_channels, *w[:-1]], w), start=1):
            self.add_module(f"block{i}", _block(c_in, c_out))
            if i < 6:
                self.add_module(f"mp{i}", nn.Sequential(nn.MaxPool2d(2)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.block1(x)]
        for i in range(2, 7):
            feats.append(getattr(self, f"block{i}")(getattr(self, f"mp{i - 1}")(feats[-1])))
        return feats


class DecoderDiscriminative(nn.Module):
    def __init__(self, base_width: int, out_channels: int) -> None:
        super().__init__()
        w = base_width
        self.up_b, self.db_b = _up(8 * w, 8 * w), _block(16 * w, 8 * w)
        self.up1, self.db1 = _up(8 * w, 4 * w), _block(12 * w, 4 * w)
        self.up2, self.db2 = _up(4 * w, 2 * w), _block(6 * w, 2 * w)
        self.up3, self.db3 = _up(2 * w, w), _block(3 * w, w)
        self.up4, self.db4 = _up(w, w), _block(2 * w, w)
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, 3, padding=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[5]
        for (up, db), skip in zip([("up_b", "db_b"), ("up1", "db1"), ("up2", "db2"), ("up3", "db3"),
                                   ("up4", "db4")], feats[4::-1]):
            x = getattr(self, db)(torch.cat([getattr(self, up)(x), skip], dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(Segmenter):
    """DRAEM's segmentation network as AnomalyDiffusion trains it (see module doc); (B, out_channels,
    H, W) logits, H and W multiples of 32."""

    arch = "draem"

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base_width: int = 64) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base_width": base_width}
        self.encoder_segment = EncoderDiscriminative(in_channels, base_width)
        self.decoder_segment = DecoderDiscriminative(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"DiscriminativeSubNetwork needs H and W that are multiples of 32 (five "
                             f"max-pools); got input {tuple(x.shape)}")
        return self.decoder_segment(self.encoder_segment(x))


def draem_weights_init(m: nn.Module) -> None:
    """DRAEM / AnomalyDiffusion ``weights_init``: conv weights N(0, 0.02); BN weight N(1, 0.02), bias 0.
    Use with ``model.apply``."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
