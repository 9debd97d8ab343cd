"""AnomalyFactory's FlareGenerator (paper 002, Sec. 3.3) and the training loop Flare and Blaze share.

Flare starts from the Boot weights (generator and discriminator) and learns to make *anomalies*
with a heatmap that marks them. Each training sample (:class:`ManipulatedPairs`), all of it drawn
from a generator seeded by (seed, epoch, sample index), so a resumed run replays the same data:

1. a normal training image and its edge map, under one shared geometric draw of the augment
   section with the local TPS off ("the local TPS augmentation is used only in training Boot"):
   the reference image I_r and the target edge E stay aligned, so outside the edited regions the
   right output is the reference itself (H = 0);
2. regions (:mod:`hybrid.regions`): with probability ``region_mix`` semantic (a union of SAM
   candidates of the image, drawn before the geometric draw and moved with it), else stochastic
   (:func:`hybrid.manipulate.sample_region`: random shapes, object-aware);
3. one manipulation of ``manipulations`` (remove / replace / merge) edits E inside the regions,
   with the edges of another training sample of any category as the reference (moved by a random
   flip / resize / shift first): E' and the region mask M.

Each step computes the ground truth on the fly with the frozen Boot, I_t = Boot(E', I_r) (eval mode,
no gradients), and trains Flare's fused output G(E', I_r) (with Gaussian noise of std ``noise_std``
added to the encoded features, ``Generator.forward(x, noise)``) against it with the pix2pixHD losses
(LSGAN + feature matching + VGG19, or the train section's pixel L1 when ``perceptual: none``), plus
``w_fh`` x MSE(H, M) (Eq. 5-6, W_FH = 10). The discriminator sees (E', I_r) with I_t as real.

:func:`train_af` is the loop (Flare and Blaze): resumable exactly from ``work_dir/ckpt-<step>/``
like the train stage (same checkpoint format: config.json, model.safetensors,
discriminator.safetensors, state.pt), a losses CSV, sample grids, and the final checkpoint published
to ``out_dir``; config.json records ``anomalyfactory.stage``. Under deterministic algorithms, as the
train stage (:mod:`hybrid.determinism`), so a resumed run is exact on a GPU too. The learning rate decays linearly from
``train.lr`` over the stage's epochs ("decreases the learning rate with linear schedule", Sec. 4.2).
Single process (no DDP).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hybrid.augment import AugmentConfig, augment
from hybrid.checkpoint import (
    check_same_config,
    keeps_published,
    latest_checkpoint,
    load_state,
    published,
    save_checkpoint,
    set_rng_state,
)
from hybrid.config import check_choices, check_keys, choice
from hybrid.data.shards import ShardDataset, read_attrs
from hybrid.determinism import deterministic_algorithms
from hybrid.losses import d_loss, feature_matching, gan_loss, load_vgg_loss
from hybrid.manipulate import (
    MANIPULATION_NAMES,
    ManipulateConfig,
    check_manipulation,
    local_anomaly,
    one_opencv_thread,
    opencv_threads,
)
from hybrid.models.discriminator import MultiscaleDiscriminator
from hybrid.models.generator import Generator, copy_matching
from hybrid.regions import RegionStore, semantic_region
from hybrid.seeds import derive_seed
from hybrid.stages.boot import DECODER, load_af_checkpoint, training_rows
from hybrid.train import TrainConfig, epoch_batches, lr_at, publish_run, save_tiles, setup_device, start_csv

log = logging.getLogger(__name__)

CSV_COLUMNS = ["step", "epoch", "lr", "G_total", "G_gan", "G_feat", "G_vgg", "G_l1", "G_heat", "D_total", "D_real",
               "D_fake", "semantic"]
AF_MANIPULATIONS = ("remove", "replace", "merge")


@dataclass(frozen=True)
class FlareConfig:
    """The ``anomalyfactory.flare`` section. Paper: 5 epochs, W_FH = 10; noise std not given [I]."""

    epochs: int = 5
    batch_size: int = 32  # Boot's batch in the paper; Flare's is not given [I]
    w_fh: float = 10.0
    noise_std: float = 0.1  # std of the feature noise (paper: "random noise", magnitude not given [I])
    manipulations: tuple[str, ...] = choice(MANIPULATION_NAMES, AF_MANIPULATIONS)
    region_mix: float = 0.5  # share of semantic (SAM) regions; the rest stochastic (the paper mixes both)
    semantic_fallback: bool = False  # no SAM weights: stochastic regions only (true) or an error (false)

    def __post_init__(self) -> None:
        object.__setattr__(self, "manipulations", tuple(self.manipulations))
        if not self.manipulations:
            raise ValueError(f"anomalyfactory.flare.manipulations is empty; use some of {list(AF_MANIPULATIONS)}")
        for m in self.manipulations:
            try:
                check_manipulation(m)
            except ValueError as e:
                raise ValueError(f"anomalyfactory.flare.manipulations: {e}") from None
        check_choices(self, "anomalyfactory.flare")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("anomalyfactory.flare.epochs and batch_size must be at least 1")
        if not 0 <= self.region_mix <= 1 or self.w_fh < 0 or self.noise_std < 0:
            raise ValueError("anomalyfactory.flare: region_mix in [0, 1], w_fh >= 0, noise_std >= 0")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> FlareConfig:
        return cls(**check_keys(d, cls, "anomalyfactory.flare"))


def stage_train_config(train_cfg: Mapping, epochs: int, batch_size: int) -> dict:
    """The train section for a Flare / Blaze run: linear decay over ``epochs`` from ``lr``."""
    return {**{k: v for k, v in train_cfg.items() if k != "select"}, "epochs": 0, "epochs_decay": int(epochs),
            "batch_size": int(batch_size)}


def no_tps(augment_cfg: Mapping) -> dict:
    """The augment section without the local TPS (Boot only), keeping RTP and flips."""
    return {**augment_cfg, "tps_prob": 0.0}


# ----------------------------------------------------------------------------- training pairs


class ManipulatedPairs(Dataset):
    """Index ``(epoch, i)`` -> ``reference_image`` (3, H, W), ``target_edge`` (E', manipulated),
    ``normal_edge`` (E before editing), ``region`` (M, 1 x H x W in {0, 1}) and ``semantic`` (1.0
    when M came from SAM candidates), all in the model range; see the module doc.

    ``base`` yields {"sample_id", "image", "edge"} in [-1, 1] (a :class:`ShardDataset`).
    """

    def __init__(self, base: Dataset, augment_cfg: AugmentConfig, manipulate_cfg: ManipulateConfig,
                 manipulations: tuple[str, ...], region_mix: float, regions: RegionStore | None,
                 max_regions: int, seed: int) -> None:
        self.base, self.aug, self.man = base, augment_cfg, manipulate_cfg
        self.manipulations, self.region_mix, self.regions = tuple(manipulations), region_mix, regions
        self.max_regions, self.seed = max_regions, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, i))
        item = self.base[i]
        image, edge = torch.as_tensor(item["image"]).float(), torch.as_tensor(item["edge"]).float()
        sem = None
        if self.region_mix > 0 and rng.random() < self.region_mix and self.regions is not None:
            labels = self.regions.get(item["sample_id"])
            if labels is not None and labels.shape == tuple(image.shape[-2:]):
                sem = semantic_region(labels, rng, self.max_regions)
        extra = torch.from_numpy(sem).float()[None] if sem is not None else torch.zeros_like(edge)
        x = augment(torch.cat([image, edge, extra])[None], self.aug, g)[0]
        image, edge, sem_t = x[:3], x[3:4], x[4] > 0.5
        j = i
        if len(self.base) > 1:
            j = int(rng.integers(len(self.base) - 1))
            j += j >= i  # another sample, of any category
        other = self.base[j]
        reference = {"image": torch.as_tensor(other["image"]).float(), "edge": torch.as_tensor(other["edge"]).float()}
        edited, region, semantic, _ = anomaly_edges(image, edge, reference, sem_t.numpy() if sem is not None else None,
                                                    rng, self.man, self.manipulations)
        return {"reference_image": image, "target_edge": edited, "normal_edge": edge,
                "region": region.float(), "semantic": torch.tensor(float(semantic))}


def anomaly_edges(image: torch.Tensor, edge: torch.Tensor, reference: Mapping[str, torch.Tensor],
                  semantic: np.ndarray | None, rng: np.random.Generator, man: ManipulateConfig,
                  manipulations: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, bool, str]:
    """Edit ``edge`` (1, H, W) inside a region with one of ``manipulations`` (``reference``'s edges moved
    by a random flip / resize / shift for replace and merge): the semantic region when given and
    non-empty, else a stochastic one drawn on the image. Returns (E', region (1, H, W) bool, whether
    the region was semantic, the manipulation)."""
    masks = (semantic, np.zeros_like(semantic)) if semantic is not None and semantic.any() else None
    manipulation = manipulations[int(rng.integers(len(manipulations)))]
    maps, region = local_anomaly({"image": image, "edge": edge}, reference, manipulation, rng, man, masks)
    return maps["edge"], region, masks is not None, manipulation


# ----------------------------------------------------------------------------- targets and one step


def feature_noise(G: Generator, batch: int, height: int, width: int, std: float, seed: int,
                  device: torch.device) -> torch.Tensor | None:
    """Seeded N(0, std^2) noise of the encoded features' shape (None when std is 0)."""
    if std <= 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *G.feature_shape(height, width), generator=g) * std).to(device)


