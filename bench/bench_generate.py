"""Generation throughput of AnomalyHybrid at 256x256: pairs/s and output images/s, fp32 by default.

    python bench/bench_generate.py                  # demo-size model, then the paper-size one (CPU, ~3 min)
    python bench/bench_generate.py --no-paper
    python bench/bench_generate.py --device cuda --precision bf16 --batches 1 8 32

Each pair gives one image per decoder (AHD and AHE). ``global`` times the generator alone on one
reference and one target per pair; ``local`` adds the region drawing and a random manipulation
(merge / remove / replace / tps) per pair on the CPU, as the generate stage does. Random weights
(the cost is the same as trained ones); inputs are synthetic scenes. The paper reports about
0.287 s per 256x256 image (AnomalyHybrid, its GPU).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from hybrid.manipulate import ManipulateConfig
from hybrid.models.generator import Generator
from hybrid.pipeline import generate_batch

PAPER_S_PER_IMAGE = 0.287
DEMO = {"ngf": 16, "n_downsample": 3, "n_blocks": 3}


def sample(rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
    """An elliptic object with nearness and rim edges, in [-1, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy, rx, ry = rng.uniform(0.35, 0.65, 2).tolist() + rng.uniform(0.2, 0.35, 2).tolist()
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    near = np.where(d < 1, 1 - d, 0.0)
    image = np.where(d[None] < 1, rng.uniform(-0.5, 0.9, (3, 1, 1)) * (0.4 + 0.6 * near), -0.8)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"image": t(image), "depth": t(near * 2 - 1)[None], "edge": t(np.where(abs(d - 1) < 0.02, 1.0, -1.0))[None]}


def run(name: str, model: dict, size: int, batch: int, kind: str, reps: int, device: str, precision: str) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    G = Generator(**model).to(dev, memory_format=fmt).eval()
    rng = np.random.default_rng(0)
    refs, tgts = [sample(rng, size) for _ in range(batch)], [sample(rng, size) for _ in range(batch)]
    names = ["merge", "remove", "replace", "tps"]
    manips = ["none"] * batch if kind == "global" else [names[i % 4] for i in range(batch)]
    cfg = ManipulateConfig()

    def once(r: int) -> None:
        generate_batch(G, refs, tgts, manips, [r * batch + i for i in range(batch)], cfg, precision)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    once(0)  # warm-up
    t0 = time.perf_counter()
    for r in range(reps):
        once(r + 1)
    s_per_pair = (time.perf_counter() - t0) / (reps * batch)
    return {"name": name, "kind": kind, "batch": batch, "params_M": sum(p.numel() for p in G.parameters()) / 1e6,
            "s_per_pair": s_per_pair, "pairs_per_s": 1 / s_per_pair, "images_per_s": len(G.decoder_names) / s_per_pair}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="demo-model batch sizes")
    ap.add_argument("--paper-batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-paper", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    jobs = [("demo", DEMO, b, k, args.reps) for b in args.batches for k in ("global", "local")]
    if not args.no_paper:
        jobs += [("paper", {}, b, "global", max(1, args.reps - 1)) for b in args.paper_batches]
        jobs += [("paper", {}, args.paper_batches[0], "local", 1)]
    print(f"device {args.device}, {args.precision}, {args.size}x{args.size}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}; paper: {PAPER_S_PER_IMAGE} s/image")
    print(f"{'model':6} {'kind':7} {'batch':>5} {'params M':>9} {'s/pair':>8} {'pairs/s':>8} {'img/s':>7} "
          f"{'vs paper':>9}")
    for name, model, batch, kind, reps in jobs:
        r = run(name, model, args.size, batch, kind, reps, args.device, args.precision)
        ratio = PAPER_S_PER_IMAGE * r["images_per_s"]  # > 1: faster than the paper per output image
        print(f"{r['name']:6} {r['kind']:7} {r['batch']:5d} {r['params_M']:9.2f} {r['s_per_pair']:8.3f} "
              f"{r['pairs_per_s']:8.2f} {r['images_per_s']:7.2f} {ratio:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
