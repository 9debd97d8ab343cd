"""Edge front end: input layout, Canny thresholds, PiDiNet via the store, reference fused maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.models import store
from hybrid.models.edges import make_edge_detector
from hybrid.models.pidinet import build_pidinet, normalize_rgb
from tests.conftest import model_path, shared_path
from tests.test_pidinet import save_upstream_checkpoint


def step_image(contrast: int, h: int = 24, w: int = 32) -> np.ndarray:
    img = np.full((1, h, w, 3), 100, np.uint8)
    img[:, :, w // 2:] += np.uint8(contrast)
    return img


def test_canny_shape_range_and_thresholds():
    edges = make_edge_detector("canny")(torch.from_numpy(np.repeat(step_image(120), 2, axis=0)))
    assert edges.shape == (2, 24, 32) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert edges[:, :, 15:17].sum() > 0 and edges[:, :, :12].sum() == 0  # on the step, not in flat areas
    weak = step_image(15)
    assert make_edge_detector("canny")(weak).sum() == 0
    assert make_edge_detector("canny", canny_low=10, canny_high=30)(weak).sum() > 0


def test_rejects_wrong_layout():
    det = make_edge_detector("canny")
    with pytest.raises(ValueError, match=r"\(B,H,W,3\)"):
        det(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        det(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="unknown edge detector"):
        make_edge_detector("sobel")


def test_pidinet_tiny_from_the_store(model_dir):
    torch.manual_seed(0)
    model = build_pidinet("pidinet_tiny").eval()
    ckpt = model_dir / store.REGISTRY["pidinet_tiny"].relpath
    ckpt.parent.mkdir(parents=True)
    save_upstream_checkpoint(model, ckpt)
    rgb = torch.randint(0, 256, (2, 20, 28, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    det = make_edge_detector("pidinet_tiny", "cpu", precision="bf16")
    out = det(rgb)
    assert det.precision == "fp32"  # CPU runs fp32 whatever was asked
    assert out.shape == (2, 20, 28) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    with torch.no_grad():
        expected = model(normalize_rgb(rgb.permute(0, 3, 1, 2)))[-1][:, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    original = make_edge_detector("pidinet_tiny", converted=False)(rgb.numpy())
    torch.testing.assert_close(original, expected, rtol=0, atol=1e-6)


def test_pidinet_missing_weights_offline(model_dir):
    with pytest.raises(store.MissingWeightsError, match="table5_pidinet-small.pth"):
        make_edge_detector("pidinet_small")


@pytest.mark.parametrize("name", ["retina", "chelsea"])
def test_pidinet_fused_matches_reference(name):
    data = np.load(shared_path("fixtures", "pidinet", f"{name}.npz"))
    det = make_edge_detector("pidinet", weights_path=model_path("pidinet", "table5_pidinet.pth"))
    out = det(data["rgb"][None])[0].numpy()
    assert np.abs(out - data["edges"][4].astype(np.float32)).max() < 2e-3
