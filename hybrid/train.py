"""Train AnomalyHybrid (paper 003, Fig. 4) with pix2pixHD losses; resumes exactly after a kill.

Pairs (paper 003, Sec. 3.4, Fig. 4, Eq. 2-4): each sample {image, depth, edge} gets independent
augmentation draws, one per condition: the reference maps under draw R, the target depth under
draw D and the target edge under draw E (AnomalyHybrid). Each decoder's learning target shares
the draw of the condition it follows (``hybrid.models.generator.ROLES``): AHD learns the image
under D (A_d), AHE the image under E (A_e). Depth and edge therefore disagree in training, which
is what teaches AHD to follow depth and AHE to follow edges. AH* (depth level): the reference
depth and edge under R, the target image under T, and both decoders learn their map under T.
``train.shared_geometry: true`` is the ablation that puts every target map under one draw (the
pre-fix behaviour, in which both decoders learn the same thing).
Losses (pix2pixHD): G = LSGAN + feature matching + VGG19 perceptual (+ optional pixel L1 and
mask mean) summed over the decoders; D = 0.5 * (real + fake) per decoder. G is updated, then D,
with Adam. bf16 autocast on request, channels_last on CUDA, DDP under torchrun (WORLD_SIZE).

Speed (train.augment_on, train.compile): on a GPU the three augmentation draws of each pair are
drawn in the DataLoader (the same per-sample generator, the same order) and applied to the whole
batch on the device (``augment_on: device``; equal to the per-sample CPU path up to float
rounding); on a CPU they are applied in the dataset as always. Adam is fused on CUDA; the losses
stay on the device and are synchronised once per ``log_every`` steps (and before a checkpoint),
so losses.csv is written in blocks with unchanged rows. ``compile: true`` runs the generator,
the discriminator and VGG19 through torch.compile and falls back to eager (with a warning) if
compiling fails.

Randomness that decides the run is a pure function of the seed: data order of (seed, epoch)
(DistributedSampler) and augmentations of (seed, epoch, sample index) (torch.Generator seeded in
the dataset), so a resumed run needs only the step counter to continue the same batches; global
RNG states are saved as well. The run uses deterministic algorithms
(:func:`hybrid.determinism.deterministic_algorithms`): on a GPU too, the same seed gives the same
weights, so a resumed run is exact there as well (cuDNN's algorithms are chosen by fixed rules, not
by timing, and the generator's reflection pads take a backward without atomic adds). Work
checkpoints go to ``work_dir/ckpt-<step>/`` (written to a temporary directory, then renamed); the
final one is published to ``out_dir``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from hybrid.augment import PAD_MODES, AugmentConfig, apply_params, augment, sample_params
from hybrid.checkpoint import (
    check_pairing,
    check_same_config,
    latest_checkpoint,
    load_checkpoint,
    load_state,
    save_checkpoint,
    set_rng_state,
)
from hybrid.compiled import eager_on_failure
from hybrid.config import check_choices, check_device, check_keys, choice
from hybrid.determinism import deterministic_algorithms
from hybrid.io import atomic_path
from hybrid.losses import d_loss, feature_matching, gan_loss, load_vgg_loss, mask_loss
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import CHANNELS, Generator, copy_matching
from hybrid.seeds import derive_seed

log = logging.getLogger(__name__)
DEPTH_FIELDS = ("depth", "depth_sensor", "auto")
LOSS_NAMES = ["G_total", "G_gan", "G_feat", "G_vgg", "G_l1", "G_mask", "D_total", "D_real", "D_fake"]
CSV_COLUMNS = ["step", "epoch", "lr", *LOSS_NAMES]
AUGMENT_ON = ("auto", "dataset", "device")
PERCEPTUAL = ("vgg19", "none")
PRECISIONS = ("fp32", "bf16")
# Per-sample keys of augment.sample_params (the others, size and pad_mode, are the batch's).
_PARAM_KEYS = ("tps", "rtp", "flip_lr", "flip_tb", "tps_src", "tps_dst", "tps_box", "rtp_scale", "rtp_shift")


@dataclass
class TrainConfig:
    """The train section. Paper (AH): 250 epochs, lr 2e-4 decayed linearly, batch 28 on 4 GPUs."""

    epochs: int = 125           # at constant lr
    epochs_decay: int = 125     # then linearly to zero (pix2pixHD niter / niter_decay)
    batch_size: int = 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    lambda_l1: float = 0.0      # optional pixel L1 to the target (not in the papers; helps offline
                                # demos that train without VGG19 weights)
    lambda_mask: float = 0.0    # optional mean(M) regulariser, off as in the papers
    perceptual: str = choice(PERCEPTUAL, "vgg19")
    vgg_path: str | None = None  # explicit torchvision vgg19-dcbb9e9d.pth, else the model store
    ndf: int = 64
    n_layers_D: int = 3
    num_D: int = 2
    shared_geometry: bool = False  # ablation: one augmentation for all target maps (both decoders
                                   # then learn the same image); the paper: one per condition
    depth: str = choice(DEPTH_FIELDS, "depth")  # shard array feeding the depth maps
                                # (auto: depth_sensor when the shards hold it, else depth)
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    precision: str = choice(PRECISIONS, "fp32")  # bf16: autocast
    workers: int = 0
    checkpoint_every: int = 1000  # steps
    sample_every: int = 1000
    log_every: int = 50           # steps; also how often the losses are synchronised to the host
    augment_on: str = choice(AUGMENT_ON, "auto")  # auto: device on CUDA, dataset on CPU
    compile: bool = False         # torch.compile G, D and VGG19 (falls back to eager if it fails)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        check_choices(self, "train")
        check_device(self.device, "train.device")
        for key in ("batch_size", "checkpoint_every", "sample_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train config {key}={getattr(self, key)} must be at least 1")
        if self.epochs < 0 or self.epochs_decay < 0 or self.epochs + self.epochs_decay < 1:
            raise ValueError(f"train config epochs={self.epochs}, epochs_decay={self.epochs_decay}: "
                             "need non-negative values with a positive sum")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**check_keys(d, cls, "train"))


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """pix2pixHD: ``lr`` for ``epochs`` epochs, then minus lr/epochs_decay per epoch (0-based)."""
    if epoch < cfg.epochs or cfg.epochs_decay == 0:
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.epochs + cfg.epochs_decay - epoch) / cfg.epochs_decay)


def learns_key(decoder: str) -> str:
    """The batch key of a decoder's learning target (A_d, A_e), e.g. ``AHD_learns``."""
    return f"{decoder}_learns"


