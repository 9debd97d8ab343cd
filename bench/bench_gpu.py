"""Every stage end to end next to its model alone: where the time between model and stage goes.

    python bench/bench_gpu.py --device cpu --threads 1          # demo model, 96 images at 64 px (~2 min)
    python bench/bench_gpu.py --device cuda --precision bf16    # paper size: 2048 1024 px JPEGs, 256 px (~5 min)
    python bench/bench_gpu.py --device cpu --threads 1 --size 256 --model tiny --edge canny \
        --images 256 --stages preprocess generate --profile    # the generate stage's host side
    python bench/bench_gpu.py --device cpu --threads 1 --edge canny --scaling 1000 10000  # memory vs data
    python bench/bench_gpu.py --device cuda --flops   # GFLOP per image and the goals' TFLOP/s (seconds, any machine)

On a CPU shared with other processes use ``--threads 1``: with every core busy, torch's OpenMP
threads wait for each other and elementwise work can take many times longer.

Builds a synthetic data set first: N images (an object on a textured table, with its height map)
of ``--source-size`` pixels, written as PNGs or as JPEGs (on a GPU by default 1024 x 1024 JPEGs,
the issue's preprocess setting, decoded at reduced size), plus MVTec-3D-style xyz TIFFs where the
depth source is the data set's, read back by the ``folder`` layout reader into a manifest. Then
runs each stage's real code path, each in a fresh process so that its peak memory is its own:
preprocess (:func:`hybrid.stages.preprocess.run`), train
(:func:`hybrid.stages.train.run` for ``--train-steps`` steps), generate
(:func:`hybrid.stages.generate.run` from the trained checkpoint) and evaluate
(:func:`hybrid.stages.evaluate.run`). Beside each stage: its model alone on the same batch (PiDiNet
or Canny, the train step on random tensors, the generator's forward, Inception-v3), so the gap
between the model and the stage is visible. Feature networks have random weights (same cost).

Columns: ``img/s`` over the whole stage call (set-up and writing included), ``steady`` the
rate after the first batch, ``main ms/img`` the main process's CPU time (all its threads) outside
the model calls per image (with one torch thread a model call counts its own thread's CPU time
only, so a writer thread's work meanwhile stays host time), ``host ms/img`` the same plus the
DataLoader workers' CPU time, ``peak MiB`` torch.cuda.max_memory_allocated on a GPU and the larger
of the process's and its children's max RSS on a CPU. On a GPU the CPU figures include time
spent waiting for the device. A second table gives each stage's network GFLOP per image (counted
on the meta device by torch's FlopCounterMode) and the TFLOP/s the stage, its model alone and the
issue's goal amount to: the distance from the hardware, beside the distance from the model.

``--scaling N1 N2 ...`` runs only preprocess and generate at each size (a random-weight generator,
N generated images) and prints their peak memory: flat when memory does not grow with the data.
``--profile`` prints the generate stage's host time per image with workers 0 and one thread (all
host work in one process): over the whole call, and from the end of the first batch to the end
of the last (the per-image work: start-up, the manifest and the sheets left out); then the top
functions by own CPU time, the generator's forward excluded.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import cProfile
import io
import json
import math
import multiprocessing as mp
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO = {"ngf": 16, "n_downsample": 3, "n_blocks": 3}  # the CPU demo's generator (config/config.yaml)
PAPER: dict = {}  # the Generator defaults: ngf 64, 4 down, 9 blocks (201 M parameters)
TINY = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}  # the tests' generator: host costs stand out
MODELS = {"demo": DEMO, "paper": PAPER, "tiny": TINY}


# ----------------------------------------------------------------------------- synthetic data
def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic object with a shaded top on a textured table: RGB uint8 and distance z (m)."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    cx, cy = rng.uniform(0.35, 0.65, 2)
    rx, ry = rng.uniform(0.18, 0.32, 2)
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    height = np.clip(1 - d, 0, None) * rng.uniform(0.01, 0.03)  # metres above the table
    cells = rng.standard_normal((8, 8)).astype(np.float32)
    import cv2

    texture = cv2.resize(cells, (size, size), interpolation=cv2.INTER_CUBIC)
    table = rng.uniform(60, 120) + 12 * texture
    colour = rng.uniform(40, 230, 3).astype(np.float32)
    shade = 0.55 + 0.45 * np.clip(1 - d, 0, 1)
    rgb = np.where((d < 1)[..., None], colour * shade[..., None], table[..., None])
    rgb[np.abs(d - 1) < 0.03] = 20  # a dark rim: edges to find
    rgb += rng.normal(0, 3, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8), (0.3 - height).astype(np.float32)


def make_data(root: Path, n: int, size: int, seed: int = 0, fmt: str = "png", xyz: bool = True):
    """``n`` normal images of ``size`` x ``size`` pixels (``fmt``: png, or jpg at quality 92 as a
    camera writes them), ``max(4, n // 16)`` anomalies with PNG masks, and with ``xyz`` an xyz TIFF
    per image under ``root``; returns the manifest path (the ``folder`` layout reader's rows, plus
    depth_path with ``xyz``)."""
    import cv2
    import pandas as pd

    from hybrid.data.demo import xyz_from_z
    from hybrid.data.readers import read_dataset
    from hybrid.data.xyz import write_xyz
    from hybrid.io import write_parquet_atomic

    if fmt not in ("png", "jpg"):
        raise ValueError(f"--source-format {fmt!r}: png or jpg")
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if fmt == "jpg" else []
    for sub in ("normal", "abnormal/blob", "masks/blob", "xyz"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    n_bad = max(4, n // 16)

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        rgb, z = _scene(rng, size)
        name = f"{i:06d}"
        if i >= n:  # an anomaly: a dark blob on the object, and its mask
            mask = np.zeros((size, size), np.uint8)
            c = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
            cv2.circle(mask, c, max(2, size // 16), 255, -1)
            rgb[mask > 0] //= 3
            if not cv2.imwrite(str(root / "masks/blob" / f"{name}_mask.png"), mask):
                raise OSError(f"could not write {root / 'masks'}")
        folder = root / ("normal" if i < n else "abnormal/blob")
        if not cv2.imwrite(str(folder / f"{name}.{fmt}"), rgb[..., ::-1], params):
            raise OSError(f"could not write {folder}")
        if xyz:
            write_xyz(root / "xyz" / f"{name}.tiff", xyz_from_z(z))

    with cf.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, range(n + n_bad)))
    df = read_dataset("folder", {"normal_dir": root / "normal", "abnormal_dir": root / "abnormal",
                                 "mask_dir": root / "masks"})
    if xyz:
        df["depth_path"] = pd.Series([str(root / "xyz" / f"{Path(p).stem}.tiff") for p in df["image_path"]],
                                     index=df.index, dtype="string")
    path = root / "manifest.parquet"
    write_parquet_atomic(df, path)
    return path


def random_weights(root: Path, edge: str, depth: str, perceptual: str) -> dict[str, str]:
    """Random-weight files in the upstream layouts for the networks the run needs (same cost)."""
    import torch

    paths: dict[str, str] = {}
    root.mkdir(parents=True, exist_ok=True)
    if edge.startswith("pidinet"):
        from hybrid.models.pidinet import build_pidinet

        torch.manual_seed(0)
        m = build_pidinet(edge)
        paths[edge] = str(root / f"{edge}.pth")
        torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, paths[edge])
    if depth.startswith("depth_anything"):
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_depth import small_config
        from transformers import DepthAnythingForDepthEstimation

        torch.manual_seed(0)
        paths[depth] = str(root / depth)
        DepthAnythingForDepthEstimation(small_config()).save_pretrained(paths[depth])
    if perceptual == "vgg19":
        from hybrid.models.vgg import VGGFeatures

        torch.manual_seed(0)
        paths["vgg19"] = str(root / "vgg19-dcbb9e9d.pth")
        sd = {f"features.{k}": v for k, v in VGGFeatures("vgg19").features.state_dict().items()}
        torch.save(sd, paths["vgg19"])
    return paths


def random_checkpoint(path: Path, model: dict) -> Path:
    """A checkpoint directory with random weights, written the way training writes it."""
    import torch

    from hybrid.checkpoint import save_checkpoint
    from hybrid.models.discriminator import MultiscaleDiscriminator
    from hybrid.models.generator import Generator

    torch.manual_seed(0)
    G = Generator(**model)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, 4, 2, 1)
    save_checkpoint(path, G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()),
                    {"model": G.config, "discriminator": D.config}, {"step": 0, "epoch": 0, "lr": 0.0, "seed": 0})
    return path


# ----------------------------------------------------------------------------- measuring
class Meter:
    """Wall and CPU time of a stage, CPU time spent inside the model calls, and peak memory."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.model_cpu = 0.0
        self.first: float | None = None
        self.images = 0
        self.marks: list[tuple[float, float, int]] = []  # (own CPU, model CPU, images) at the first and last batch
        self.t0 = time.perf_counter()
        self.c0 = self._cpu()
        self.thread0 = time.thread_time()  # the calling thread's: the rest of the process is other threads

    @staticmethod
    def _cpu() -> tuple[float, float]:
        """CPU seconds of this process (all threads) and of its finished children (loader workers)."""
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime

    def wrap(self, fn):
        """``fn`` with its CPU time counted as model time (no device sync: launches only on a GPU).
        With one torch thread the model runs on the calling thread, and only that thread's CPU
        time is counted: the writer thread's work meanwhile stays host time."""
        import torch

        clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time

        def timed(*a, **k):
            c = clock()
            try:
                return fn(*a, **k)
            finally:
                self.model_cpu += clock() - c
        return timed

    def mark_first(self) -> None:
        """The end of the first batch (synchronised), for the steady rate."""
        if self.first is None:
            self._sync()
            self.first = time.perf_counter()

    def mark(self, images: int) -> None:
        """The end of a batch of ``images``: :meth:`mark_first`, and the process's CPU and model
        time then, so that the host time between the first and the last batch (start-up, the
        manifest and the sheets left out) is known per image."""
        self.mark_first()
        self.images += images
        self.marks = self.marks[:1] + [(self._cpu()[0], self.model_cpu, self.images)]  # the first and the last

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def result(self, images: int, first_images: int = 0) -> dict:
        import torch

        self._sync()
        wall = time.perf_counter() - self.t0
        own, kids = (b - a for a, b in zip(self.c0, self._cpu()))
        peak = (torch.cuda.max_memory_allocated() / 2**20 if self.cuda
                else max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                         resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
        steady = None
        if self.first is not None and images > first_images:
            steady = (images - first_images) / max(time.perf_counter() - self.first, 1e-9)
        steady_main = None
        if len(self.marks) == 2 and self.marks[1][2] > self.marks[0][2]:
            (c0, m0, i0), (c1, m1, i1) = self.marks
            steady_main = 1000 * (c1 - c0 - (m1 - m0)) / (i1 - i0)
        others = own - (time.thread_time() - self.thread0)  # writer threads, and any library's thread pool
        return {"images": images, "wall": wall, "img_s": images / wall, "steady": steady, "steady_main_ms": steady_main,
                "other_threads_ms": 1000 * others / max(images, 1),
                "main_ms": 1000 * (own - self.model_cpu) / max(images, 1),
                "host_ms": 1000 * (own + kids - self.model_cpu) / max(images, 1), "peak": peak}


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


# ----------------------------------------------------------------------------- stages (child processes)
def stage_preprocess(a: dict) -> dict:
    import hybrid.stages.preprocess as pre
    from hybrid.data.manifest import read_manifest

    _threads(a["threads"])
    manifest = read_manifest(a["manifest"])
    cfg = pre.PreprocessConfig(resolution=a["size"], edge_model=a["edge"], depth_source=a["depth"],
                               device=a["device"], precision=a["precision"] if a["device"] != "cpu" else "auto",
                               batch_size=a["pre_batch"], workers=a["workers"], paths=a["weights"],
                               shard_size=a["shard_size"], compile=a["compile"])
    meter = Meter(a["device"])
    real_init = pre.MapComputer.__init__

    def init(self, *args, **kw):  # count the map models' calls as model time
        real_init(self, *args, **kw)
        if self.edge is not None:
            self.edge = meter.wrap(self.edge)
        if self.depth is not None:
            import hybrid.models.depth as depth

            depth.predict_depth = meter.wrap(depth.predict_depth)

    pre.MapComputer.__init__ = init
    real_run = pre._Pending._run

    def run(self, items):
        real_run(self, items)
        meter.mark_first()

    pre._Pending._run = run
    pre.run(manifest, a["out"], cfg)
    return meter.result(len(manifest), a["pre_batch"])


def stage_train(a: dict) -> dict:
    import hybrid.train as train
    from hybrid.data.manifest import read_manifest
    from hybrid.io import write_parquet_atomic
    from hybrid.stages.train import run as run_train_stage

    _threads(a["threads"])
    root = Path(a["out"])
    root.mkdir(parents=True, exist_ok=True)
    # One epoch of exactly --train-steps steps: the first steps x batch normal images stay "train".
    manifest = read_manifest(a["manifest"])
    n_train = a["train_steps"] * a["train_batch"]
    train_rows = manifest.index[(manifest["split"] == "train") & (manifest["label"] == 0)]
    manifest.loc[train_rows[n_train:], "split"] = "val"
    write_parquet_atomic(manifest, root / "manifest.parquet")
    cfg = {"epochs": 1, "epochs_decay": 0, "batch_size": a["train_batch"], "perceptual": a["perceptual"],
           "lambda_l1": 10.0 if a["perceptual"] == "none" else 0.0, "ndf": a["ndf"], "device": a["device"],
           "precision": a["precision"], "workers": a["workers"], "checkpoint_every": 10**9,
           "sample_every": 10**9, "log_every": a["log_every"]}
    if a["compile"]:
        cfg["compile"] = True
    meter = Meter(a["device"])
    real = train.train_step
    calls = {"n": 0}

    def step(*args, **kw):
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            meter.mark_first()
        return out

    train.train_step = meter.wrap(step)
    run_train_stage(a["index"], root / "manifest.parquet", root / "checkpoint", root / "losses.csv",
                    root / "samples", root / "work", a["model"], cfg, {}, paths=a["weights"],
                    threads=a["threads"])
    return meter.result(calls["n"] * a["train_batch"], a["train_batch"])


def stage_generate(a: dict) -> dict:
    import hybrid.pipeline as pipeline
    import hybrid.stages.generate as gen
    from hybrid.data.manifest import read_manifest

    _threads(a["threads"])
    manifest = read_manifest(a["manifest"])
    pairs = a["pairs"]
    cfg = gen.GenerateConfig.from_dict({
        "kinds": ["global", "local"], "global": {"count": pairs // 2, "pairing": "random"},
        "local": {"count": pairs - pairs // 2, "pairing": "random"}, "select": {"split": "train"},
        "batch_size": a["gen_batch"], "workers": a["gen_workers"], "device": a["device"],
        "precision": a["precision"] if a["device"] != "cpu" else "auto", "shard_size": a["shard_size"],
        "sheet_rows": 2, "compile": a["compile"]})
    meter = Meter(a["device"])
    real_init, real_compile = pipeline.HybridPipeline.__init__, pipeline.HybridPipeline.compile

    def init(self, *args, **kw):  # the generator's forward is the model time
        real_init(self, *args, **kw)
        if not a["compile"]:
            self.generator.forward = meter.wrap(self.generator.forward)

    def compile(self):  # compiled: the compiled module's call (compiling included) is the model time
        real_compile(self)
        self.generator.forward = meter.wrap(self.generator.forward)

    pipeline.HybridPipeline.__init__ = init
    pipeline.HybridPipeline.compile = compile
    real_encode = pipeline.HybridPipeline.encode  # the stage's per-batch call

    def encode(self, batch):
        out = real_encode(self, batch)
        meter.mark(sum(len(o["image"]) for o in out.values()))
        return out

    pipeline.HybridPipeline.encode = encode
    prof = cProfile.Profile() if a.get("profile") else None
    with prof or contextlib.nullcontext():
        df = gen.run(a["checkpoint"], a["index"], manifest, a["out"], cfg)
    res = meter.result(len(df), a["gen_batch"] * 2)
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(28)
        res["profile"] = s.getvalue()
    return res


def stage_evaluate(a: dict) -> dict:
    import pandas as pd

    import hybrid.stages.evaluate as ev

    _threads(a["threads"])
    gen_dir = Path(a["generated"])
    cfg = ev.EvaluateConfig(weights="random", device=a["device"], batch_size=a["eval_batch"],
                            kinds=("global", "local"), n_centres=a["centres"], kid_subsets=10)
    meter = Meter(a["device"])
    ev.inception_pool = meter.wrap(ev.inception_pool)  # the networks: Inception and the LPIPS features
    from hybrid.metrics.lpips import LPIPS

    for name in ("features", "pairwise_from_features", "distance_from_features"):
        if hasattr(LPIPS, name):
            setattr(LPIPS, name, meter.wrap(getattr(LPIPS, name)))
    n = len(pd.read_parquet(gen_dir / "manifest.parquet"))
    ev.run(gen_dir / "manifest.parquet", gen_dir, a["manifest"], a["index"], a["out"], cfg)
    return meter.result(n)


# ----------------------------------------------------------------------------- models alone
def _timed(fn, reps: int, cuda: bool) -> float:
    """Seconds per call after one warm-up call."""
    import torch

    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _peak(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_edges(a: dict) -> dict:
    import torch

    from hybrid.models.edges import make_edge_detector

    _threads(a["threads"])
    dev = torch.device(a["device"])
    det = make_edge_detector(a["edge"], dev, a["weights"].get(a["edge"]),
                             precision="fp32")
    if a["compile"] and hasattr(det, "model"):
        det.model = torch.compile(det.model)  # compiled in _timed's warm-up call
    x = torch.randint(0, 256, (a["pre_batch"], a["size"], a["size"], 3), dtype=torch.uint8)
    x = x.to(dev) if a["edge"] != "canny" else x
    dt = _timed(lambda: det(x), a["reps"], dev.type == "cuda")
    return {"img_s": a["pre_batch"] / dt, "peak": _peak(dev.type == "cuda"), "what": f"{a['edge']} alone"}


def model_depth(a: dict) -> dict:
    import torch

    from hybrid.models.depth import load_depth_anything, predict_depth

    _threads(a["threads"])
    dev = torch.device(a["device"])
    model = load_depth_anything(a["weights"][a["depth"]], dev)
    model = torch.compile(model) if a["compile"] else model
    x = torch.randint(0, 256, (a["pre_batch"], a["size"], a["size"], 3), dtype=torch.uint8, device=dev)
    precision = a["precision"] if dev.type == "cuda" else "fp32"
    dt = _timed(lambda: predict_depth(model, x, precision=precision), a["reps"], dev.type == "cuda")
    return {"img_s": a["pre_batch"] / dt, "peak": _peak(dev.type == "cuda"), "what": f"{a['depth']} alone"}


def train_step_call(a: dict, dev, fmt, batch: int, vgg):
    """A zero-argument call of one training step as the stage runs it (the bench's G, D and
    train settings, Adam as hybrid.train, random maps of ``batch`` pairs in ``fmt`` on ``dev``),
    with ``vgg`` (a VGGLoss, or None) as the perceptual network; compiled with ``a["compile"]``."""
    import torch

    from hybrid.models.discriminator import MultiscaleDiscriminator
    from hybrid.models.generator import CHANNELS, Generator
    from hybrid.train import TrainConfig, key_modality, learns_key, train_step

    cfg = TrainConfig(perceptual="vgg19" if vgg is not None else "none", precision=a["precision"], ndf=a["ndf"],
                      lambda_l1=0.0 if vgg is not None else 10.0)
    torch.manual_seed(0)
    G = Generator(**a["model"]).to(dev, memory_format=fmt)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, a["ndf"]).to(dev, memory_format=fmt)
    vgg = vgg.to(dev, memory_format=fmt) if vgg is not None else None
    kw = {"fused": True} if dev.type == "cuda" else {}
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw) for m in (G, D))
    names = G.conditions + [learns_key(d) for d in G.decoder_names]
    maps = {n: (torch.rand(batch, CHANNELS[key_modality(n, G)], a["size"], a["size"], device=dev) * 2 - 1)
            .contiguous(memory_format=fmt) for n in names}
    bf16 = a["precision"] == "bf16"
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if a["compile"]:  # as train.compile
        G, D = torch.compile(G), torch.compile(D)
        vgg = torch.compile(vgg) if vgg is not None else None
    return lambda: train_step(G, D, vgg, opt_G, opt_D, maps, cfg, autocast, sync=False)  # as the stage


def model_train(a: dict) -> dict:
    """The train step alone as the stage runs it (channels_last on a GPU, deterministic
    algorithms); eager on a GPU also in NCHW, which made the generator's eager forward faster
    (1,535 against 1,300 img/s on the H200) and was never measured for a whole step, and without
    determinism (cuDNN's algorithms picked by timing): what exact resume costs."""
    import torch

    from hybrid.determinism import deterministic_algorithms
    from hybrid.losses import load_vgg_loss

    _threads(a["threads"])
    dev = torch.device(a["device"])
    cuda = dev.type == "cuda"

    def rate(fmt: torch.memory_format) -> float:  # compiled in _timed's warm-up call
        vgg = load_vgg_loss(a["weights"]["vgg19"]) if a["perceptual"] == "vgg19" else None
        return a["train_batch"] / _timed(train_step_call(a, dev, fmt, a["train_batch"], vgg), a["reps"], cuda)

    with deterministic_algorithms():  # as hybrid.train
        img_s = rate(torch.channels_last if cuda else torch.contiguous_format)
        peak, what = _peak(cuda), "train step alone"
        if cuda and not a["compile"]:
            nchw = rate(torch.contiguous_format)
    if cuda and not a["compile"]:  # what determinism costs: cuDNN's algorithms picked by timing instead
        torch.backends.cudnn.benchmark = True
        what += (f" (channels_last, deterministic, as the stage; NCHW: {nchw:,.1f} img/s; channels_last with "
                 f"cudnn.benchmark, not deterministic: {rate(torch.channels_last):,.1f} img/s)")
    return {"img_s": img_s, "peak": peak, "what": what}


def model_generator(a: dict) -> dict:
    import torch

    from hybrid.models.generator import Generator
    from hybrid.pipeline import memory_format

    _threads(a["threads"])
    dev = torch.device(a["device"])
    cuda = dev.type == "cuda"
    fmt = memory_format(dev, a["compile"])  # as the stage: NCHW eager, channels_last compiled on a GPU
    torch.manual_seed(0)
    G = Generator(**a["model"]).to(dev, memory_format=fmt).eval()
    G = torch.compile(G) if a["compile"] else G  # compiled in _timed's warm-up call
    x = torch.rand(a["gen_batch"], G.in_channels, a["size"], a["size"], device=dev).contiguous(memory_format=fmt)

    @torch.inference_mode()
    def fwd():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a["precision"] == "bf16"):
            return G(x)

    dt = _timed(fwd, a["reps"], cuda)
    return {"img_s": a["gen_batch"] * len(G.decoder_names) / dt, "peak": _peak(cuda), "what": "generator forward alone"}


def model_inception(a: dict) -> dict:
    import torch

    from hybrid.stages.evaluate import random_inception

    _threads(a["threads"])
    dev = torch.device(a["device"])
    model = random_inception(0).to(dev)
    x = torch.randint(0, 256, (a["eval_batch"], 3, a["size"], a["size"]), dtype=torch.uint8, device=dev)

    @torch.inference_mode()
    def fwd():
        return model(x)["pool"]

    dt = _timed(fwd, a["reps"], dev.type == "cuda")
    return {"img_s": a["eval_batch"] / dt, "peak": _peak(dev.type == "cuda"), "what": "Inception-v3 alone"}


# ----------------------------------------------------------------------------- work per image
GOALS = {"preprocess": 800, "train": 400, "generate": 2500}  # issue 15: images/s on one H100-class GPU


def gflop_per_image(a: dict) -> dict[str, dict]:
    """Each stage's network work per image at this run's sizes, in GFLOP, counted by torch's
    FlopCounterMode on the meta device (no weights, no computation: seconds on a CPU). Images as
    the stages count them: a preprocessed photo (the edge model at the working size, Depth
    Anything at its 518 px input), a training pair (one step: G, both scales of D and VGG19 for
    both decoders, forward and backward), one decoder's generated image, an evaluated image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hybrid.losses import VGGLoss
    from hybrid.models.generator import Generator
    from hybrid.models.vgg import VGGFeatures
    from hybrid.stages.evaluate import random_inception

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e9

    meta, s = torch.device("meta"), a["size"]
    out: dict[str, dict] = {}
    parts = {}
    if a["edge"].startswith("pidinet"):
        from hybrid.models.pidinet import build_pidinet

        with meta:
            pidinet = build_pidinet(a["edge"], converted=True).eval()
        parts[a["edge"]] = count(lambda: pidinet(torch.zeros(1, 3, s, s, device=meta)))
    if a["depth"] == "depth_anything_small":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_depth import small_config
        from transformers import DepthAnythingForDepthEstimation

        from hybrid.models.depth import SIZE

        with meta:
            da = DepthAnythingForDepthEstimation(small_config()).eval()
        parts[a["depth"]] = count(lambda: da(pixel_values=torch.zeros(1, 3, SIZE, SIZE, device=meta)))
    out["preprocess"] = {"gflop": sum(parts.values()), "what": " + ".join(parts) or "no network"}
    with meta:
        vgg = VGGLoss(VGGFeatures("vgg19")) if a["perceptual"] == "vgg19" else None
        G = Generator(**a["model"])
    step = count(train_step_call({**a, "compile": False, "precision": "fp32"}, meta, torch.contiguous_format, 1, vgg))
    out["train"] = {"gflop": step, "what": "G + D" + (" + VGG19" if vgg is not None else "") + ", per pair"}
    x = torch.zeros(1, G.in_channels, s, s, device=meta)
    with torch.no_grad():
        out["generate"] = {"gflop": count(lambda: G(x)) / len(G.decoder_names), "what": "generator forward"}
        inception = random_inception(0).to(meta)
        out["evaluate"] = {"gflop": count(lambda: inception(torch.zeros(1, 3, s, s, dtype=torch.uint8, device=meta))),
                           "what": "Inception-v3 (LPIPS features not counted)"}
    return out


def work_table(work: dict[str, dict], stages: dict[str, dict], models: dict[str, dict], goals: bool) -> str:
    """Markdown: per stage its GFLOP per image and the TFLOP/s the stage, its model alone and (at
    the paper's size, ``goals``) the issue's goal in images/s amount to."""
    def tf(gflop: float, img_s: float | None) -> str:
        if not img_s or not gflop:
            return "-"
        x = gflop * img_s / 1000
        return f"{x:,.{max(0, 2 - math.floor(math.log10(x)))}f}"  # three significant digits

    lines = ["| stage | networks | GFLOP/img | stage TFLOP/s | model alone TFLOP/s | goal img/s | goal TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for name, w in work.items():
        goal = GOALS.get(name) if goals else None
        stage, model = stages.get(name, {}).get("img_s"), models.get(name, {}).get("img_s")
        lines.append(f"| {name} | {w['what']} | {w['gflop']:,.1f} | {tf(w['gflop'], stage)} | {tf(w['gflop'], model)} "
                     f"| {_fmt(goal, 0) if goal else '-'} | {tf(w['gflop'], goal)} |")
    return "\n".join(lines)


def in_child(fn, a: dict) -> dict:
    """``fn(a)`` in a fresh spawned process: its own max RSS and CUDA peak."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, a).result()


# ----------------------------------------------------------------------------- main
def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def row(stage: str, r: dict, m: dict | None) -> str:
    model = f"{m['what']}: {_fmt(m['img_s'])} img/s, {_fmt(m['peak'], 0)} MiB" if m else "-"
    return (f"| {stage} | {r['images']:,} | {r['wall']:.1f} | {_fmt(r['img_s'])} | {_fmt(r['steady'])} | "
            f"{r['main_ms']:.2f} | {r['host_ms']:.2f} | {r['peak']:,.0f} | {model} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default: 2048 cuda, 96 cpu)")
    ap.add_argument("--size", type=int, default=None, help="working resolution (default: 256 cuda, 64 cpu)")
    ap.add_argument("--source-size", type=int, default=None, help="the synthetic photos' side in pixels, "
                    "decoded and resized to --size by preprocess (default: 1024 cuda, --size cpu)")
    ap.add_argument("--source-format", choices=["jpg", "png"], default=None, help="default: jpg cuda, png cpu")
    ap.add_argument("--model", choices=list(MODELS), default=None, help="default: paper on cuda, demo on cpu")
    ap.add_argument("--edge", default=None, help="edge model (default: pidinet, random weights)")
    ap.add_argument("--depth", default=None, help="depth source (default: depth_anything_small on cuda, the "
                    "xyz files (dataset) on cpu)")
    ap.add_argument("--perceptual", default=None, choices=["vgg19", "none"], help="default: vgg19 cuda, none cpu")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--train-batch", type=int, default=None, help="default: 28 cuda (the paper's), 4 cpu")
    ap.add_argument("--gen-batch", type=int, default=None, help="default: 64 cuda (the issue's setting), 8 cpu")
    ap.add_argument("--pre-batch", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (preprocess, train)")
    ap.add_argument("--gen-workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--compile", action="store_true", help="preprocess.compile, train.compile and "
                    "generate.compile: true (the models alone compiled too)")
    ap.add_argument("--stages", nargs="+", default=["preprocess", "train", "generate", "evaluate"])
    ap.add_argument("--no-models", action="store_true", help="skip the models-alone figures")
    ap.add_argument("--profile", action="store_true", help="cProfile the generate stage's host side")
    ap.add_argument("--flops", action="store_true", help="only print each stage's network GFLOP per image "
                    "and the TFLOP/s the issue's goals amount to (counted, nothing run: seconds)")
    ap.add_argument("--scaling", type=int, nargs="+", help="peak memory of preprocess and generate at these sizes")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one); "
                    "a stage that runs starts from an emptied output folder; those of the others are kept")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    a = {
        "device": args.device, "precision": args.precision or ("bf16" if cuda else "fp32"),
        "size": args.size or (256 if cuda else 64), "model": MODELS[args.model or ("paper" if cuda else "demo")],
        "edge": args.edge or "pidinet", "depth": args.depth or ("depth_anything_small" if cuda else "dataset"),
        "perceptual": args.perceptual or ("vgg19" if cuda else "none"), "ndf": 64 if cuda else 16,
        "train_steps": args.train_steps or (50 if cuda else 20), "train_batch": args.train_batch or (28 if cuda else 4),
        "gen_batch": args.gen_batch or (64 if cuda else 8), "pre_batch": args.pre_batch, "eval_batch": args.eval_batch,
        "workers": args.workers if args.workers is not None else (8 if cuda else 2),
        "gen_workers": args.gen_workers if args.gen_workers is not None else (8 if cuda else 0),
        "threads": args.threads or os.cpu_count() or 1, "compile": args.compile, "reps": 5 if cuda else 2,
        "shard_size": 1024, "log_every": 50, "centres": 8,
    }
    n = args.images or (2048 if cuda else 96)
    source = args.source_size or (1024 if cuda else a["size"])
    fmt = args.source_format or ("jpg" if cuda else "png")
    xyz = a["depth"] == "dataset"  # sensor depth files only where they are the depth source
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        work_per_image = in_child(gflop_per_image, a)
        paper = a["model"] == PAPER and a["size"] == 256  # the goals are the paper size's
        if args.flops:
            print("\n" + work_table(work_per_image, {}, {}, paper))
            return
        a["weights"] = random_weights(work / "weights", a["edge"], a["depth"], a["perceptual"])
        print(f"device {args.device}, {a['precision']}, {a['size']} px, model {json.dumps(a['model']) or 'paper'}, "
              f"edges {a['edge']}, depth {a['depth']}, {a['threads']} threads, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.scaling:
            return scaling(work, args.scaling, a)
        stages: dict[str, dict] = {}
        alone: dict[str, dict] = {}
        t = time.perf_counter()
        a["manifest"] = str(make_data(work / "data", n, source, fmt=fmt, xyz=xyz))
        os.sync()  # its writeback beside the stages slowed their writes (shard writer: 1.26 ms/img of CPU, not 0.4)
        print(f"synthetic data: {n} {fmt.upper()}{' + xyz TIFF' if xyz else ''} at {source} x {source} px in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        a["pairs"] = n // 2  # one AHD and one AHE image per pair: as many generated images as inputs
        a["index"] = str(work / "shards" / "index.parquet")
        print("\n| stage | images | wall s | img/s | steady img/s | main ms/img | host ms/img | peak MiB | "
              "model alone (same batch) |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        if "preprocess" in args.stages:
            r = stages["preprocess"] = in_child(stage_preprocess, {**a, "out": fresh(work / "shards")})
            models = [] if args.no_models else [in_child(model_edges, a)]
            if a["depth"].startswith("depth_anything") and not args.no_models:
                models.append(in_child(model_depth, a))
            if models:  # the networks one after the other, as the stage runs them
                alone["preprocess"] = {"img_s": 1 / sum(1 / m["img_s"] for m in models)}
            print(row("preprocess", r, models[0] if models else None), flush=True)
            for m in models[1:]:
                print(f"| | | | | | | | | {m['what']}: {_fmt(m['img_s'])} img/s, {_fmt(m['peak'], 0)} MiB |")
        a["checkpoint"] = str(work / "train" / "checkpoint")
        if "train" in args.stages:
            r = stages["train"] = in_child(stage_train, {**a, "out": fresh(work / "train")})
            m = alone["train"] = {} if args.no_models else in_child(model_train, a)
            print(row("train", r, m or None), flush=True)
        elif not Path(a["checkpoint"]).exists():
            random_checkpoint(Path(a["checkpoint"]), a["model"])
        if "generate" in args.stages:
            r = stages["generate"] = in_child(stage_generate, {**a, "out": fresh(work / "generated")})
            m = alone["generate"] = {} if args.no_models else in_child(model_generator, a)
            print(row("generate", r, m or None), flush=True)
        if "evaluate" in args.stages:
            r = stages["evaluate"] = in_child(stage_evaluate, {**a, "generated": str(work / "generated"),
                                                                "out": fresh(work / "metrics")})
            m = alone["evaluate"] = {} if args.no_models else in_child(model_inception, a)
            print(row("evaluate", r, m or None), flush=True)
        ran = {k: w for k, w in work_per_image.items() if k in stages}
        print("\n" + work_table(ran, stages, alone, paper), flush=True)
        if args.profile:
            p = {**a, "threads": 1, "gen_workers": 0, "profile": True, "out": fresh(work / "generated-profile")}
            plain = in_child(stage_generate, {**p, "profile": False, "out": fresh(work / "generated-plain")})
            print(f"\ngenerate, one thread, no workers: host {plain['host_ms']:.2f} ms/img (CPU outside the "
                  f"generator's forward), {_fmt(plain['steady_main_ms'], 2)} ms/img from the first to the last "
                  f"batch (start-up, manifest and sheets left out), {plain['img_s']:.1f} img/s; of the host "
                  f"time, {plain['other_threads_ms']:.2f} ms/img on threads other than the loop's (the shard "
                  f"writer's, and any library's thread pool: a spinning pool shows here)")
            print(in_child(stage_generate, p)["profile"])


def fresh(out: Path) -> str:
    """``out`` emptied: a stage measured on a kept folder (``--keep``) must run whole, not resume."""
    shutil.rmtree(out, ignore_errors=True)
    return str(out)


def scaling(work: Path, sizes: list[int], a: dict) -> None:
    print("\n| images | preprocess img/s | preprocess peak MiB | generate img/s | generate peak MiB |\n"
          "|---|---|---|---|---|", flush=True)
    ckpt = random_checkpoint(work / "ckpt", a["model"])
    for n in sizes:
        data = work / f"data-{n}"
        manifest = make_data(data, n, a["size"])
        b = {**a, "manifest": str(manifest), "index": str(data / "shards" / "index.parquet"), "pairs": n // 2,
             "checkpoint": str(ckpt)}
        p = in_child(stage_preprocess, {**b, "out": fresh(data / "shards")})
        g = in_child(stage_generate, {**b, "out": fresh(data / "generated")})
        print(f"| {n:,} | {p['img_s']:.1f} | {p['peak']:,.0f} | {g['img_s']:.1f} | {g['peak']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
