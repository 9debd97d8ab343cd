"""PatchCore: coreset, chunked kNN, reweighted score and blur against references; a toy detection problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from hybrid.models.patchcore import (
    PatchCore,
    anomaly_score,
    gaussian_blur,
    greedy_coreset,
    knn,
    sparse_random_projection,
)
from hybrid.models.resnet import load_resnet


def reference_coreset(features: torch.Tensor, n: int, projection_dim: int | None, seed: int) -> list[int]:
    """Brute-force greedy k-center (Gonzalez) over the full pairwise distance matrix: the seeded random
    start, then each step the point farthest from everything chosen so far."""
    g = torch.Generator().manual_seed(seed)
    x = features.double()
    if projection_dim:
        x = x @ sparse_random_projection(x.shape[1], projection_dim, g).double()
    start = int(torch.randint(len(x), (1,), generator=g))
    dist = torch.cdist(x, x)
    chosen = [start]
    for _ in range(n - 1):
        chosen.append(int(dist[:, chosen].min(1).values.argmax()))
    return chosen


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_coreset_equals_brute_force_greedy(projection_dim):
    feats = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    got = greedy_coreset(feats, 40, projection_dim=projection_dim, seed=5, chunk_size=64)
    assert got.tolist() == reference_coreset(feats, 40, projection_dim, seed=5)


def test_coreset_stops_when_everything_is_covered():
    feats = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    got = greedy_coreset(feats, 4, projection_dim=None)
    assert sorted(feats[got].tolist()) == [[0.0, 0.0], [1.0, 1.0]]


def test_sparse_projection_density_and_scale():
    p = sparse_random_projection(400, 128, torch.Generator().manual_seed(0))
    nonzero = p[p != 0]
    assert abs(len(nonzero) / p.numel() - 1 / 20) < 0.005
    assert torch.allclose(nonzero.abs(), torch.full_like(nonzero, math.sqrt(20 / 128)))


@pytest.mark.parametrize("k,chunk", [(1, 7), (3, 7), (5, 2), (5, 1000)])
def test_chunked_knn_equals_cdist(k, chunk):
    g = torch.Generator().manual_seed(2)
    q, bank = torch.randn(50, 16, generator=g), torch.randn(33, 16, generator=g)
    d, i = knn(q, bank, k, chunk_size=chunk)
    ref_d, ref_i = torch.cdist(q, bank).topk(k, dim=1, largest=False)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-5)


def test_reweighted_score_by_hand():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    emb = torch.tensor([[[0.5, 0.0], [3.0, 0.0]]])  # one image, two patches
    d, loc = knn(emb[0], bank, 1)
    patch, loc = d.T, loc.T
    torch.testing.assert_close(patch, torch.tensor([[0.5, 2.0]]))
    # The max patch (3, 0) has s* = 2 to m* = (1, 0), whose 3 nearest bank rows are (1,0), (0,0), (0,2);
    # the patch lies 2, 3 and sqrt(13) from them.
    w = 1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(math.sqrt(13)))
    got = anomaly_score(patch, loc, emb, bank, num_neighbors=3, chunk_size=2)
    assert got.item() == pytest.approx(w * 2, rel=1e-6)
    assert anomaly_score(patch, loc, emb, bank, num_neighbors=1).item() == pytest.approx(2.0)
    # More neighbours than bank rows: all four are used.
    w4 = 1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(math.sqrt(13)) + math.exp(math.sqrt(29)))
    assert anomaly_score(patch, loc, emb, bank, num_neighbors=9).item() == pytest.approx(w4 * 2, rel=1e-6)


@pytest.mark.parametrize("shape", [(2, 40, 33), (1, 5, 7)])
def test_blur_matches_scipy(shape):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = np.stack([gaussian_filter(m, sigma=4.0, mode="reflect") for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), ref, rtol=1e-10, atol=1e-12)


def textures(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random colour noise (bicubic-upsampled 8x8 grids) around mid-grey: the normal images."""
    x = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic",
                      align_corners=False)
    return (0.2 + 0.3 * x).clamp(0, 1)


def add_blobs(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One bright white disc (radius 4-8 px) per image, away from the border; images and masks."""
    n, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out, masks = x.clone(), []
    for i in range(n):
        cy, cx = torch.randint(12, h - 12, (2,), generator=g).tolist()
        r = 4 + 4 * torch.rand(1, generator=g).item()
        m = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()
        out[i] = out[i] * (1 - m) + m
        masks.append(m)
    return out, torch.stack(masks)


@pytest.fixture(scope="module")
def toy() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bad, masks = add_blobs(textures(20, 64, g), g)
    return {"train": textures(30, 64, g), "good": textures(20, 64, g), "bad": bad, "masks": masks}


def test_toy_detection_with_random_resnet18(toy, one_thread):
    """Random-weight ResNet-18 features are not semantic, but bright blobs on dim smooth textures differ
    clearly in intensity and local structure, which random conv features do pick up."""
    model = PatchCore(load_resnet("resnet18", "random", seed=0), coreset_ratio=0.1, device="cpu", chunk_size=256)
    model.fit(toy["train"])
    assert model.memory_bank.shape == (int(30 * 8 * 8 * 0.1), 128 + 256)
    scores, maps = model.predict(torch.cat([toy["good"], toy["bad"]]))
    assert scores.shape == (40,) and maps.shape == (40, 64, 64)
    labels = np.r_[np.zeros(20), np.ones(20)]
    assert roc_auc_score(labels, scores.numpy()) > 0.9
    assert roc_auc_score(toy["masks"].flatten().numpy(), maps[20:].flatten().numpy()) > 0.85


def test_fit_from_loader_target_dim_and_save_load(toy, one_thread, tmp_path):
    backbone = load_resnet("resnet18", "random", seed=2)  # the seed that load() rebuilds it with
    kw = dict(coreset_ratio=0.25, target_dim=64, device="cpu", seed=2)
    a = PatchCore(backbone, **kw).fit(toy["train"])
    loader = [(toy["train"][i:i + 7], torch.zeros(7)) for i in range(0, 30, 7)]
    b = PatchCore(backbone, **kw).fit(loader)
    assert a.memory_bank.shape[1] == 64 and torch.equal(a.memory_bank, b.memory_bank)
    uint8 = (toy["bad"][:3] * 255).round().to(torch.uint8)
    nhwc = uint8.permute(0, 2, 3, 1).numpy()
    s1, m1 = a.predict(uint8)
    s2, m2 = a.predict(nhwc)
    torch.testing.assert_close(s2, s1)  # the same up to conv rounding (NHWC memory layout)
    torch.testing.assert_close(m2, m1)
    a.save(tmp_path / "bank.safetensors")
    c = PatchCore.load(tmp_path / "bank.safetensors", weights="random", device="cpu")
    assert c.target_dim == 64 and c.seed == 2 and torch.equal(c.memory_bank, a.memory_bank)
    s3, m3 = c.predict(uint8)
    torch.testing.assert_close(s3, s1)
    torch.testing.assert_close(m3, m1)
    with pytest.raises(ValueError, match="seed 1"):
        PatchCore.load(tmp_path / "bank.safetensors", backbone=load_resnet("resnet18", "random", seed=1), device="cpu")
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(backbone, device="cpu").predict(uint8)
