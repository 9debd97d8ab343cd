"""pix2pixHD losses: LSGAN over scales, discriminator feature matching, VGG19 perceptual loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.models.vgg import VGGFeatures

VGG_BOUNDS = [0, 2, 7, 12, 21, 30]  # relu1_1 .. relu5_1
VGG_WEIGHTS = [1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0]


def gan_loss(preds: list[list[torch.Tensor]], real: bool) -> torch.Tensor:
    """LSGAN: MSE of each scale's last output to 1 (real) or 0 (fake), summed over scales."""
    target = 1.0 if real else 0.0
    return sum(F.mse_loss(p[-1].float(), torch.full_like(p[-1].float(), target)) for p in preds)


def d_loss(pred_real: list[list[torch.Tensor]], pred_fake: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Discriminator loss 0.5 * (real + fake) (the fake must come from a detached image)."""
    real, fake = gan_loss(pred_real, True), gan_loss(pred_fake, False)
    return 0.5 * (real + fake), real, fake


def feature_matching(pred_fake: list[list[torch.Tensor]], pred_real: list[list[torch.Tensor]],
                     n_layers: int, lambda_feat: float = 10.0) -> torch.Tensor:
    """L1 between D features of fake and (detached) real, all layers but the prediction,
    weighted (1/num_D) * (4/(n_layers+1)) * lambda_feat as pix2pixHD."""
    w = (1.0 / len(pred_fake)) * (4.0 / (n_layers + 1)) * lambda_feat
    loss = pred_fake[0][0].new_zeros((), dtype=torch.float32)
    for fake, real in zip(pred_fake, pred_real):
        for f, r in zip(fake[:-1], real[:-1]):
            loss = loss + w * F.l1_loss(f.float(), r.detach().float())
    return loss


class VGGLoss(nn.Module):
    """sum_i w_i * L1(vgg_i(x), vgg_i(y).detach()) on VGG19 relu{1..5}_1, frozen.

    Inputs in [-1, 1] go in as they are, without ImageNet normalisation (the pix2pixHD habit);
    1-channel maps (depth, edges) are repeated to 3 channels. Multiply by lambda outside.
    """

    def __init__(self, vgg: VGGFeatures) -> None:
        super().__init__()
        self.slices = nn.ModuleList(vgg.slices(VGG_BOUNDS))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats = []
        for s in self.slices:
            x = s(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fy = self.features(y)
        fx = self.features(x)
        return sum(w * F.l1_loss(a.float(), b.float()) for w, a, b in zip(VGG_WEIGHTS, fx, fy))

    def train(self, mode: bool = True) -> VGGLoss:  # stays frozen in eval mode
        return super().train(False)


def load_vgg_loss(path: str | None = None) -> VGGLoss:
    """VGG19 perceptual loss with torchvision's vgg19-dcbb9e9d.pth found by the model store."""
    from hybrid.models import store  # lazy: only training with the perceptual loss needs weights

    vgg = VGGFeatures("vgg19")
    vgg.load_upstream(torch.load(store.locate("vgg19", path), map_location="cpu", weights_only=True))
    return VGGLoss(vgg)


def mask_loss(mask: torch.Tensor) -> torch.Tensor:
    """Optional regulariser mean(M) (GANimation-style L1 on the fusion map; off by default)."""
    return mask.float().mean()
