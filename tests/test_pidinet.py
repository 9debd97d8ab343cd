"""PiDiNet: upstream checkpoint layout, reference outputs, the converted form, the variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid.models.pidinet import VARIANTS, build_pidinet, convert_pidinet, load_pidinet, normalize_rgb, pdc_kernel
from tests.conftest import model_path, shared_path

FIXTURES = ["astronaut", "chelsea", "motorcycle_left", "rocket", "retina"]  # retina is 200x320


def save_upstream_checkpoint(model: torch.nn.Module, path) -> None:
    """Save like hellozhuo/pidinet's main.py: DataParallel keys under 'state_dict'."""
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 19, "state_dict": sd}, path)


@pytest.fixture(scope="module")
def real_models():
    ckpt = model_path("pidinet", "table5_pidinet.pth")
    return load_pidinet(ckpt), load_pidinet(ckpt, converted=True)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference_outputs(real_models, name):
    data = np.load(shared_path("fixtures", "pidinet", f"{name}.npz"))
    ref = data["edges"].astype(np.float32)
    x = normalize_rgb(torch.from_numpy(data["rgb"]).permute(2, 0, 1)[None])
    for model in real_models:  # original and converted
        with torch.no_grad():
            out = model(x)
        assert len(out) == 5
        got = torch.cat(out, dim=1)[0].numpy()
        assert got.shape == ref.shape
        err = np.abs(got - ref).max(axis=(1, 2))
        assert (err < 2e-3).all(), f"{name}: max abs error per map (e1..e4, fused) {err}"


def test_real_checkpoint_keys_and_sizes():
    ckpt = torch.load(model_path("pidinet", "table5_pidinet.pth"), map_location="cpu", weights_only=True)
    upstream = {k.removeprefix("module."): tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in build_pidinet("pidinet").state_dict().items()}
    assert ours == upstream


def test_loads_upstream_layout_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_pidinet("pidinet").eval()
    assert len(model.state_dict()) == 83
    assert sum(p.numel() for p in model.parameters()) == 710_149
    save_upstream_checkpoint(model, tmp_path / "ckpt.pth")
    loaded = load_pidinet(tmp_path / "ckpt.pth")
    assert not loaded.training
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_equals_original(variant):
    torch.manual_seed(1)
    model = build_pidinet(variant).eval()
    conv = convert_pidinet(model).eval()
    assert not any(type(m).__name__ == "PDCConv2d" for m in conv.modules())
    x = torch.randn(2, 3, 33, 50)
    with torch.no_grad():
        for a, b in zip(model(x), conv(x)):
            assert a.shape == (2, 1, 33, 50)
            assert ((a > 0) & (a < 1)).all()
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if variant == "pidinet":
        assert sum(p.numel() for p in conv.parameters()) == 720_709


def test_wrong_variant_is_named(tmp_path):
    save_upstream_checkpoint(build_pidinet("pidinet_tiny"), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="pidinet_tiny"):
        load_pidinet(tmp_path / "tiny.pth", variant="pidinet")
    assert load_pidinet(tmp_path / "tiny.pth", variant="pidinet_tiny", converted=True).inplane == 20


def test_pixel_difference_kernels_ignore_flat_regions():
    """cd/ad/rd respond to differences only: a constant image gives zero away from the border."""
    torch.manual_seed(2)
    w = torch.randn(4, 1, 3, 3)
    x = torch.full((1, 4, 12, 12), 3.0)
    for op in ("cd", "ad", "rd"):
        k = pdc_kernel(op, w)
        y = F.conv2d(x, k, padding=k.shape[-1] // 2, groups=4)
        assert y[..., 3:-3, 3:-3].abs().max() < 1e-5, op
    assert pdc_kernel("rd", w).shape == (4, 1, 5, 5)
    with pytest.raises(ValueError, match="unknown pixel difference op"):
        pdc_kernel("xx", w)