def draw_plan(G: Generator, shared_geometry: bool = False) -> dict[str, list[str]]:
    """The augmentation draws of one training pair: draw name -> the batch keys taken under it.

    Reference maps share one draw; every target-side condition gets its own (or, with
    ``shared_geometry``, all share one ``target`` draw); each decoder's learning target
    (:func:`learns_key`) joins the draw of the condition it follows. Target draws come first,
    in condition order, and the reference draw last.
    """
    def draw(name: str) -> str:
        if name.startswith("reference_"):
            return "reference"
        return "target" if shared_geometry else name

    plan: dict[str, list[str]] = {}
    for c in G.conditions:
        plan.setdefault(draw(c), []).append(c)
    for d, role in G.roles.items():
        plan.setdefault(draw(role.guide), []).append(learns_key(d))
    return {k: plan[k] for k in sorted(plan, key=lambda k: k == "reference")}


def key_modality(key: str, G: Generator) -> str:
    """``target_edge`` -> edge; ``AHD_learns`` -> the modality that decoder learns."""
    name = G.targets[key[:-len("_learns")]] if key.endswith("_learns") else key
    return name.split("_", 1)[1]


class PairDataset(Dataset):
    """Index ``(epoch, i)`` -> the generator's named conditions and each decoder's learning target
    (:func:`learns_key`) from sample ``i``, one augmentation per draw of :func:`draw_plan`, drawn
    in plan order from one generator seeded by (seed, epoch, i).

    ``defer=True``: items are ``{"maps": {modality: (C, H, W)}, "params": {draw: per-sample
    parameters}}`` with the very same draws, to be applied to a whole batch on the device by
    :meth:`apply`."""

    def __init__(self, base: Dataset, G: Generator, cfg: AugmentConfig, seed: int,
                 shared_geometry: bool = False, defer: bool = False) -> None:
        self.base, self.cfg, self.seed, self.defer = base, cfg, seed, defer
        self.plan = draw_plan(G, shared_geometry)
        self.modality = {k: key_modality(k, G) for keys in self.plan.values() for k in keys}
        self.modalities = [m for m in CHANNELS if m in self.modality.values()]
        self.used = {draw: [m for m in self.modalities if any(self.modality[k] == m for k in keys)]
                     for draw, keys in self.plan.items()}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        item = self.base[i]
        missing = [m for m in self.modalities if m not in item]
        if missing:
            raise KeyError(f"training sample {i} has no {missing} maps (it has {sorted(item)}), which the "
                           "model conditions need; preprocess with an edge model and a depth source")
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, i))
        maps = {m: torch.as_tensor(item[m], dtype=torch.float32) for m in self.modalities}
        if self.defer:
            h, w = maps[self.modalities[0]].shape[-2:]
            params = {}
            for draw in self.plan:
                p = sample_params(1, self.cfg, g, h, w)
                params[draw] = {k: p[k][0] for k in _PARAM_KEYS}
            return {"maps": maps, "params": params}
        out = {}
        for draw, keys in self.plan.items():
            used = self.used[draw]
            x = torch.cat([maps[m] for m in used])[None]
            x = augment(x, self.cfg, g)[0]
            at = dict(zip(used, torch.split(x, [CHANNELS[m] for m in used])))
            out |= {k: at[self.modality[k]] for k in keys}
        return out

    def apply(self, batch: dict, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
              ) -> dict[str, torch.Tensor]:
        """A collated deferred batch -> the keys of the non-deferred items, stacked, on ``device``:
        each draw's parameters applied to the whole batch in one :func:`augment.apply_params`."""
        maps = {m: v.to(device, non_blocking=True) for m, v in batch["maps"].items()}
        b, _, h, w = maps[self.modalities[0]].shape
        out = {}
        for draw, keys in self.plan.items():
            used = self.used[draw]
            params = {**batch["params"][draw], "size": torch.tensor([h, w]),
                      "pad_mode": torch.tensor(PAD_MODES.index(self.cfg.pad_mode))}
            x = apply_params(torch.cat([maps[m] for m in used], 1), params)
            at = dict(zip(used, torch.split(x, [CHANNELS[m] for m in used], 1)))
            out |= {k: at[self.modality[k]].contiguous(memory_format=memory_format) for k in keys}
        return out