@torch.no_grad()
def flare_targets(G: Generator, boot: Generator, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flare's conditions (E', I_r), its ground truth I_t = Boot(E', I_r) from the frozen Boot, and the
    heatmap target M."""
    cond = G.inputs(batch)
    return {"cond": cond, "target": boot(boot.inputs(batch))[DECODER]["image"], "heat": batch["region"]}


def af_step(G: Generator, D: nn.Module, vgg: nn.Module | None, opt_G, opt_D, cond: torch.Tensor,
            target: torch.Tensor, heat: torch.Tensor, heat_weight: float, noise: torch.Tensor | None,
            cfg: TrainConfig, autocast) -> tuple[dict[str, float], dict]:
    """One G update (LSGAN + feature matching + VGG or L1 to ``target`` + heat_weight x MSE(H, heat)),
    then one D update with (cond, target) as real; returns the losses and G's output."""
    real = torch.cat([cond, target], 1)
    with autocast:
        out = G(cond, noise)[DECODER]
        fake = torch.cat([cond, out["image"]], 1)
        with torch.no_grad():
            pred_real = D(real)
        pred_fake = D(fake)
        terms = {"G_gan": gan_loss(pred_fake, True),
                 "G_feat": feature_matching(pred_fake, pred_real, cfg.n_layers_D, cfg.lambda_feat)}
        if vgg is not None:
            terms["G_vgg"] = cfg.lambda_vgg * vgg(out["image"], target)
        if cfg.lambda_l1:
            terms["G_l1"] = cfg.lambda_l1 * F.l1_loss(out["image"].float(), target.float())
    terms["G_heat"] = heat_weight * F.mse_loss(out["mask"].float(), heat.float())
    loss_G = sum(terms.values())
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    with autocast:
        preds = D(torch.cat([real, fake.detach()]))
        n = len(cond)
        total, real_D, fake_D = d_loss([[f[:n] for f in s] for s in preds], [[f[n:] for f in s] for s in preds])
    opt_D.zero_grad(set_to_none=True)
    total.backward()
    opt_D.step()
    values = {"G_total": loss_G, **terms, "D_total": total, "D_real": real_D, "D_fake": fake_D}
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}, out


