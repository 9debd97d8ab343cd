"""Cluster LPIPS with cached features vs naive pairwise LPIPS calls, and Inception Score time; CPU fp32.

    python bench/bench_lpips.py [--size 256] [--n-gen 1000] [--n-centres 100] [--sub 8] [--threads N]

The protocol size (1,000 generated images, 100 centres, 256x256, VGG16) takes far too long to run
naively on a CPU, so each cost is timed on ``--sub`` images and extrapolated linearly:

- cached (hybrid.metrics.cluster_lpips): every image through the backbone once (t_feat per image),
  plus the inner products: a batch of generated images against all centres (timed as ``sub`` x
  ``2*sub`` and scaled with the number of centres read) and one n x n product per cluster (timed
  for one cluster of ``sub``, scaled with n). When the generated images' features do not fit in
  ``cache_bytes`` (VGG16 at 256x256: 30.5 MiB per image), the kept members are computed a second
  time: column "+recompute" adds a second forward pass of all generated images (the worst case).
- naive (AnomalyDiffusion cal_ic_lpips.py): one full LPIPS call (both images through the network)
  per (generated, centre) pair and per pair inside each cluster (t_pair).

Pairs inside clusters depend on the cluster sizes: 10 per cluster (1,000 spread over 100 centres)
gives 4,500 pairs; the row "worst" assumes 20 full clusters of 50 (24,500 pairs). A small
end-to-end cluster_lpips run checks the model of the cost. Random weights (speed does not depend
on them), seeded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hybrid.metrics.cluster_lpips import cluster_lpips
from hybrid.metrics.inception_score import compute_is, inception_score
from hybrid.metrics.lpips import LPIPS
from hybrid.models.inception import InceptionV3Compat


def timed(fn, repeats: int = 1, warmup: bool = True) -> float:
    """Seconds per call (after one warm-up call unless ``warmup=False``)."""
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-gen", type=int, default=1000)
    ap.add_argument("--n-centres", type=int, default=100)
    ap.add_argument("--sub", type=int, default=8, help="images per timed batch")
    ap.add_argument("--e2e-gen", type=int, default=16, help="generated images in the end-to-end check")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k, s, sub = args.n_gen, args.n_centres, args.size, args.sub
    metric = LPIPS("vgg")
    x = torch.rand(sub, 3, s, s) * 2 - 1
    y = torch.rand(sub, 3, s, s) * 2 - 1
    print(f"LPIPS vgg16 {s}x{s}, fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")

    with torch.no_grad():
        t_feat = timed(lambda: metric.features(x), warmup=False) / sub
        fx, fy = metric.features(x), metric.features(y)
        fc = [torch.cat([f, f]) for f in fy]  # 2*sub "centres"
        sq_c = metric.squared_norms(fc)
        t_assign = timed(lambda: metric.pairwise_from_features(fx, fc, sq_b=sq_c), repeats=2)  # sub x 2*sub
        t_self = timed(lambda: metric.pairwise_from_features(fx, fx), repeats=2)  # one cluster of sub
        t_pair = timed(lambda: metric(x, y), warmup=False) / sub
        exact = metric(x, y)
        d32 = metric.pairwise_from_features(fx, fy).diagonal()
    mb = sum(f[0].numel() * f.element_size() for f in fx) / 2**20
    print(f"per image: features {t_feat * 1e3:.0f} ms ({mb:.1f} MiB); full LPIPS call per pair {t_pair * 1e3:.0f} ms;\n"
          f"inner products: {sub} x {2 * sub} in {t_assign * 1e3:.0f} ms, {sub} x {sub} (one cluster) in "
          f"{t_self * 1e3:.0f} ms; max |pairwise fp32 - direct| = {float((d32 - exact).abs().max()):.1e}")

    rows = []
    for label, per_cluster, n_clusters in [("typical", n / k, k), ("worst", 50, n // 50)]:
        pairs = int(n_clusters * per_cluster * (per_cluster - 1) / 2)
        assign = (n / sub) * (k / (2 * sub)) * t_assign  # cost grows with the centres read per batch
        within = n_clusters * t_self * per_cluster / sub  # cost grows with the members read
        cached = (n + k) * t_feat + assign + within
        recompute = cached + n * t_feat
        naive = (n * k + pairs) * t_pair
        rows.append((label, pairs, cached, recompute, naive))
    print(f"\ncluster LPIPS, {n} generated, {k} centres (extrapolated from {sub}-image timings)")
    print(f"{'clusters':<9} {'pairs':>6} {'cached s':>9} {'+recompute s':>13} {'naive s':>9} {'speed-up':>9}")
    for label, pairs, cached, recompute, naive in rows:
        print(f"{label:<9} {pairs:>6} {cached:>9.0f} {recompute:>13.0f} {naive:>9.0f} {naive / recompute:>8.0f}x")

    e2e = args.e2e_gen
    gen = torch.rand(e2e, 3, s, s) * 2 - 1
    centres = torch.rand(2, 3, s, s) * 2 - 1
    start = time.perf_counter()
    out = cluster_lpips(gen, centres, metric, batch_size=sub, progress=False)
    took = time.perf_counter() - start
    model = (e2e + 2) * t_feat + (e2e / sub) * (2 / (2 * sub)) * t_assign + t_self * e2e / sub
    print(f"end-to-end check: {e2e} generated, 2 centres: {took:.1f} s measured, {model:.1f} s by the model "
          f"(features cached: {out['features_cached']})")

    torch.manual_seed(0)
    inception = InceptionV3Compat()
    images = np.random.default_rng(0).integers(0, 256, (sub, s, s, 3), dtype=np.uint8)
    t_is = timed(lambda: compute_is(images, inception, batch_size=sub, splits=2, progress=False), warmup=False) / sub
    logits = np.random.default_rng(1).standard_normal((n, 1008))
    t_formula = timed(lambda: inception_score(logits), repeats=3)
    print(f"\nInception Score, {n} images {s}x{s} (resized to 299): {t_is * 1e3:.0f} ms/image -> "
          f"{n * t_is:.0f} s extrapolated; the score from {n} logits takes {t_formula * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
