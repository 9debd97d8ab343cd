"""Images/s of PiDiNet, original (pixel difference convs) vs converted (vanilla convs), on CPU fp32.

    python bench/bench_pidinet.py [--size 256] [--batches 1 8 16] [--min-time 1] [--threads N]

Random weights (speed does not depend on them), seeded; channels-first float input. images/cpu-s
(this process's CPU time) is the fairer number on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybrid.models.pidinet import build_pidinet, convert_pidinet


def throughput(model: torch.nn.Module, x: torch.Tensor, min_time: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) after one warm-up run."""
    with torch.no_grad():
        model(x)  # warm-up (kernel selection, allocations)
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while n == 0 or time.perf_counter() - start < min_time:
            model(x)
            n += 1
    images = n * x.shape[0]
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="pidinet", choices=["pidinet", "pidinet_small", "pidinet_tiny"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per row (at least one)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = build_pidinet(args.variant).eval()
    models = {"original": original, "converted": convert_pidinet(original).eval()}
    print(f"{args.variant} {args.size}x{args.size} fp32 CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'form':<10} {'batch':>5} {'images/s':>9} {'ms/image':>9} {'images/cpu-s':>12}")
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size)
        for form, model in models.items():
            ips, ipcs = throughput(model, x, args.min_time)
            print(f"{form:<10} {batch:>5} {ips:>9.2f} {1000 / ips:>9.1f} {ipcs:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
