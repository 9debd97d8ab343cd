"""Training throughput (images/s) and peak memory of AnomalyHybrid, one fresh process per config.

    python bench/bench_train.py                 # demo candidates + one paper-size step (CPU, ~3 min)
    python bench/bench_train.py --no-paper      # skip the paper-size step
    python bench/bench_train.py --device cuda --precision bf16 --paper-batch 8

Times full training steps (G update then D update, pix2pixHD losses) on random tensors; the VGG19 of
the perceptual loss has random weights (same cost as the real one); "none" rows use the pixel L1. Peak
memory is the process's max RSS on CPU and torch.cuda.max_memory_allocated on GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import resource
import time


def run(name: str, model: dict, ndf: int, size: int, batch: int, steps: int, perceptual: str, device: str,
        precision: str, threads: int) -> dict:
    import torch

    from hybrid.losses import VGGLoss
    from hybrid.models.discriminator import MultiscaleDiscriminator
    from hybrid.models.generator import Generator
    from hybrid.models.vgg import VGGFeatures
    from hybrid.train import TrainConfig, learns_key, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    cfg = TrainConfig(perceptual=perceptual, precision=precision, ndf=ndf,
                      lambda_l1=10.0 if perceptual == "none" else 0.0)
    G = Generator(**model).to(dev, memory_format=fmt)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, ndf).to(dev, memory_format=fmt)
    vgg = VGGLoss(VGGFeatures("vgg19")).to(dev, memory_format=fmt) if perceptual == "vgg19" else None
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    maps = {n: torch.rand(batch, 3 if n.endswith("image") else 1, size, size, device=dev) * 2 - 1
            for n in ("reference_image", "target_depth", "target_edge")}
    # each decoder's learning target (A_d, A_e): the image under its own condition's geometry
    maps |= {learns_key(d): torch.rand(batch, 3, size, size, device=dev) * 2 - 1 for d in G.decoder_names}
    maps = {k: v.contiguous(memory_format=fmt) for k, v in maps.items()}
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    train_step(G, D, vgg, opt_G, opt_D, maps, cfg, autocast)  # warm-up (allocations, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(G, D, vgg, opt_G, opt_D, maps, cfg, autocast)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"name": name, "size": size, "batch": batch, "perceptual": perceptual,
            "G_params": sum(p.numel() for p in G.parameters()), "D_params": sum(p.numel() for p in D.parameters()),
            "s_per_step": dt, "img_per_s": batch / dt, "peak_MiB": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-paper", action="store_true")
    ap.add_argument("--paper-batch", type=int, default=1)
    args = ap.parse_args()
    demo = {"ngf": 16, "n_downsample": 3, "n_blocks": 3}  # the recommended CPU demo (D ndf 16)
    jobs = [("demo", demo, 16, 64, 4, "none"), ("demo", demo, 16, 64, 4, "vgg19"), ("demo", demo, 16, 128, 4, "none")]
    if not args.no_paper:
        jobs.append(("paper", {}, 64, 256, args.paper_batch, "vgg19"))
    print(f"device {args.device}, {args.precision}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'config':8} {'size':>5} {'batch':>5} {'perceptual':>10} {'G params':>12} {'D params':>10} "
          f"{'s/step':>8} {'img/s':>7} {'peak MiB':>9}")
    for name, model, ndf, size, batch, perceptual in jobs:
        steps = 1 if name == "paper" else args.steps
        # a fresh process per config, so that max RSS is that config's peak
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            r = ex.submit(run, name, model, ndf, size, batch, steps, perceptual, args.device, args.precision,
                          args.threads).result()
        print(f"{r['name']:8} {r['size']:>5} {r['batch']:>5} {r['perceptual']:>10} {r['G_params']:>12,} "
              f"{r['D_params']:>10,} {r['s_per_step']:>8.3f} {r['img_per_s']:>7.2f} {r['peak_MiB']:>9.0f}",
              flush=True)


if __name__ == "__main__":
    main()
