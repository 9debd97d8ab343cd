"""Segmentation networks: upstream layouts, any-size U-Net, pretrained I/O, and learning scratches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid.metrics.localization import localization_report
from hybrid.models.unet import DiscriminativeSubNetwork, Segmenter, UNet, draem_weights_init


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_unet_layout_matches_milesial():
    with torch.device("meta"):
        s, b = shapes(UNet()), shapes(UNet(bilinear=True))
    assert s["inc.double_conv.0.weight"] == (64, 3, 3, 3) and "inc.double_conv.0.bias" not in s
    assert s["down4.maxpool_conv.1.double_conv.3.weight"] == (1024, 1024, 3, 3)
    assert s["up1.up.weight"] == (1024, 512, 2, 2) and s["up1.up.bias"] == (512,)
    assert s["up1.conv.double_conv.0.weight"] == (512, 1024, 3, 3)
    assert s["up4.conv.double_conv.3.weight"] == (64, 64, 3, 3)
    assert s["outc.conv.weight"] == (1, 64, 1, 1)
    # bilinear: the deepest width halves and each up's DoubleConv narrows through in/2
    assert b["down4.maxpool_conv.1.double_conv.3.weight"] == (512, 512, 3, 3)
    assert b["up1.conv.double_conv.0.weight"] == (512, 1024, 3, 3)
    assert b["up1.conv.double_conv.3.weight"] == (256, 512, 3, 3)
    assert b["up4.conv.double_conv.0.weight"] == (64, 128, 3, 3)
    assert not any(k.startswith("up1.up") for k in b)


def test_draem_layout_matches_upstream():
    with torch.device("meta"):
        s = shapes(DiscriminativeSubNetwork())
    assert len(s) == 191   # 6 encoder blocks, 5 ups + 5 decoder blocks, fin_out; BN buffers included
    assert s["encoder_segment.block1.0.weight"] == (64, 3, 3, 3) and s["encoder_segment.block1.0.bias"] == (64,)
    assert s["encoder_segment.block6.3.weight"] == (512, 512, 3, 3)
    assert s["decoder_segment.up_b.1.weight"] == (512, 512, 3, 3)
    assert s["decoder_segment.db_b.0.weight"] == (512, 1024, 3, 3)
    assert s["decoder_segment.db1.0.weight"] == (256, 768, 3, 3)
    assert s["decoder_segment.db3.0.weight"] == (64, 192, 3, 3)
    assert s["decoder_segment.db4.0.weight"] == (64, 128, 3, 3)
    assert s["decoder_segment.fin_out.0.weight"] == (2, 64, 3, 3)


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_keeps_any_input_size(bilinear, one_thread):
    model = UNet(in_channels=1, base_width=4, bilinear=bilinear).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 36, 44)).shape == (2, 1, 36, 44)
        assert model(torch.randn(1, 1, 17, 23)).shape == (1, 1, 17, 23)


def test_draem_shapes_and_size_check(one_thread):
    model = DiscriminativeSubNetwork(in_channels=3, base_width=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, 2, 64, 32)
    with pytest.raises(ValueError, match=r"multiples of 32.*\(1, 3, 48, 64\)"):
        model(torch.randn(1, 3, 48, 64))


def test_anomaly_map_is_sigmoid_or_softmax_channel(one_thread):
    x = torch.randn(2, 3, 32, 32)
    unet, draem = UNet(base_width=4).eval(), DiscriminativeSubNetwork(base_width=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(unet.anomaly_map(x), torch.sigmoid(unet(x))[:, 0])
        torch.testing.assert_close(draem.anomaly_map(x), torch.softmax(draem(x), 1)[:, 1])


@pytest.mark.parametrize("cls", [UNet, DiscriminativeSubNetwork])
def test_save_and_load_pretrained(cls, tmp_path, one_thread):
    torch.manual_seed(0)
    model = cls(in_channels=1, base_width=4) if cls is DiscriminativeSubNetwork else cls(1, 1, 4, bilinear=True)
    model.train()(torch.randn(4, 1, 32, 32))   # move the BN running statistics off their defaults
    model.eval()
    model.save_pretrained(tmp_path / "seg")
    x = torch.randn(2, 1, 32, 32)
    for loader in (type(model), Segmenter):
        back = loader.from_pretrained(tmp_path / "seg")
        assert type(back) is type(model) and back.config == model.config and not back.training
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    other = DiscriminativeSubNetwork if isinstance(model, UNet) else UNet
    with pytest.raises(ValueError, match=f"not a {other.__name__}"):
        other.from_pretrained(tmp_path / "seg")
    (tmp_path / "seg" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        Segmenter.from_pretrained(tmp_path / "seg")


def test_draem_weights_init():
    torch.manual_seed(0)
    model = DiscriminativeSubNetwork(base_width=16)
    model.apply(draem_weights_init)
    w = model.encoder_segment.block2[3].weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.002
    bn = model.decoder_segment.db1[1]
    assert float(bn.bias.detach().abs().max()) == 0 and abs(float(bn.weight.detach().mean()) - 1) < 0.01


def scratches(n: int, size: int, gen: torch.Generator, p_anomalous: float = 1.0):
    """Grey textured noise with 1-2 thin straight scratches, brighter or darker; (images, masks)."""
    noise = torch.randn(n, 1, size, size, generator=gen)
    texture = 0.5 + 0.2 * F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    images = texture + 0.07 * torch.randn(n, 1, size, size, generator=gen)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    t = torch.linspace(0, 1, 4 * size)[:, None]
    for i in range(n):
        if float(torch.rand(1, generator=gen)) >= p_anomalous:
            continue
        for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
            start, angle = torch.rand(2, generator=gen) * size, float(torch.rand(1, generator=gen)) * math.pi
            length = 6 + float(torch.rand(1, generator=gen)) * size / 2
            pts = (start + t * length * torch.tensor([math.cos(angle), math.sin(angle)])).round().long()
            pts = pts[((pts >= 0) & (pts < size)).all(1)]
            masks[i, pts[:, 1], pts[:, 0]] = True
    sign = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
    return images + sign * 0.25 * masks[:, None], masks


@pytest.mark.parametrize("arch", ["unet", "draem"])
def test_learns_to_segment_scratches(arch, one_thread):
    """A small network trained on synthetic scratches finds held-out ones (pixel AUROC > 0.9, where an
    untrained one is near 0.5 and raw intensity deviation is about 0.95 AUROC but 0.5 AP)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if arch == "unet":
        model: Segmenter = UNet(in_channels=1, base_width=8, bilinear=True)
        loss_fn = lambda out, m: F.binary_cross_entropy_with_logits(out[:, 0], m.float(),  # noqa: E731
                                                                    pos_weight=torch.tensor(5.0))
    else:
        model = DiscriminativeSubNetwork(in_channels=1, out_channels=2, base_width=8)
        loss_fn = lambda out, m: F.cross_entropy(out, m.long(), weight=torch.tensor([1.0, 5.0]))  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        x, m = scratches(8, 32, gen)
        loss = loss_fn(model(x), m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, m = scratches(32, 32, torch.Generator().manual_seed(123), p_anomalous=0.5)
    report = localization_report(model.eval().anomaly_map(x), m)
    assert report["pixel_auroc"] > 0.9, report
    assert report["pixel_ap"] > 0.5, report
