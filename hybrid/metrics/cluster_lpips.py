"""Cluster LPIPS (intra-cluster LPIPS), the diversity metric of DFMGAN, AnomalyDiffusion and AnomalyHybrid.

Protocol (AnomalyDiffusion ``cal_ic_lpips.py``; AH/AF use 1,000 generated images and 100 real
test anomalies as centres): every generated image joins the centre with the lowest LPIPS; each
cluster is shuffled (seeded) and cut to ``cap`` members; a cluster's value is the mean LPIPS over
all its unordered pairs; clusters with fewer than ``min_size`` members are dropped (NaN); the score
is the mean over the remaining clusters.

Each image goes through the backbone once (see ``cache_bytes``); distances come from those
features as inner products (:meth:`LPIPS.pairwise_from_features`), a block of generated images
against all centres at a time, then one n x n product per cluster. The centres' features stay on
``device`` throughout; the generated images' features are kept on the CPU when they fit in
``cache_bytes``, otherwise the kept members of each cluster are computed once more when their
cluster is scored. Memory per image is the size of all LPIPS feature maps in float32: VGG16
488*H*W bytes (30.5 MiB at 256x256: 100 centres 3 GiB, 1,000 generated images 30 GiB, so
recomputed by default), AlexNet 2.6 MB, SqueezeNet 1.1 8.8 MB at 256x256.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from hybrid.metrics.lpips import LPIPS, to_lpips_input

Images = np.ndarray | torch.Tensor


@torch.no_grad()
def lpips_features(metric: LPIPS, images: Images, index: np.ndarray | None = None, batch_size: int = 16,
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Per-layer LPIPS features of ``images[index]`` (all images when None) on ``device``, batched.
    Compute them once and pass them to :func:`cluster_lpips` to score several subsets."""
    index = np.arange(len(images)) if index is None else index
    chunks = [metric.features(to_lpips_input(images[index[i : i + batch_size]]).to(device))
              for i in range(0, len(index), batch_size)]
    return [torch.cat(layer) for layer in zip(*chunks)]


def _mean_pairwise(d: torch.Tensor) -> float:
    """Mean of the strict upper triangle of a square distance matrix."""
    i, j = torch.triu_indices(len(d), len(d), offset=1)
    return float(d[i, j].double().mean())


@torch.no_grad()
def cluster_lpips(
    generated: Images,
    centres: Images,
    metric: LPIPS,
    cap: int = 50,
    min_size: int = 2,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    cache_bytes: int = 4 * 2**30,
    progress: bool = True,
    centre_features: list[torch.Tensor] | None = None,
    generated_features: list[torch.Tensor] | None = None,
) -> dict:
    """Cluster LPIPS of ``generated`` around ``centres``.

    Images: float (N,3,H,W) in [-1,1] or uint8 (N,H,W,3), all of one size. Returns
    ``score`` (NaN when no cluster has ``min_size`` members), ``n_clusters_used``,
    ``cluster_sizes`` (members per centre before the cap), ``per_cluster`` (value per centre, NaN
    when dropped), ``assignment`` (centre index per generated image) and ``features_cached``
    (whether the generated images' features fitted in ``cache_bytes``; else they were recomputed).
    ``centre_features`` / ``generated_features``: the images' :func:`lpips_features`, already
    computed (the caller scores several subsets against the same centres); then not recomputed.
    """
    if cap < 2 or min_size < 2:
        raise ValueError(f"cap ({cap}) and min_size ({min_size}) must be at least 2: a cluster value needs a pair")
    n_gen, n_centres = len(generated), len(centres)
    if n_gen == 0 or n_centres == 0:
        raise ValueError(f"cluster LPIPS needs generated images and centres; got {n_gen} and {n_centres}")
    size_gen, size_centres = to_lpips_input(generated[:1]).shape[2:], to_lpips_input(centres[:1]).shape[2:]
    if size_gen != size_centres:
        raise ValueError(f"generated images are {tuple(size_gen)} but centres are {tuple(size_centres)}; "
                         "resize both to one size (the protocol uses 256x256)")
    metric = metric.to(device).eval()

    centre_feats = centre_features if centre_features is not None else lpips_features(
        metric, centres, None, batch_size, device)
    centre_sq = metric.squared_norms(centre_feats)
    per_image = sum(f[0].numel() * f.element_size() for f in centre_feats)
    keep = generated_features is not None or n_gen * per_image <= cache_bytes

    assignment = np.empty(n_gen, dtype=np.int64)
    given = generated_features is not None
    gen_feats = generated_features if given else (
        [f.new_empty((n_gen, *f.shape[1:]), device="cpu") for f in centre_feats] if keep else None)
    for i in tqdm(range(0, n_gen, batch_size), desc="cluster LPIPS: assign", disable=not progress):
        idx = np.arange(i, min(i + batch_size, n_gen))
        if given:
            feats = [f[i : i + len(idx)].to(device) for f in gen_feats]
        else:
            feats = lpips_features(metric, generated, idx, batch_size, device)
        d = metric.pairwise_from_features(feats, centre_feats, sq_b=centre_sq)
        assignment[idx] = d.argmin(dim=1).cpu().numpy()
        for cache, f in zip(gen_feats if keep and not given else [], feats):
            cache[i : i + len(idx)] = f.cpu()
    del centre_feats

    rng = np.random.default_rng(seed)
    sizes, values = [], []
    for k in tqdm(range(n_centres), desc="cluster LPIPS: clusters", disable=not progress):
        members = np.flatnonzero(assignment == k)
        sizes.append(len(members))
        members = rng.permutation(members)[:cap]
        if len(members) < min_size:
            values.append(math.nan)
            continue
        if gen_feats is not None:
            feats = [f[torch.from_numpy(members)].to(device) for f in gen_feats]
        else:
            feats = lpips_features(metric, generated, members, batch_size, device)
        values.append(_mean_pairwise(metric.pairwise_from_features(feats, feats)))

    used = [v for v in values if not math.isnan(v)]
    return {
        "score": float(np.mean(used)) if used else math.nan,
        "n_clusters_used": len(used),
        "cluster_sizes": sizes,
        "per_cluster": values,
        "assignment": assignment,
        "features_cached": keep,
    }