# ----------------------------------------------------------------------------- the loop


def save_rows(path: Path, columns: list[tuple[str, torch.Tensor]], rows: int = 4) -> None:
    """PNG: one sample per row, one column per (name, (B, C, H, W) tensor in [-1, 1] or a [0, 1] map)."""
    save_tiles(path, [t * 2 - 1 if name.startswith("heat") or name in ("region", "H") else t for name, t in columns],
               rows)


Targets = Callable[[Generator, Mapping[str, torch.Tensor], int], dict]


@deterministic_algorithms()
def train_af(stage: str, dataset: Dataset, targets: Targets, out_dir: str | Path, work_dir: str | Path,
             model_cfg: Mapping, train_cfg: Mapping, heat_weight: float, noise_std: float,
             init_from: str | Path | None, stage_config: Mapping, augment_cfg: Mapping | None = None,
             max_steps: int | None = None, losses_csv: str | Path | None = None,
             samples_dir: str | Path | None = None, data: Mapping | None = None,
             teachers: tuple[nn.Module, ...] = ()) -> Path:
    """Train the ``stage`` ("flare" or "blaze") model, resuming from ``work_dir``; publish ``out_dir``.

    ``targets(G, batch, step)`` -> {"cond", "target", "heat"} (and optional "columns" for the sample
    grid) computes each step's inputs and targets from a batch of ``dataset`` with the frozen
    ``teachers`` (moved to the device here). ``init_from``: the checkpoint whose matching tensors
    start a fresh run (G, and D when it has discriminator.safetensors). ``max_steps`` stops as if
    killed after that many steps and returns the latest work checkpoint.
    """
    cfg = TrainConfig.from_dict(dict(train_cfg))
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in work_dir.glob(".ckpt-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    rank, world, device = setup_device(cfg)
    if world > 1:
        raise NotImplementedError(f"the {stage} stage runs in one process; unset WORLD_SIZE (torchrun)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    G = Generator(**model_cfg)
    D = MultiscaleDiscriminator(G.in_channels + G.out_channels, cfg.ndf, cfg.n_layers_D, cfg.num_D)
    vgg = load_vgg_loss(cfg.vgg_path) if cfg.perceptual == "vgg19" else None
    config = {"model": G.config, "train": dataclasses.asdict(cfg), "augment": dict(augment_cfg or {}),
              "discriminator": D.config, "anomalyfactory": {"stage": stage, **stage_config},
              **({"data": dict(data)} if data else {})}
    ckpt, step = latest_checkpoint(work_dir), 0
    if ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())
        check_same_config(ckpt, saved["model"], G.config, "model")
        G.load_state_dict(load_file(ckpt / "model.safetensors"))
        D.load_state_dict(load_file(ckpt / "discriminator.safetensors"))
    elif init_from is not None:
        kept = copy_matching(G, load_file(Path(init_from) / "model.safetensors"))
        log.info("%s: G initialised from %s; %d tensors kept their own init: %s", stage, init_from, len(kept), kept)
        if (Path(init_from) / "discriminator.safetensors").exists():
            kept = copy_matching(D, load_file(Path(init_from) / "discriminator.safetensors"))
            log.info("%s: D initialised from %s; %d tensors kept their own init", stage, init_from, len(kept))
    G.to(device)
    D.to(device)
    vgg = vgg.to(device) if vgg is not None else None
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    if ckpt is not None:
        state = load_state(ckpt, device)
        opt_G.load_state_dict(state["optimizer_G"])
        opt_D.load_state_dict(state["optimizer_D"])
        set_rng_state(state["rng"])
        step = state["step"]
        log.info("%s: resumed from %s at step %d", stage, ckpt, step)
    if len(dataset) == 0:
        raise ValueError(f"the {stage} training set is empty; check the selection and the preprocess shards")
    steps_per_epoch = len(epoch_batches(len(dataset), cfg, 0, 0, 1))
    total = (cfg.epochs + cfg.epochs_decay) * steps_per_epoch
    stop = total if max_steps is None else min(total, max_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    csv_path, samples = work_dir / "losses.csv", work_dir / "samples"
    start_csv(csv_path, step, CSV_COLUMNS)
    log.info("%s: %d steps (%d per epoch, batch %d) on %s; G %.2fM params, D %.2fM; heat weight %g, feature noise "
             "std %g; work dir %s", stage, total, steps_per_epoch, cfg.batch_size, device,
             sum(p.numel() for p in G.parameters()) / 1e6, sum(p.numel() for p in D.parameters()) / 1e6, heat_weight,
             noise_std, work_dir)

    def checkpoint(path: Path) -> None:
        epoch = max(step - 1, 0) // steps_per_epoch
        save_checkpoint(path, G, D, opt_G, opt_D, {**config, "step": step, "epoch": epoch},
                        {"step": step, "epoch": epoch, "lr": lr_at(cfg, epoch), "seed": cfg.seed})

    G.train()
    D.train()
    bar = tqdm(total=total, initial=step, desc=stage, dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    while step < stop:
        epoch, skip = divmod(step, steps_per_epoch)
        lr = lr_at(cfg, epoch)
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr
        loader = DataLoader(dataset, batch_sampler=epoch_batches(len(dataset), cfg, epoch, 0, 1)[skip:],
                            num_workers=cfg.workers, pin_memory=device.type == "cuda", worker_init_fn=one_opencv_thread)
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS)
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast:
                    t = targets(G, batch, step)
                h, w = t["cond"].shape[-2:]
                noise = feature_noise(G, len(t["cond"]), h, w, noise_std, derive_seed(cfg.seed, step, 1), device)
                losses, out = af_step(G, D, vgg, opt_G, opt_D, t["cond"], t["target"].float(), t["heat"].float(),
                                      heat_weight, noise, cfg, autocast)
                step, seen = step + 1, seen + len(t["cond"])
                bar.update(1)
                losses["semantic"] = float(batch["semantic"].float().mean()) if "semantic" in batch else 0.0
                writer.writerow({"step": step, "epoch": epoch, "lr": lr, **losses})
                if step % cfg.log_every == 0 or step == stop:
                    f.flush()
                    rate, t0, seen = seen / (time.perf_counter() - t0), time.perf_counter(), 0
                    log.info("%s: step %d/%d epoch %d lr %.3g G %.4f (heat %.4f) D %.4f %.2f img/s", stage, step,
                             total, epoch, lr, losses["G_total"], losses["G_heat"], losses["D_total"], rate)
                if step % cfg.sample_every == 0 or step == total:
                    cols = list(t.get("columns", [])) + [("output", out["image"]), ("heatmap", out["mask"])]
                    save_rows(samples / f"step-{step:08d}.png", cols)
                if step % cfg.checkpoint_every == 0 or step == total:
                    f.flush()
                    checkpoint(work_dir / f"ckpt-{step:08d}")
                    for old in work_dir.glob("ckpt-*"):
                        if old.name < f"ckpt-{step:08d}":
                            shutil.rmtree(old)
                if step >= stop:
                    break
    bar.close()
    if step < total:
        return latest_checkpoint(work_dir) or work_dir
    publish_run(checkpoint, work_dir, step, out_dir, csv_path, losses_csv, samples, samples_dir)
    log.info("%s: published %s", stage, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- stage helpers


def shard_data(index: Path, idx: pd.DataFrame) -> tuple[dict, list[str]]:
    """config.json's ``data`` (resolution, edge model, ...) and the shards' fingerprints."""
    shards = sorted(set(idx["shard"].astype(str)))
    attrs = [read_attrs(index.parent / s) for s in shards]
    plain = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs[0].items()}
    data = {k: plain.get(k) for k in ("resolution", "fit", "edge_model", "edge_weights")}
    return data, [str(a.get("fingerprint")) for a in attrs]


def training_set(index: str | Path, manifest: str | Path, select: Mapping | None, per_dataset: Mapping | None,
                 seed: int, where: str) -> tuple[ShardDataset, pd.DataFrame]:
    """The selected (and per-dataset drawn) normal training images in the shards, with their edges."""
    index = Path(index)
    rows = training_rows(manifest, select, per_dataset, seed, where)
    idx = pd.read_parquet(index)
    idx = idx[idx["sample_id"].isin(set(rows["sample_id"]))].reset_index(drop=True)
    if idx.empty:
        raise ValueError(f"{where} {dict(select or {})} matches no preprocessed sample in {index}")
    return ShardDataset(idx, fields=("image", "edge"), shard_dir=index.parent), idx


def region_store(regions: str | Path | None, region_mix: float, fallback: bool, stage: str) -> RegionStore | None:
    """The SAM candidate maps when semantic regions are on; their absence named (or, with the fallback,
    logged: stochastic regions only)."""
    if region_mix <= 0:
        return None
    if regions is None:
        raise ValueError(f"the {stage} stage draws semantic regions (anomalyfactory.flare.region_mix: {region_mix}) "
                         "but was given no sam_regions output (results/anomalyfactory/regions.h5)")
    store = RegionStore(regions)
    if not store.available:
        if not fallback:
            raise ValueError(f"the {stage} stage draws semantic regions (region_mix {region_mix}) but {regions} holds "
                             f"no SAM candidates ({store.note or store.status}); set anomalyfactory.flare."
                             "semantic_fallback: true to use stochastic regions only, or region_mix: 0")
        log.warning("%s: no SAM regions (%s): stochastic regions only (semantic_fallback: true)", stage, store.note)
    return store


def file_stamp(path: Path) -> str:
    st = (path / "model.safetensors").stat()
    return f"{st.st_size}|{st.st_mtime_ns}"


def work_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class AFRun:
    """What Flare and Blaze set up alike: the stage's train and augment sections, manipulations,
    SAM regions, the selected training images (shards) and the data entry of config.json."""

    train: dict
    augment: dict
    manipulate: ManipulateConfig
    max_regions: int
    store: RegionStore | None
    base: ShardDataset
    idx: pd.DataFrame
    data: dict
    fingerprints: list[str]


def af_run(stage: str, fc: FlareConfig, epochs: int, batch_size: int, index: str | Path, manifest: str | Path,
           train_cfg: Mapping, augment_cfg: Mapping, manipulate_cfg: Mapping, sam_cfg: Mapping | None,
           regions: str | Path | None, select: Mapping | None, per_dataset: Mapping | None, seed: int,
           paths: Mapping | None) -> AFRun:
    """The shared set-up of the flare and blaze stages (``stage`` names them in messages)."""
    train = stage_train_config(train_cfg, epochs, batch_size)
    if train.get("perceptual", "vgg19") == "vgg19" and not train.get("vgg_path") and paths:
        train["vgg_path"] = paths.get("vgg19")
    man = ManipulateConfig.from_dict({**manipulate_cfg, "manipulations": list(fc.manipulations)})
    store = region_store(regions, fc.region_mix, fc.semantic_fallback, stage)
    base, idx = training_set(index, manifest, select, per_dataset, seed, f"anomalyfactory {stage} select")
    data, fingerprints = shard_data(Path(index), idx)
    return AFRun(train, no_tps(augment_cfg), man, int((sam_cfg or {}).get("max_regions", 3)), store, base, idx, data,
                 fingerprints)


def run(index: str | Path, manifest: str | Path, boot: str | Path, checkpoint: str | Path,
        losses: str | Path, samples: str | Path, work_root: str | Path, train_cfg: Mapping,
        flare_cfg: Mapping, augment_cfg: Mapping, manipulate_cfg: Mapping, sam_cfg: Mapping | None = None,
        regions: str | Path | None = None, select: Mapping | None = None,
        per_dataset: Mapping[str, int] | None = None, seed: int = 0, paths: Mapping | None = None,
        threads: int = 1, max_steps: int | None = None) -> Path:
    """The flare stage: Flare from the Boot checkpoint ``boot`` (see the module doc)."""
    torch.set_num_threads(max(1, threads))
    fc = FlareConfig.from_dict(flare_cfg)
    boot_G, boot_config = load_af_checkpoint(boot, "boot", "the flare stage")
    r = af_run("flare", fc, fc.epochs, fc.batch_size, index, manifest, train_cfg, augment_cfg, manipulate_cfg, sam_cfg,
               regions, select, per_dataset, seed, paths)
    train, aug, man, max_regions, store = r.train, r.augment, r.manipulate, r.max_regions, r.store
    base, idx, data, fingerprints = r.base, r.idx, r.data, r.fingerprints
    pairs = ManipulatedPairs(base, AugmentConfig.from_dict(aug), man, fc.manipulations, fc.region_mix, store,
                             max_regions, int(train.get("seed", 0)))
    key = work_key(model=boot_G.config, train=train, flare=dataclasses.asdict(fc), augment=aug,
                   manipulate=dataclasses.asdict(man), shards=fingerprints, ids=sorted(idx["sample_id"]),
                   boot=file_stamp(Path(boot)), regions=str(regions) if store else None, max_regions=max_regions)
    work_root = Path(work_root)
    work = work_root / key
    log.info("flare: %d training images, from Boot %s; regions: %.0f%% semantic (%s), manipulations %s; work %s",
             len(pairs), boot, 100 * fc.region_mix, store.status if store else "off", list(fc.manipulations), work)

    def targets(G: Generator, batch: Mapping[str, torch.Tensor], step: int) -> dict:
        t = flare_targets(G, boot_G, batch)
        t["columns"] = [("reference", batch["reference_image"]), ("edge", batch["normal_edge"]),
                        ("region", batch["region"]), ("edited edge", batch["target_edge"]), ("Boot I_t", t["target"])]
        return t

    with keeps_published("flare", checkpoint, work_root, work), opencv_threads(1):  # pairs' OpenCV: one thread
        out = train_af("flare", pairs, targets, checkpoint, work, boot_G.config, train, fc.w_fh, fc.noise_std, boot,
                       {**dataclasses.asdict(fc), "manipulations": list(fc.manipulations), "boot": str(boot),
                        "max_regions": max_regions, "regions": store.status if store else "off"},
                       augment_cfg=aug, max_steps=max_steps, losses_csv=losses, samples_dir=samples,
                       data={**data, "boot_data": boot_config.get("data")}, teachers=(boot_G,))
    if out == Path(checkpoint):
        published("flare", out, work_root, work)
    return out
