"""Cluster LPIPS vs a brute-force evaluation that calls the full LPIPS network on every pair."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from hybrid.metrics.cluster_lpips import cluster_lpips
from hybrid.metrics.lpips import LPIPS


@pytest.fixture(scope="module")
def metric() -> LPIPS:
    torch.manual_seed(0)
    m = LPIPS("alex")
    for w in m.lins.weights():
        w.abs_()
    return m


def _near_copies(centres: torch.Tensor, which: list[int], noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = centres[which] + noise * torch.randn(len(which), *centres.shape[1:], generator=g)
    return x.clamp(-1, 1)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    near = _near_copies(centres, [0] * 7 + [1] * 5 + [2] * 2 + [3], noise=0.2, seed=2)
    far = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    return torch.cat([near, far]), centres


@torch.no_grad()
def _lpips_matrix(metric, a, b) -> np.ndarray:
    """LPIPS of every pair (a_i, b_j), each one a full network call on both images (batched)."""
    i, j = np.divmod(np.arange(len(a) * len(b)), len(b))
    return metric(a[i], b[j]).view(len(a), len(b)).numpy()


def _brute_force(metric, gen, centres, cap, min_size, seed):
    """The AnomalyDiffusion loops, without feature reuse."""
    assignment = _lpips_matrix(metric, gen, centres).argmin(axis=1)
    pair = _lpips_matrix(metric, gen, gen)
    rng = np.random.default_rng(seed)
    values = []
    for k in range(len(centres)):
        members = rng.permutation(np.flatnonzero(assignment == k))[:cap]
        pairs = [pair[i, j] for i, j in combinations(members, 2)]
        values.append(float(np.mean(pairs)) if len(members) >= min_size else math.nan)
    return assignment, values


@pytest.mark.parametrize("cap,min_size,seed", [(50, 2, 0), (3, 3, 5)])
def test_matches_brute_force(metric, data, cap, min_size, seed):
    gen, centres = data
    assignment, values = _brute_force(metric, gen, centres, cap, min_size, seed)
    out = cluster_lpips(gen, centres, metric, cap=cap, min_size=min_size, seed=seed, batch_size=4)
    np.testing.assert_array_equal(out["assignment"], assignment)
    np.testing.assert_allclose(out["per_cluster"], values, atol=1e-5)
    used = [v for v in values if not math.isnan(v)]
    assert out["n_clusters_used"] == len(used)
    assert out["score"] == pytest.approx(np.mean(used), abs=1e-5)
    assert out["cluster_sizes"] == np.bincount(assignment, minlength=len(centres)).tolist()


def test_each_image_joins_its_nearest_centre(metric, data):
    _, centres = data
    which = [2, 0, 3, 3, 1, 0, 2]
    out = cluster_lpips(_near_copies(centres, which, noise=0.05, seed=3), centres, metric)
    assert out["assignment"].tolist() == which
    assert out["cluster_sizes"] == [2, 1, 2, 2]


def test_small_clusters_are_dropped(metric, data):
    _, centres = data
    gen = _near_copies(centres, [0] * 5 + [1], noise=0.05, seed=4)
    out = cluster_lpips(gen, centres, metric)
    assert out["cluster_sizes"] == [5, 1, 0, 0]
    assert out["n_clusters_used"] == 1
    assert [math.isnan(v) for v in out["per_cluster"]] == [False, True, True, True]
    assert out["score"] == out["per_cluster"][0] > 0
    none = cluster_lpips(gen, centres, metric, min_size=6)
    assert none["n_clusters_used"] == 0 and math.isnan(none["score"])


def test_cap_keeps_a_seeded_random_subset(metric, data):
    gen, centres = data
    gen = gen[:7]  # seven near-copies of centre 0: 21 pairs
    pair = _lpips_matrix(metric, gen, gen)
    pair_values = [pair[i, j] for i, j in combinations(range(7), 2)]
    results = [cluster_lpips(gen, centres, metric, cap=2, seed=s)["per_cluster"][0] for s in range(4)]
    for v in results:  # with cap 2 a cluster's value is the LPIPS of one pair of its members
        assert min(abs(v - p) for p in pair_values) < 1e-5
    assert len({round(v, 6) for v in results}) > 1  # different seeds pick different pairs
    again = cluster_lpips(gen, centres, metric, cap=2, seed=2)
    assert again["per_cluster"][0] == results[2]
    full = cluster_lpips(gen, centres, metric, cap=7)["per_cluster"][0]
    assert full == pytest.approx(np.mean(pair_values), abs=1e-5)


def test_recomputing_features_equals_caching_them(metric, data):
    gen, centres = data
    cached = cluster_lpips(gen, centres, metric, cap=3, seed=7)
    recomputed = cluster_lpips(gen, centres, metric, cap=3, seed=7, cache_bytes=0)
    assert cached["features_cached"] and not recomputed["features_cached"]
    np.testing.assert_allclose(recomputed["per_cluster"], cached["per_cluster"], rtol=1e-6)


def test_uint8_images_give_the_float_result(metric):
    rng = np.random.default_rng(8)
    gen_u8 = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    cen_u8 = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    as_float = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    a = cluster_lpips(gen_u8, cen_u8, metric)
    b = cluster_lpips(as_float(gen_u8), as_float(cen_u8), metric)
    assert a["assignment"].tolist() == b["assignment"].tolist()
    np.testing.assert_allclose(a["per_cluster"], b["per_cluster"], rtol=1e-6)


def test_bad_arguments_are_named(metric, data):
    gen, centres = data
    with pytest.raises(ValueError, match="at least 2"):
        cluster_lpips(gen, centres, metric, cap=1)
    with pytest.raises(ValueError, match="resize"):
        cluster_lpips(gen[:, :, :16, :16], centres, metric)
    with pytest.raises(ValueError, match="centres"):
        cluster_lpips(gen, centres[:0], metric)


def test_precomputed_features_give_the_same_result_without_recomputing(metric, data, monkeypatch):
    """The evaluate stage scores AHD, AHE and both against one set of centres: features computed
    once and passed in must give exactly what cluster_lpips computes itself."""
    import hybrid.metrics.cluster_lpips as cl

    gen, centres = data
    plain = cl.cluster_lpips(gen, centres, metric, cap=50, seed=1, progress=False)
    cf, gf = cl.lpips_features(metric, centres), cl.lpips_features(metric, gen)
    calls = []
    monkeypatch.setattr(cl, "lpips_features", lambda *a, **k: calls.append(1))
    given = cl.cluster_lpips(gen, centres, metric, cap=50, seed=1, progress=False, centre_features=cf,
                             generated_features=gf)
    assert calls == []
    assert given["score"] == pytest.approx(plain["score"], rel=1e-6)
    np.testing.assert_array_equal(given["assignment"], plain["assignment"])
