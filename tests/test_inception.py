"""Inception-v3-compat port (vs torch-fidelity outputs) and the Inception Score formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.metrics.inception_score import compute_is, inception_score
from hybrid.models.inception import InceptionV3Compat, load_inception, resize_bilinear_tf1
from tests.conftest import recipe_state_dict, shared_path


@pytest.fixture(scope="module")
def recipe_inception() -> tuple[InceptionV3Compat, dict[str, torch.Tensor]]:
    model = InceptionV3Compat()
    sd = recipe_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict(sd, strict=True)
    return model, sd


def test_state_dict_layout_is_torch_fidelity():
    sd = InceptionV3Compat().state_dict()
    assert len(sd) == 566
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert "Conv2d_1a_3x3.bn.running_mean" in sd and "Mixed_7c.branch_pool.bn.num_batches_tracked" in sd
    assert tuple(sd["fc.weight"].shape) == (1008, 2048) and tuple(sd["fc.bias"].shape) == (1008,)


def test_port_matches_torch_fidelity(recipe_inception):
    model, _ = recipe_inception
    images = np.load(shared_path("fixtures", "ports", "inputs.npz"))["images"]
    ref = np.load(shared_path("fixtures", "ports", "ports.npz"))
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    for ours, theirs in [("pool", "inception_pool_2048"), ("logits_unbiased", "inception_logits_unbiased"),
                         ("logits", "inception_logits")]:
        r = ref[theirs]
        assert out[ours].shape == r.shape
        assert np.abs(out[ours].numpy() - r).max() <= 1e-4 * np.abs(r).max(), ours


def test_tf1_resize_is_identity_at_same_size_and_samples_top_left():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    assert torch.equal(resize_bilinear_tf1(x, (5, 7)), x)
    up = resize_bilinear_tf1(x, (10, 14))  # TF1 (no half-pixel offset): output (2i, 2j) is input (i, j)
    assert torch.equal(up[:, :, ::2, ::2], x)
    assert torch.allclose(up[:, :, 0, 1], (x[:, :, 0, 0] + x[:, :, 0, 1]) / 2)


def test_is_of_fixture_logits_matches_torch_fidelity():
    ref = np.load(shared_path("fixtures", "ports", "ports.npz"))
    mean, std = inception_score(ref["is_logits"])
    assert mean == pytest.approx(ref["is_mean_std"][0], abs=1e-6)
    assert std == pytest.approx(ref["is_mean_std"][1], abs=1e-6)


def _logits(p: np.ndarray) -> np.ndarray:
    """Logits whose softmax is p (zeros become e^-60 relative)."""
    return np.log(np.maximum(p, np.exp(-60.0)))


def test_is_uniform_predictions_score_one():
    mean, std = inception_score(np.zeros((50, 1008)), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_one_hot_over_k_classes_scores_k():
    k, n = 8, 80
    p = np.eye(1008)[np.arange(n) % k]
    # Unshuffled, every split of 8 holds each class once: exp(H(uniform over k)) = k.
    assert inception_score(_logits(p), splits=10, seed=None)[0] == pytest.approx(k, rel=1e-9)
    # One split: the marginal is uniform over k whatever the order.
    assert inception_score(_logits(p), splits=1)[0] == pytest.approx(k, rel=1e-9)
    # Shuffled splits hold uneven class histograms: each split scores exp(entropy of its histogram).
    perm = np.random.RandomState(2020).permutation(n)
    expected = []
    for chunk in np.array_split(perm, 10):
        q = np.bincount(np.arange(n)[chunk] % k, minlength=k) / len(chunk)
        expected.append(np.exp(-(q[q > 0] * np.log(q[q > 0])).sum()))
    mean, std = inception_score(_logits(p), splits=10, seed=2020)
    assert mean == pytest.approx(np.mean(expected), rel=1e-9) and mean < k
    assert std == pytest.approx(np.std(expected), rel=1e-6)


def test_is_mixture_predictions_is_exp_mutual_information():
    # Each image is unsure between the two classes of its pair; pairs {0,1} and {2,3} equally often:
    # IS = exp(H(marginal) - mean H(p(y|x))) = exp(log 4 - log 2) = 2.
    p = np.zeros((40, 1008))
    p[::2, [0, 1]] = 0.5
    p[1::2, [2, 3]] = 0.5
    assert inception_score(_logits(p), splits=2, seed=None)[0] == pytest.approx(2.0, rel=1e-9)
    # Confident on one class of four, 3:1 mixed with uniform over those four: a value between 1 and 4.
    q = np.zeros((40, 1008))
    q[np.arange(40), np.arange(40) % 4] = 0.75
    q[:, :4] += 0.0625
    h_cond = -(0.8125 * np.log(0.8125) + 3 * 0.0625 * np.log(0.0625))
    assert inception_score(_logits(q), splits=1)[0] == pytest.approx(np.exp(np.log(4) - h_cond), rel=1e-9)


def test_is_rejects_bad_shapes():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 1008)), splits=10)
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        inception_score(np.zeros(1008))


def test_load_inception_through_the_store(model_dir, recipe_inception):
    from hybrid.models.store import get_spec

    model, sd = recipe_inception
    target = model_dir / get_spec("inception_is").relpath
    target.parent.mkdir(parents=True)
    torch.save(sd, target)
    loaded = load_inception("inception_is")
    assert not loaded.training and not any(q.requires_grad for q in loaded.parameters())
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


class _MeanColourNet(torch.nn.Module):
    """A stand-in classifier: logits from the mean colour, to check compute_is' batching."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(tuple(x.shape))
        m = x.float().mean(dim=(2, 3)) / 32
        return {"logits_unbiased": torch.cat([m, -m], dim=1)}


def test_compute_is_batches_images_of_mixed_sizes():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(5)]
    images += [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(3)]
    net = _MeanColourNet()
    result = compute_is(images, net, batch_size=2, splits=2)
    assert net.calls == [(2, 3, 8, 6), (2, 3, 8, 6), (1, 3, 8, 6), (2, 3, 4, 4), (1, 3, 4, 4)]
    logits = np.concatenate([net(torch.from_numpy(im).permute(2, 0, 1)[None])["logits_unbiased"].numpy()
                             for im in images])
    assert result["n_images"] == 8
    assert (result["is_mean"], result["is_std"]) == pytest.approx(inception_score(logits, splits=2), rel=1e-6)
    assert compute_is(np.stack(images[:5]), _MeanColourNet(), batch_size=4, splits=2)["n_images"] == 5


def test_load_inception_rejects_other_checkpoints_and_missing_files(tmp_path, model_dir):
    from hybrid.models.store import MissingWeightsError

    bad = tmp_path / "not_inception.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(RuntimeError, match="Inception-v3-compat"):
        load_inception(bad)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_inception(tmp_path / "absent.pth")
    with pytest.raises(MissingWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_inception()


def test_compute_is_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        compute_is(np.zeros((2, 8, 8, 3), dtype=np.float32), _MeanColourNet())
