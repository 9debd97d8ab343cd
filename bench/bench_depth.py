"""Throughput of Depth Anything V2 Small (random weights, the real architecture) in predict_depth.

Times the whole call (preprocessing to 518x518, the model, bicubic resize back) on uint8 inputs.

    python bench/bench_depth.py                       # CPU, 256x256, batch 1 and 4, fp32
    python bench/bench_depth.py --device cuda --precision bf16 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

from hybrid.models.depth import predict_depth, resize_output_size


def small_config() -> DepthAnythingConfig:
    """depth-anything/Depth-Anything-V2-Small-hf's config.json (ViT-S/14 DINOv2 backbone)."""
    backbone = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
        out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64, head_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5],
    )


def bench(model, batch: int, size: int, precision: str, device: str, repeats: int) -> tuple[float, float]:
    """Images per second (wall clock) and process CPU seconds per image, over ``repeats`` timed
    calls after one warm-up call. CPU time shows the cost even when other jobs share the cores."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    predict_depth(model, images, precision=precision)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        predict_depth(model, images, precision=precision)
    sync()
    n = batch * repeats
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--size", type=int, default=256, help="square input side (resized to 518 inside)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(small_config()).to(args.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    h, w = resize_output_size(args.size, args.size)
    print(f"Depth Anything V2 Small, random weights, {n_params / 1e6:.1f}M parameters; "
          f"{args.size}x{args.size} -> {h}x{w}; device {args.device}, {args.precision}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'batch':>5} {'images/s':>9} {'s/image':>8} {'cpu s/image':>11}")
    for b in args.batch_sizes:
        ips, cpu = bench(model, b, args.size, args.precision, args.device, args.repeats)
        print(f"{b:>5} {ips:>9.2f} {1 / ips:>8.3f} {cpu:>11.3f}")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