def epoch_batches(n: int, cfg: TrainConfig, epoch: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    sampler.set_epoch(epoch)
    idx = [(epoch, i) for i in sampler]
    return [idx[k:k + cfg.batch_size] for k in range(0, len(idx), cfg.batch_size)]


def split(preds: list[list[torch.Tensor]], n: int) -> list[list[list[torch.Tensor]]]:
    """Discriminator output of ``n`` stacked equal batches -> one feature pyramid per batch."""
    parts = [[f.chunk(n) for f in scale] for scale in preds]
    return [[[f[k] for f in scale] for scale in parts] for k in range(n)]


def unwrap(m: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    m = getattr(m, "_orig_mod", m)
    return m.module if isinstance(m, DDP) else m


def train_step(G: nn.Module, D: nn.Module, vgg: nn.Module | None, opt_G: torch.optim.Optimizer,
               opt_D: torch.optim.Optimizer, maps: dict[str, torch.Tensor], cfg: TrainConfig,
               autocast: contextlib.AbstractContextManager,
               sync: bool = True) -> tuple[dict[str, float] | torch.Tensor, dict]:
    """One G update then one D update; returns the losses and the generator outputs.

    ``sync=False``: the losses as one tensor on the device (:data:`LOSS_NAMES` order, averaged over
    the ranks), not read back, so the step waits for nothing on the host."""
    g = unwrap(G)
    cond = g.inputs(maps)
    decoders = g.decoder_names
    # Real pairs: the conditions with each decoder's own target (A_d, A_e), judged by one D.
    reals = torch.cat([torch.cat([cond, maps[learns_key(d)]], 1) for d in decoders])
    with autocast:
        out = G(cond)
        fakes = torch.cat([torch.cat([cond, out[d]["image"]], 1) for d in decoders])
        with torch.no_grad():
            pred_real = split(D(reals), len(decoders))
        with D.no_sync() if isinstance(D, DDP) else contextlib.nullcontext():
            pred_fake = split(D(fakes), len(decoders))
            terms = dict.fromkeys(["G_gan", "G_feat", "G_vgg", "G_l1", "G_mask"], 0.0)
            for k, d in enumerate(decoders):
                image, target = out[d]["image"], maps[learns_key(d)]
                parts = {"G_gan": gan_loss(pred_fake[k], True),
                         "G_feat": feature_matching(pred_fake[k], pred_real[k], cfg.n_layers_D, cfg.lambda_feat)}
                if vgg is not None:
                    parts["G_vgg"] = cfg.lambda_vgg * vgg(image, target)
                if cfg.lambda_l1:
                    parts["G_l1"] = cfg.lambda_l1 * F.l1_loss(image.float(), target.float())
                if cfg.lambda_mask:
                    parts["G_mask"] = cfg.lambda_mask * mask_loss(out[d]["mask"])
                terms = {n: terms[n] + parts.get(n, 0.0) for n in terms}
            loss_G = sum(terms.values())
            opt_G.zero_grad(set_to_none=True)
            loss_G.backward()
    opt_G.step()
    with autocast:
        preds = split(D(torch.cat([reals, fakes.detach()])), 2 * len(decoders))
        loss_D = real_D = fake_D = 0.0
        for k in range(len(decoders)):
            total, real, fake = d_loss(preds[k], preds[len(decoders) + k])
            loss_D, real_D, fake_D = loss_D + total, real_D + real, fake_D + fake
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()
    values = {"G_total": loss_G, **terms, "D_total": loss_D, "D_real": real_D, "D_fake": fake_D}
    v = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=cond.device).detach()
                     for x in values.values()])
    if dist.is_initialized():
        dist.all_reduce(v)
        v /= dist.get_world_size()
    if not sync:
        return v, out
    return dict(zip(values, v.tolist())), out


