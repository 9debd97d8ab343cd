"""PatchCore fit and inference time per category, and memory bank size against the coreset ratio.

    python bench/bench_patchcore.py                      # WRN-50-2, 256 px, 30 train / 10 test images
    python bench/bench_patchcore.py --arch resnet18 --train 50 --ratios 0.01 0.1
    python bench/bench_patchcore.py --device cuda

Random weights (the timing does not depend on them) and synthetic 256 px images. Fit = embedding
the training images + the greedy coreset; they are timed apart because they scale differently with
the number of training images N (P patches per image): embedding linearly, the coreset as
(ratio x N x P selections) x (one pass over all N x P projected patches each), i.e. up to N^2.
Inference per image = embedding + the nearest-neighbour search against the bank (ratio x N x P
rows), linear in N.

For a full category (``--extrapolate``, default 200 and 400 training images) nothing is scaled
from the small run but the embedding: the script builds random patch features of the full size
(N x P x dims), times the projection and a few hundred coreset selections on them (seconds per
selection at that size, then x the number of selections) and the search of one test image's
patches against a bank of the full size.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from functools import partial

import torch
import torch.nn.functional as F

from hybrid.models.patchcore import PatchCore, anomaly_score, greedy_coreset, knn


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth colour textures (bicubic-upsampled 8x8 noise) in 0..1, as the PatchCore tests use."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    return (0.2 + 0.6 * x).clamp(0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wide_resnet50_2")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--train", type=int, default=30, help="training images (N)")
    p.add_argument("--test", type=int, default=10)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1, 0.25])
    p.add_argument("--extrapolate", type=int, nargs="+", default=[200, 400], help="category sizes to extrapolate to")
    p.add_argument("--probe", type=int, default=200, help="coreset selections timed at the full size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = PatchCore(args.arch, device=device, weights="random", batch_size=args.batch_size)
    train, test = images(args.train, args.size, 0), images(args.test, args.size, 1)

    model.embed(train[:1])  # warm-up
    emb, t_embed = timed(lambda: torch.cat([model.embed(train[i:i + args.batch_size]).flatten(0, 2)
                                           for i in range(0, args.train, args.batch_size)]), device)
    n_patches, dim = emb.shape
    per_image = n_patches // args.train
    test_emb, t_test_embed = timed(lambda: [model.embed(test[i:i + args.batch_size])
                                            for i in range(0, args.test, args.batch_size)], device)
    print(f"# PatchCore {args.arch} ({model.backbone.weights_label}), layers {model.layers}, {args.size} px, "
          f"{device}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print(f"embedding: {per_image} patches x {dim} dims per image; {args.train} train images "
          f"{t_embed:.2f} s ({t_embed / args.train:.3f} s/image), test {t_test_embed / args.test:.3f} s/image; "
          f"all train patches {n_patches} = {emb.numel() * 4 / 2**20:.0f} MiB")

    def infer_one(e: torch.Tensor, bank: torch.Tensor) -> None:
        b, h, w, d = e.shape
        dist, loc = knn(e.reshape(-1, d), bank, 1, model.chunk_size)
        anomaly_score(dist.reshape(b, -1), loc.reshape(b, -1), e.reshape(b, h * w, d), bank,
                      model.num_neighbors, model.chunk_size)

    def infer(bank: torch.Tensor) -> None:
        for e in test_emb:
            infer_one(e, bank)

    rows = []
    half = emb[: n_patches // 2]
    for ratio in args.ratios:
        n, n_half = max(1, int(n_patches * ratio)), max(1, int(len(half) * ratio))
        _, t_half = timed(partial(greedy_coreset, half, n_half, model.projection_dim), device)
        keep, t_core = timed(partial(greedy_coreset, emb, n, model.projection_dim), device)
        bank = emb[keep]
        _, t_knn = timed(partial(infer, bank), device)
        rows.append({"ratio": ratio, "bank": len(bank), "bank_mib": bank.numel() * 4 / 2**20, "coreset_s": t_core,
                     "coreset_half_s": t_half, "fit_s": t_embed + t_core,
                     "infer_s": (t_test_embed + t_knn) / args.test})

    print(f"\nN = {args.train} training images:")
    print("| coreset ratio | bank rows | bank MiB | coreset s (N/2 images) | coreset s (N) | ms per selection (N) "
          "| fit s | inference s/image |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']:g} | {r['bank']:,} | {r['bank_mib']:.1f} | {r['coreset_half_s']:.2f} | "
              f"{r['coreset_s']:.2f} | {1000 * r['coreset_s'] / r['bank']:.2f} | {r['fit_s']:.1f} | "
              f"{r['infer_s']:.3f} |")

    print(f"\nA full category, timed on random features of its size ({args.probe} coreset selections, one test "
          f"image's search), embedding scaled from above ({t_embed / args.train:.3f} s/image):")
    print("| N train | train patches | patches MiB | projection s | ms per selection | coreset ratio | bank rows "
          "| bank MiB | fit min | inference s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cpu").manual_seed(0)
    for big in args.extrapolate:
        patches = big * per_image
        feats = torch.randn(patches, dim, generator=g).to(device)
        _, t_proj = timed(partial(greedy_coreset, feats, 1, model.projection_dim), device)
        _, t_probe = timed(partial(greedy_coreset, feats, args.probe + 1, model.projection_dim), device)
        per_sel = max(0.0, t_probe - t_proj) / args.probe
        query = test_emb[0][:1]
        for ratio in args.ratios:
            sel = max(1, int(patches * ratio))
            bank = feats[:sel]
            _, t_search = timed(partial(infer_one, query, bank), device)
            fit = t_embed / args.train * big + t_proj + sel * per_sel
            print(f"| {big} | {patches:,} | {patches * dim * 4 / 2**20:,.0f} | {t_proj:.1f} | {1000 * per_sel:.1f} | "
                  f"{ratio:g} | {sel:,} | {sel * dim * 4 / 2**20:,.0f} | {fit / 60:.1f} | "
                  f"{t_test_embed / args.test + t_search:.2f} |")
        del feats
    print(f"\npeak RSS {peak_mib():.0f} MiB" + (f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                                               if device.type == "cuda" else ""))
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
