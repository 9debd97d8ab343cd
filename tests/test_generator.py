import pytest
import torch

from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator

TINY = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_outputs_shapes_ranges_and_names():
    torch.manual_seed(0)
    g = Generator(**TINY)
    x = torch.rand(2, 5, 32, 32) * 2 - 1
    out = g(x)
    assert list(out) == ["AHD", "AHE"]
    for o in out.values():
        assert o["image"].shape == o["texture"].shape == (2, 3, 32, 32)
        assert o["mask"].shape == (2, 1, 32, 32)
        assert o["texture"].abs().max() <= 1 and o["image"].abs().max() <= 1
        assert 0 <= o["mask"].min() and o["mask"].max() <= 1
        torch.testing.assert_close(o["image"], x[:, :3] * (1 - o["mask"]) + o["texture"] * o["mask"])


@pytest.mark.parametrize("bias", [-100.0, 100.0])
def test_fusion_mask_zero_keeps_reference_and_one_takes_texture(bias):
    g = Generator(**TINY)
    for d in g.decoders.values():
        head = d["mask"][-2]  # the 7x7 conv before the sigmoid
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, bias)
    maps = {"reference_image": torch.rand(1, 3, 32, 32) * 2 - 1, "target_depth": torch.rand(1, 1, 32, 32),
            "target_edge": torch.rand(1, 1, 32, 32)}
    x = g.inputs(maps)
    assert x.shape[1] == 5 and torch.equal(x[:, :3], maps["reference_image"])
    for o in g(x).values():
        want = maps["reference_image"] if bias < 0 else o["texture"]  # C_in is the reference RGB
        torch.testing.assert_close(o["image"], want, atol=1e-6, rtol=0)


def test_paper_size_parameter_count():
    with torch.device("meta"):
        g = Generator()  # ngf 64, 4 downsamplings, 9 blocks, AHD + AHE, 5 input channels
    assert n_params(g.encoder) == 176_172_288  # pix2pixHD encoder + 9 ResnetBlocks at 1024 channels
    assert n_params(g.decoders["AHD"]["texture"]) == 6_277_251
    assert n_params(g.decoders["AHD"]["mask"]) == 6_270_977
    assert n_params(g) == 201_268_744
    assert n_params(g) * 4 / 2**20 == pytest.approx(767.78, abs=0.01)  # AnomalyHybrid: "769MB"


def test_discriminator_parameter_count_and_features():
    with torch.device("meta"):
        assert n_params(MultiscaleDiscriminator(6)) == 5_535_618  # pix2pixHD / AnomalyHybrid "21MB"
        # every extra input channel adds 4x4x64 weights per scale
        assert n_params(MultiscaleDiscriminator(8)) == 5_535_618 + 2 * 2 * 64 * 16
    d = MultiscaleDiscriminator(4, ndf=4)
    feats = d(torch.zeros(1, 4, 256, 256))
    assert [[f.shape[-1] for f in s] for s in feats] == [[129, 65, 33, 34, 35], [65, 33, 17, 18, 19]]
    assert feats[0][-1].shape[1] == 1


def test_edge_only_anomalyfactory_config():
    g = Generator(decoders=["AHE"], conditions=["reference_image", "target_edge"], **TINY)
    assert g.in_channels == 4 and list(g.decoders) == ["AHE"]
    out = g(torch.zeros(1, 4, 32, 32))
    assert list(out) == ["AHE"] and out["AHE"]["image"].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="4"):
        g(torch.zeros(1, 5, 32, 32))


def test_depth_level_initialised_from_rgb_model():
    torch.manual_seed(0)
    rgb = Generator(**TINY)
    star = Generator(level="depth", **TINY)
    assert star.in_channels == 5 and star.out_channels == 1
    assert star.bases == {"AHD": "reference_depth", "AHE": "reference_edge"}
    assert star.targets == {"AHD": "target_depth", "AHE": "target_edge"}
    kept = star.init_from(rgb)
    # only the texture heads' 7x7 convs (3 -> 1 output channels) keep their own init
    assert kept == [f"decoders.{d}.texture.{i}.{p}" for d in ("AHD", "AHE") for i in [7] for p in ("weight", "bias")]
    mine, theirs = star.state_dict(), rgb.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k not in kept)
    x = torch.rand(1, 5, 32, 32) * 2 - 1
    out = star(x)
    assert out["AHD"]["image"].shape == (1, 1, 32, 32)
    with torch.no_grad():
        star.decoders["AHE"]["mask"][-2].bias.fill_(-100.0)
        star.decoders["AHE"]["mask"][-2].weight.zero_()
    torch.testing.assert_close(star(x)["AHE"]["image"], x[:, 4:5], atol=1e-6, rtol=0)


def test_config_rebuilds_the_same_model_and_rejects_bad_ones():
    g = Generator(decoders=["AHD"], **TINY)
    again = Generator(**g.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in g.state_dict().items()}
    with pytest.raises(ValueError, match="AHX"):
        Generator(decoders=["AHX"], **TINY)
    with pytest.raises(ValueError, match="reference_image"):
        Generator(conditions=["target_depth", "target_edge"], **TINY)
    with pytest.raises(KeyError, match="target_depth"):
        g.inputs({"reference_image": torch.zeros(1, 3, 8, 8), "target_edge": torch.zeros(1, 1, 8, 8)})


def test_pix2pixhd_weight_init():
    torch.manual_seed(0)
    g = Generator(ngf=16, n_downsample=2, n_blocks=1)
    w = g.encoder[4].weight  # first stride-2 conv, 16 -> 32 channels
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 0.002