# ----------------------------------------------------------------------------- logs and samples
def start_csv(path: Path, step: int, columns: list[str] = CSV_COLUMNS) -> None:
    """Keep the header and the rows up to ``step`` (a resumed run rewrites what came after)."""
    rows = []
    if path.exists():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def save_grid(path: Path, maps: dict[str, torch.Tensor], out: dict, conditions: list[str], rows: int = 4) -> None:
    """PNG, one sample per row: conditions | per decoder: its learning target, fused output, mask."""
    cols = [maps[n] for n in conditions]
    for d, o in out.items():
        cols += [maps[learns_key(d)], o["image"], o["mask"] * 2 - 1]
    save_tiles(path, cols, rows)


def save_tiles(path: Path, columns: list[torch.Tensor], rows: int = 4) -> None:
    """PNG: one sample per row, one column per (B, C, H, W) tensor in [-1, 1]."""
    tiles = [c[:rows].detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).expand(-1, 3, -1, -1) for c in columns]
    grid = torch.cat([torch.cat([t[r] for t in tiles], dim=2) for r in range(len(tiles[0]))], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).round().byte().numpy()).save(tmp, format="PNG")


def publish_run(checkpoint: Callable[[Path], None], work_dir: Path, step: int, out_dir: Path, csv_path: Path,
                losses_csv: str | Path | None, samples: Path, samples_dir: str | Path | None) -> None:
    """A finished run's last step: its work checkpoint (unless a resumed finished run has it), the
    published checkpoint ``out_dir``, and copies of the losses CSV and the sample grids."""
    if not (work_dir / f"ckpt-{step:08d}").exists():
        checkpoint(work_dir / f"ckpt-{step:08d}")
    checkpoint(out_dir)
    if losses_csv is not None:
        with atomic_path(losses_csv) as tmp:
            shutil.copyfile(csv_path, tmp)
    if samples_dir is not None:
        shutil.copytree(samples, Path(samples_dir), dirs_exist_ok=True)


