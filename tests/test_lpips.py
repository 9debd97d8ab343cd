"""LPIPS port: distances vs lpips 0.1.4 on the fixture pairs, metric properties, loading paths."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from hybrid.metrics.lpips import LPIPS, NETS, load_lpips, to_lpips_input
from tests.conftest import model_path, recipe_state_dict, shared_path


def _recipe_backbone(net: str) -> dict[str, torch.Tensor]:
    shapes = {f"features.{k}": tuple(v.shape) for k, v in LPIPS(net).features_net.state_dict().items()}
    return recipe_state_dict(shapes)


def _place(model_dir, name: str, src=None, state_dict=None):
    """Put a file where the model store looks for ``name`` under ``model_dir``."""
    from hybrid.models.store import get_spec

    target = model_dir / get_spec(name).relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    if src is not None:
        shutil.copyfile(src, target)
    else:
        torch.save(state_dict, target)
    return target


@pytest.fixture(scope="module")
def real_lpips_dir():
    """The official v0.1 linear layers (read before ``model_dir`` points HYBRID_MODEL_DIR elsewhere)."""
    return model_path("lpips", "v0.1")


@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_distances_match_lpips_014(net, real_lpips_dir, model_dir, tmp_path):
    ref = np.load(shared_path("fixtures", "ports", "ports.npz"))
    images = np.load(shared_path("fixtures", "ports", "inputs.npz"))["images"]
    _place(model_dir, NETS[net]["linear"], src=real_lpips_dir / f"{net}.pth")
    if net == "vgg":  # backbone found by the store under its registered name
        _place(model_dir, "vgg16", state_dict=_recipe_backbone(net))
        metric = load_lpips(net)
    else:  # recipe files would fail the store's checksum check, so pass an explicit path
        torch.save(_recipe_backbone(net), tmp_path / "backbone.pth")
        metric = load_lpips(net, backbone=tmp_path / "backbone.pth")
    x = to_lpips_input(images)
    pairs = ref["lpips_pairs"]
    with torch.no_grad():
        d = metric(x[pairs[:, 0]], x[pairs[:, 1]])
        feats = metric.features(x)
        pairwise = metric.pairwise_from_features(feats, feats, dtype=torch.float64)
    assert d.shape == (len(pairs),)
    np.testing.assert_allclose(d.numpy(), ref[f"lpips_{net}"], atol=1e-5)
    np.testing.assert_allclose(pairwise[pairs[:, 0], pairs[:, 1]].numpy(), ref[f"lpips_{net}"], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_metric() -> LPIPS:
    return _random_lpips("alex", 0)


def _random_lpips(net: str, seed: int) -> LPIPS:
    """Random backbone, random non-negative linear layers (as the trained ones are)."""
    torch.manual_seed(seed)
    metric = LPIPS(net)
    for w in metric.lins.weights():
        w.abs_()
    return metric


def _images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_distance_is_zero_to_itself_and_symmetric(tiny_metric):
    a, b = _images(3, seed=1), _images(3, seed=2)
    with torch.no_grad():
        assert torch.all(tiny_metric(a, a) == 0)
        assert torch.allclose(tiny_metric(a, b), tiny_metric(b, a), rtol=1e-6)
        assert torch.all(tiny_metric(a, b) > 0)


@pytest.mark.parametrize("net", ["vgg", "squeeze"])
def test_pairwise_from_cached_features_equals_direct_distances(net):
    metric = _random_lpips(net, 1)
    a, b = _images(3, 32, seed=3), _images(4, 32, seed=4)
    with torch.no_grad():
        fa, fb = metric.features(a), metric.features(b)
        pairwise = metric.pairwise_from_features(fa, fb)
        direct = torch.stack([metric(a[i : i + 1].expand(4, -1, -1, -1), b) for i in range(3)])
        one_side = metric.distance_from_features([f[1:2] for f in fa], fb)
    assert pairwise.shape == (3, 4)
    torch.testing.assert_close(pairwise, direct, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(one_side, direct[1], rtol=1e-6, atol=1e-7)


def test_features_are_unit_norm_over_channels(tiny_metric):
    with torch.no_grad():
        feats = tiny_metric.features(_images(2))
    assert [f.shape[1] for f in feats] == list(NETS["alex"]["channels"])
    for f in feats:
        norm = f.pow(2).sum(1)  # 1 per pixel, or 0 where every channel is 0 after the ReLU
        assert torch.all(((norm - 1).abs() < 1e-4) | (norm < 1e-6)) and (norm > 0.5).any()


def test_uint8_input_maps_to_minus_one_one():
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[0, 0, 0] = 255
    x = to_lpips_input(img)
    assert x.shape == (1, 3, 2, 2) and x[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0] and x[0, 0, 1, 1] == -1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        LPIPS("resnet")
    with pytest.raises(KeyError, match="features"):
        LPIPS("alex").load_backbone({"classifier.1.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError):
        LPIPS("alex").load_linear({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)})
