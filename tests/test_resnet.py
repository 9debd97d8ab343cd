"""ResNet ports: torchvision's state_dict layout, the forward pass against a functional re-implementation,
and the model-store fallback (auto -> random stand-in, real -> MissingWeightsError)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hybrid.models.resnet import ResNet, load_resnet
from hybrid.models.store import REGISTRY, MissingWeightsError
from tests.conftest import recipe_state_dict

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{s}": (() if s == "num_batches_tracked" else (c,)) for s in BN}


def torchvision_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """torchvision's key -> shape table, written from the architecture (not from our module)."""
    bottleneck = arch in ("resnet50", "wide_resnet50_2")
    counts = {"resnet18": (2, 2, 2, 2)}.get(arch, (3, 4, 6, 3))
    width_per_group = 128 if arch == "wide_resnet50_2" else 64
    out = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    c_in = 64
    for i, (n, planes) in enumerate(zip(counts, (64, 128, 256, 512)), start=1):
        c_out = planes * (4 if bottleneck else 1)
        for j in range(n):
            p = f"layer{i}.{j}"
            if bottleneck:
                w = planes * width_per_group // 64
                out |= {f"{p}.conv1.weight": (w, c_in, 1, 1), **_bn(f"{p}.bn1", w),
                        f"{p}.conv2.weight": (w, w, 3, 3), **_bn(f"{p}.bn2", w),
                        f"{p}.conv3.weight": (c_out, w, 1, 1), **_bn(f"{p}.bn3", c_out)}
            else:
                out |= {f"{p}.conv1.weight": (planes, c_in, 3, 3), **_bn(f"{p}.bn1", planes),
                        f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes)}
            if j == 0 and (i > 1 or c_in != c_out):
                out |= {f"{p}.downsample.0.weight": (c_out, c_in, 1, 1), **_bn(f"{p}.downsample.1", c_out)}
            c_in = c_out
    return out | {"fc.weight": (1000, c_in), "fc.bias": (1000,)}


def test_resnet18_layout_is_torchvision():
    shapes = torchvision_shapes("resnet18")
    assert len(shapes) == 122
    ours = {k: tuple(v.shape) for k, v in ResNet("resnet18").state_dict().items()}
    assert ours == shapes
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and "layer1.0.downsample.0.weight" not in shapes


