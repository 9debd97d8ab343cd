"""Throughput of the segment stage's networks, and an estimate of the stage for one category.

    python bench/bench_segment.py                      # DRAEM and U-Net, base 64, 256 px, CPU (~3 min)
    python bench/bench_segment.py --steps 3 --archs draem
    python bench/bench_segment.py --device cuda --precision bf16

Times full training steps of the stage (batch assembly from uint8 arrays, forward, focal loss,
backward, Adam) and batched inference (forward + softmax + the resize back), on random images, each
architecture in a fresh process. Peak memory: max RSS on CPU, torch.cuda.max_memory_allocated on GPU.
"CPU s / train image" is the process's CPU time per training image (with --threads 1 close to the
wall time on an idle core, whatever else the machine runs).
Then extrapolates the stage for one MVTec AD category at the paper protocol (see ``estimate``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import resource
import time


def run(arch: str, width: int, size: int, batch: int, steps: int, eval_batch: int, device: str, precision: str,
        threads: int) -> dict:
    import numpy as np
    import torch

    from hybrid.stages.segment import (
        Pool,
        SegmentConfig,
        anomaly_probs,
        build_model,
        epoch_plan,
        focal_loss,
        make_batch,
        predict,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    cfg = SegmentConfig(arch=arch, base_width=width, batch_size=batch, eval_batch_size=eval_batch, device=device,
                        precision=precision)
    rng = np.random.default_rng(0)
    normals = Pool(rng.integers(0, 255, (16, size, size, 3), dtype=np.uint8))
    anomalies = Pool(rng.integers(0, 255, (16, size, size, 3), dtype=np.uint8),
                     (rng.random((16, size, size)) < 0.05).astype(np.uint8) * 255)
    model = build_model(cfg, 3).to(dev, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    plan = epoch_plan(0, 0, batch * (steps + 1), len(normals), len(anomalies), cfg)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(k: int) -> None:
        x, y = make_batch(normals, anomalies, plan, k * batch, (k + 1) * batch, size)
        with autocast:
            out = model(x.to(dev, memory_format=fmt))
        loss = focal_loss(anomaly_probs(out), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step(0)  # warm-up
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(1, steps + 1):
        step(k)
    sync()
    train_s, train_cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    images = rng.integers(0, 255, (2 * eval_batch, size, size, 3), dtype=np.uint8)
    predict(model, images[:eval_batch], size, cfg, dev, precision)  # warm-up
    sync()
    t0 = time.perf_counter()
    predict(model, images, size, cfg, dev, precision)
    sync()
    infer_s = (time.perf_counter() - t0) / len(images)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"arch": arch, "width": width, "size": size, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "s_per_step": train_s, "train_img_s": batch / train_s, "infer_img_s": 1 / infer_s, "peak_MiB": peak,
            "cpu_s_per_train_img": train_cpu / batch}


def estimate(r: dict, epochs: int = 200, epoch_length: int = 500, models: int = 6, test_images: int = 100) -> dict:
    """One MVTec AD category at the paper protocol: ``models`` trainings (AHD, AHE, both, each with and
    without generated normals) of epochs x epoch_length samples, plus scoring ``test_images`` per model."""
    per_model = epochs * epoch_length / r["train_img_s"]
    scoring = models * test_images / r["infer_img_s"]
    return {"per_model_h": per_model / 3600, "category_h": (models * per_model + scoring) / 3600}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["draem", "unet"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    print("| arch | width | size | batch | params | s/step | train images/s | inference images/s | peak MiB | "
          "CPU s / train image | h per model (200 x 500) | h per category (6 models + 100 test images each) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in a.archs:
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
            r = ex.submit(run, arch, a.width, a.size, a.batch, a.steps, a.eval_batch, a.device, a.precision,
                          a.threads).result()
        e = estimate(r)
        print(f"| {r['arch']} | {r['width']} | {r['size']} | {r['batch']} | {r['params']:,} | {r['s_per_step']:.2f} | "
              f"{r['train_img_s']:.2f} | {r['infer_img_s']:.2f} | {r['peak_MiB']:.0f} | "
              f"{r['cpu_s_per_train_img']:.2f} | "
              f"{e['per_model_h']:.1f} | "
              f"{e['category_h']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
