"""Demo generation time, and ingest + preprocess throughput for demo-sized and large JPEGs.

    python bench/bench_preprocess.py [--large 8] [--workers 2]

Prints images/s and the process's peak memory (ru_maxrss, children included for workers).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from hybrid.data.demo import DemoConfig, make_demo
from hybrid.data.readers import read_dataset
from hybrid.stages.preprocess import PreprocessConfig
from hybrid.stages.preprocess import run as preprocess


def peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def large_jpegs(folder: Path, n: int, size=(3500, 5000)) -> None:
    """Photo-like (smooth, textured) 5000x3500 JPEGs, as a camera writes them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    small = rng.integers(0, 256, (size[0] // 50, size[1] // 50, 3), dtype=np.uint8)
    base = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    for i in range(n):
        noise = rng.integers(-8, 9, base.shape, dtype=np.int16)
        img = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), np.roll(img, 37 * i, axis=1), [cv2.IMWRITE_JPEG_QUALITY, 92])


def run(name: str, manifest, out: Path, workers: int, resolution: int) -> None:
    cfg = PreprocessConfig(resolution=resolution, edge_model="canny",
                           depth_source="dataset" if manifest["depth_path"].notna().all() else "none",
                           workers=workers, batch_size=16, device="cpu")
    t = time.perf_counter()
    preprocess(manifest, out, cfg)
    dt = time.perf_counter() - t
    print(f"| {name} | {len(manifest)} | {resolution} | {workers} | {len(manifest) / dt:.1f} | {peak_mib():.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", type=int, default=8, help="number of 5000x3500 JPEGs")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        summary = make_demo(tmp / "demo", DemoConfig())
        print(f"demo generation: {summary['images']} images in {time.perf_counter() - t:.1f} s\n")
        print("| input | images | resolution | workers | images/s | peak MiB |\n|---|---|---|---|---|---|")
        t = time.perf_counter()
        demo = read_dataset("demo", {"image_dir": tmp / "demo/images",
                                     "train_csv": tmp / "demo/butterfly_anomaly_train.csv",
                                     "reference_csvs": {"test": tmp / "demo/ref_test.csv"},
                                     "depth_dir": tmp / "demo/depth"})
        print(f"(ingest of the demo: {time.perf_counter() - t:.2f} s)")
        for res in (64, 256):
            run("demo 384x256 JPEG + xyz tiff", demo, tmp / f"shards-demo-{res}", args.workers, res)
        large_jpegs(tmp / "large", args.large)
        big = read_dataset("folder", {"normal_dir": tmp / "large"})
        run("5000x3500 JPEG", big, tmp / "shards-large", args.workers, 256)
        run("5000x3500 JPEG", big, tmp / "shards-large-0", 0, 256)


if __name__ == "__main__":
    main()