@pytest.mark.parametrize("arch,n_keys,n_params,checks", [
    ("resnet34", 218, 21_797_672, {"layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.0.downsample.0.weight":
                                   (512, 256, 1, 1), "fc.weight": (1000, 512)}),
    ("resnet50", 320, 25_557_032, {"layer1.0.conv2.weight": (64, 64, 3, 3), "layer1.0.downsample.0.weight":
                                   (256, 64, 1, 1), "fc.weight": (1000, 2048)}),
    ("wide_resnet50_2", 320, 68_883_240, {"layer1.0.conv2.weight": (128, 128, 3, 3), "layer1.0.conv3.weight":
                                          (256, 128, 1, 1), "layer4.2.conv2.weight": (1024, 1024, 3, 3)}),
])
def test_layouts_and_sizes(arch, n_keys, n_params, checks):
    model = ResNet(arch)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == torchvision_shapes(arch)
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params  # torchvision's published counts
    for k, shape in checks.items():
        assert tuple(sd[k].shape) == shape


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, bottleneck: bool) -> dict[str, torch.Tensor]:
    """ResNet forward (eval) with torch.nn.functional over a torchvision state dict; returns layer maps and logits."""

    def bn(p: str, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            training=False, eps=1e-5)

    def conv(p: str, t: torch.Tensor, stride: int = 1) -> torch.Tensor:
        w = sd[f"{p}.weight"]
        return F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2)

    out = {}
    x = F.max_pool2d(F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in sd:
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            if bottleneck:
                y = F.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", x)))
                y = F.relu(bn(f"{p}.bn2", conv(f"{p}.conv2", y, stride)))
                y = bn(f"{p}.bn3", conv(f"{p}.conv3", y))
            else:
                y = bn(f"{p}.bn2", conv(f"{p}.conv2", F.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", x, stride)))))
            short = (bn(f"{p}.downsample.1", conv(f"{p}.downsample.0", x, stride))
                     if f"{p}.downsample.0.weight" in sd else x)
            x = F.relu(y + short)
            j += 1
        out[f"layer{i}"] = x
    out["logits"] = F.linear(x.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])
    return out


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet34", 48), ("wide_resnet50_2", 40)])
def test_forward_matches_functional_reference(arch, size, one_thread):
    sd = recipe_state_dict(torchvision_shapes(arch))
    model = ResNet(arch).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference_forward(sd, x, bottleneck=arch != "resnet18" and arch != "resnet34")
        feats = model.features(x, ("layer2", "layer3"))
        logits = model(x)
    assert set(feats) == {"layer2", "layer3"}
    for name, got in [*feats.items(), ("logits", logits)]:
        r = ref[name]
        assert got.shape == r.shape
        torch.testing.assert_close(got, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    assert feats["layer2"].shape[-1] == -(-size // 8) and feats["layer3"].shape[-1] == -(-size // 16)


def test_old_checkpoints_without_num_batches_tracked_load_strict():
    sd = {k: v for k, v in recipe_state_dict(torchvision_shapes("resnet18")).items()
          if not k.endswith("num_batches_tracked")}
    ResNet("resnet18").load_state_dict(sd, strict=True)


def test_replace_fc_and_features_errors():
    model = ResNet("resnet18").eval()
    fc = model.replace_fc(3, seed=1)
    assert model.fc is fc and tuple(fc.weight.shape) == (3, 512)
    assert torch.equal(ResNet("resnet18").replace_fc(3, seed=1).weight, fc.weight)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="layer5"):
        model.features(torch.zeros(1, 3, 32, 32), ("layer5",))
    with pytest.raises(ValueError, match="unknown ResNet"):
        ResNet("resnet101")


def test_registry_has_torchvision_files():
    for name, file in [("resnet18", "resnet18-f37072fd.pth"), ("resnet34", "resnet34-b627a593.pth"),
                       ("resnet50", "resnet50-0676ba61.pth"), ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")]:
        spec = REGISTRY[name]
        assert spec.family == "torchvision" and spec.filename == file
        assert spec.url == "https://download.pytorch.org/models/" + file and spec.sha256 == file[-12:-4]


def test_store_fallback(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hybrid.models.resnet"):
        auto = load_resnet("resnet18", "auto", seed=3)
    assert auto.random_stand_in and "seed 3" in auto.weights_label and "RANDOM STAND-IN" in caplog.text
    random = load_resnet("resnet18", "random", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), random.state_dict().values()))
    other = load_resnet("resnet18", "random", seed=4)
    assert not torch.equal(other.conv1.weight, random.conv1.weight)
    with pytest.raises(MissingWeightsError, match="resnet18-f37072fd.pth"):
        load_resnet("resnet18", "real")
    sd = recipe_state_dict(torchvision_shapes("resnet18"))
    torch.save(sd, tmp_path / "r18.pth")
    real = load_resnet("resnet18", "real", path=tmp_path / "r18.pth")
    assert not real.random_stand_in and real.weights_label == "real: r18.pth" and not real.training
    assert torch.equal(real.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    torch.save({"fc.weight": sd["fc.weight"]}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="not torchvision's resnet18"):
        load_resnet("resnet18", "auto", path=tmp_path / "bad.pth")


@pytest.mark.parametrize("arch", ["resnet18", "wide_resnet50_2"])
def test_real_checkpoint_loads_strict(arch):
    from tests.conftest import model_path

    spec = REGISTRY[arch]
    model = load_resnet(arch, "real", path=model_path(spec.family, spec.filename))
    assert not model.random_stand_in and model.weights_label == f"real: {spec.filename}"
