import pytest
import torch

from hybrid.losses import VGGLoss, d_loss, feature_matching, gan_loss
from hybrid.models.vgg import VGGFeatures


def pyramid(value: float, n_scales: int = 2, n_feats: int = 5) -> list[list[torch.Tensor]]:
    return [[torch.full((1, 1, 4, 4), value) for _ in range(n_feats)] for _ in range(n_scales)]


def test_lsgan_sums_scales_on_last_output():
    preds = pyramid(0.0)
    preds[0][-1] = torch.full((1, 1, 4, 4), 0.5)  # only the last output of each scale counts
    preds[0][0] = torch.full((1, 1, 4, 4), 100.0)
    assert gan_loss(preds, True).item() == pytest.approx(0.25 + 1.0)
    assert gan_loss(preds, False).item() == pytest.approx(0.25 + 0.0)
    total, real, fake = d_loss(pyramid(1.0), pyramid(1.0))
    assert (real.item(), fake.item(), total.item()) == pytest.approx((0.0, 2.0, 1.0))


def test_feature_matching_uses_pix2pixhd_weights_and_skips_prediction():
    fake, real = pyramid(1.0), pyramid(0.0)
    for s in fake:
        s[-1] = torch.full((1, 1, 4, 4), 50.0)  # the prediction is not matched
    # 2 scales x 4 layers x L1 1.0 x (1/2) x (4/4) x 10
    assert feature_matching(fake, real, n_layers=3, lambda_feat=10).item() == pytest.approx(40.0)
    real[0][0].requires_grad_(True)
    f = [[t.clone().requires_grad_(True) for t in s] for s in fake]
    feature_matching(f, real, 3).backward()
    assert real[0][0].grad is None and f[0][0].grad is not None  # real features are detached


def test_vgg_loss_is_frozen_unnormalised_and_accepts_one_channel():
    torch.manual_seed(0)
    loss = VGGLoss(VGGFeatures("vgg19"))
    loss.train()
    assert not loss.training and not any(p.requires_grad for p in loss.parameters())
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert loss(x, x.detach()).item() == 0.0
    y = torch.rand(1, 3, 32, 32) * 2 - 1
    value = loss(x, y)
    value.backward()
    assert value.item() > 0 and x.grad is not None
    # the [-1, 1] images go straight into relu1_1 .. relu5_1 (no ImageNet normalisation)
    with torch.no_grad():
        want, a, b = 0.0, x.detach(), y
        for w, s in zip([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1], loss.slices):
            a, b = s(a), s(b)
            want += w * (a - b).abs().mean()
    torch.testing.assert_close(value.detach(), want)
    depth = torch.rand(1, 1, 32, 32)
    rgb = depth.expand(-1, 3, -1, -1)
    torch.testing.assert_close(loss(depth, depth * 0), loss(rgb, rgb * 0))