# ----------------------------------------------------------------------------- the loop
def setup_device(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    rank = 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if dev.startswith("cuda"):
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(dev)
    return rank, world, torch.device(dev)


@deterministic_algorithms()
def train(dataset: Dataset, out_dir: str | Path, work_dir: str | Path, model_cfg: dict, train_cfg: dict,
          augment_cfg: dict, max_steps: int | None = None, losses_csv: str | Path | None = None,
          samples_dir: str | Path | None = None, init_from: str | Path | None = None,
          data: dict | None = None) -> Path:
    """Train (or resume from ``work_dir``) and publish the final checkpoint to ``out_dir``.

    ``dataset`` yields {"image", "depth", "edge"} in [-1, 1]. Live files go to ``work_dir``
    (ckpt-*/, losses.csv, samples/); at the end losses.csv and samples/ are also copied to
    ``losses_csv`` / ``samples_dir`` when given. ``init_from``: a checkpoint whose matching tensors
    start a fresh run (AnomalyHybrid* from AnomalyHybrid). ``data`` (resolution, edge model, depth
    source, ...) is recorded in config.json so that one-off generation prepares inputs alike.
    ``max_steps`` stops after that many steps as if killed (only the periodic work checkpoints
    remain) and returns the latest one.
    """
    cfg = TrainConfig.from_dict(train_cfg)
    aug_cfg = AugmentConfig.from_dict(augment_cfg)
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob(".ckpt-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    rank, world, device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    cuda = device.type == "cuda"

    G = Generator(**model_cfg)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, cfg.ndf, cfg.n_layers_D, cfg.num_D)
    vgg = load_vgg_loss(cfg.vgg_path) if cfg.perceptual == "vgg19" else None
    config = {"model": G.config, "train": dataclasses.asdict(cfg), "augment": augment_cfg,
              "discriminator": D.config, **({"data": data} if data else {})}
    ckpt, step = latest_checkpoint(work_dir), 0
    if ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())
        check_same_config(ckpt, saved["model"], G.config, "model")
        check_pairing(ckpt, saved["train"], cfg)
        changed = check_same_config(ckpt, saved["train"], json.loads(json.dumps(config["train"])), "train")
        if changed:
            log.warning("resuming %s with changed train settings %s: the run is no longer exact", ckpt, changed)
        G.load_state_dict(load_file(ckpt / "model.safetensors"))
        D.load_state_dict(load_file(ckpt / "discriminator.safetensors"))
    elif init_from is not None:
        source = load_checkpoint(init_from, level="rgb" if G.level == "depth" else None,
                                 purpose=f"a {G.level}-level run's init_from")
        kept = G.init_from(source)
        log.info("initialised G from %s; %d tensors kept their own init: %s", init_from, len(kept), kept)
        if (Path(init_from) / "discriminator.safetensors").exists():
            kept = copy_matching(D, load_file(Path(init_from) / "discriminator.safetensors"))
            log.info("initialised D from %s; %d tensors kept their own init: %s", init_from, len(kept), kept)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    G.to(device, memory_format=fmt)
    D.to(device, memory_format=fmt)
    vgg = vgg.to(device, memory_format=fmt) if vgg is not None else None
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True if cuda else None)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True if cuda else None)
    if ckpt is not None:
        state = load_state(ckpt, device)
        opt_G.load_state_dict(state["optimizer_G"])
        opt_D.load_state_dict(state["optimizer_D"])
        for opt in (opt_G, opt_D):  # the saved groups carry the saving device's choice: fused on CUDA only
            for group in opt.param_groups:
                group["fused"] = True if cuda else None
        set_rng_state(state["rng"])
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt, step)
    g, d = G, D  # the plain modules, for checkpoints and metadata
    if world > 1:
        G = DDP(G, device_ids=[device.index] if cuda else None)
        D = DDP(D, device_ids=[device.index] if cuda else None)

    defer = cfg.augment_on == "device" or (cfg.augment_on == "auto" and cuda)
    pairs = PairDataset(dataset, g, aug_cfg, cfg.seed, cfg.shared_geometry, defer=defer)
    eager = (G, D, vgg)
    G_run, D_run, vgg_run = eager
    if cfg.compile:  # the step's networks: generator, discriminator and VGG19
        G_run, D_run = torch.compile(G), torch.compile(D)
        vgg_run = torch.compile(vgg) if vgg is not None else None
        log.info("train.compile: the generator, the discriminator%s run through torch.compile",
                 " and VGG19" if vgg is not None else "")
    if len(pairs) == 0:
        raise ValueError("the training dataset is empty; check the preprocess stage's shards")
    steps_per_epoch = len(epoch_batches(len(pairs), cfg, 0, rank, world))
    total = (cfg.epochs + cfg.epochs_decay) * steps_per_epoch
    stop = total if max_steps is None else min(total, max_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    csv_path, samples = work_dir / "losses.csv", work_dir / "samples"
    if rank == 0:
        start_csv(csv_path, step)
        log.info("training %d steps (%d per epoch, batch %d x %d ranks) on %s; G %.2fM params, D %.2fM; "
                 "work dir %s", total, steps_per_epoch, cfg.batch_size, world, device,
                 sum(p.numel() for p in g.parameters()) / 1e6, sum(p.numel() for p in d.parameters()) / 1e6, work_dir)

    def checkpoint(path: Path) -> None:
        epoch = max(step - 1, 0) // steps_per_epoch  # the epoch of the last finished step
        save_checkpoint(path, g, d, opt_G, opt_D, {**config, "step": step, "epoch": epoch},
                        {"step": step, "epoch": epoch, "lr": lr_at(cfg, epoch), "seed": cfg.seed})

    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    rows: list[tuple[int, int, float, torch.Tensor]] = []  # losses still on the device

    def write_rows(writer: csv.DictWriter) -> dict[str, float]:
        """Read the held losses back in one go, write their rows; the last step's losses."""
        values = torch.stack([v for *_, v in rows]).tolist()
        for (s_, e_, lr_, _), row in zip(rows, values):
            writer.writerow({"step": s_, "epoch": e_, "lr": lr_, **dict(zip(LOSS_NAMES, row))})
        rows.clear()
        return dict(zip(LOSS_NAMES, values[-1]))

    def uncompile() -> None:
        nonlocal G_run, D_run, vgg_run
        G_run, D_run, vgg_run = eager

    def run_step(maps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return eager_on_failure(lambda: train_step(G_run, D_run, vgg_run, opt_G, opt_D, maps, cfg, autocast,
                                                   sync=False),
                                G_run is not G, uncompile, "train.compile", "training eagerly")

    while step < stop:
        epoch, skip = divmod(step, steps_per_epoch)
        lr = lr_at(cfg, epoch)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        loader = DataLoader(pairs, batch_sampler=epoch_batches(len(pairs), cfg, epoch, rank, world)[skip:],
                            num_workers=cfg.workers, pin_memory=cuda)
        with csv_path.open("a", newline="") if rank == 0 else contextlib.nullcontext() as f:
            writer = csv.DictWriter(f, CSV_COLUMNS) if rank == 0 else None
            for batch in loader:
                if pairs.defer:
                    maps = pairs.apply(batch, device, fmt)
                else:
                    maps = {k: v.to(device, non_blocking=True, memory_format=fmt) for k, v in batch.items()}
                losses, out = run_step(maps)
                step, seen = step + 1, seen + len(next(iter(maps.values()))) * world
                bar.update(1)
                if rank == 0:
                    rows.append((step, epoch, lr, losses))
                    if step % cfg.log_every == 0 or step == stop:
                        last = write_rows(writer)
                        f.flush()
                        rate, t0, seen = seen / (time.perf_counter() - t0), time.perf_counter(), 0
                        log.info("step %d/%d epoch %d lr %.3g G %.4f D %.4f %.2f img/s", step, total, epoch,
                                 lr, last["G_total"], last["D_total"], rate)
                    if step % cfg.sample_every == 0 or step == total:
                        save_grid(samples / f"step-{step:08d}.png", maps, out, g.conditions)
                    if step % cfg.checkpoint_every == 0 or step == total:
                        if rows:
                            write_rows(writer)
                        f.flush()
                        checkpoint(work_dir / f"ckpt-{step:08d}")
                        for old in work_dir.glob("ckpt-*"):
                            if old.name < f"ckpt-{step:08d}":
                                shutil.rmtree(old)
                if world > 1 and step % cfg.checkpoint_every == 0:
                    dist.barrier()
                if step >= stop:
                    break
            if rows:  # the epoch's last rows, before its file closes
                write_rows(writer)
    bar.close()
    if step < total:  # stopped early by max_steps, as if killed
        return latest_checkpoint(work_dir) or work_dir
    if rank == 0:
        publish_run(checkpoint, work_dir, step, out_dir, csv_path, losses_csv, samples, samples_dir)
        log.info("published %s", out_dir)
    if world > 1:
        dist.barrier()
    return out_dir
