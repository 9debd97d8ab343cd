import numpy as np
import torch

from hybrid.models.vgg import VGGFeatures
from tests.conftest import recipe_state_dict, shared_path


def test_vgg19_matches_torchvision_slices():
    ports = np.load(shared_path("fixtures", "ports", "ports.npz"))
    net = VGGFeatures("vgg19").eval()
    shapes = {f"features.{k}": tuple(v.shape) for k, v in net.features.state_dict().items()}
    net.load_upstream(recipe_state_dict(shapes))
    x = torch.from_numpy(ports["vgg19_input"])
    with torch.no_grad():
        for i, block in enumerate(net.slices([0, 2, 7, 12, 21, 30]), start=1):
            x = block(x)
            ref = torch.from_numpy(ports[f"vgg19_relu{i}_1"])
            assert x.shape == ref.shape
            torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_vgg_rejects_checkpoint_without_features():
    import pytest

    with pytest.raises(KeyError, match="features"):
        VGGFeatures("vgg16").load_upstream({"classifier.0.weight": torch.zeros(1)})
