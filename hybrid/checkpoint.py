"""Training checkpoints: the generator (:meth:`hybrid.models.generator.Generator.save_pretrained`)
plus what only training needs to resume bit for bit: the discriminator, both optimizers, the step
and epoch, and every RNG state. Generation never imports this module: it loads the generator alone.

A training checkpoint folder: config.json, model.safetensors, README.md (the generator's),
discriminator.safetensors, state.pt. Folders are written under a temporary name and renamed into
place (:func:`hybrid.io.atomic_dir`); the workflow's last published checkpoint is hard-linked into
the work folder (:func:`keep_published`) so that a failed rerun never loses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from hybrid.io import atomic_dir, publish  # noqa: F401 (publish: re-exported for the stages)
from hybrid.models.generator import Generator

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, level: str | None = None, purpose: str = "this use") -> Generator:
    """The generator of a checkpoint folder (:meth:`Generator.from_pretrained`), for the training stages."""
    return Generator.from_pretrained(path, level, purpose)


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, G: nn.Module, D: nn.Module, opt_G, opt_D, config: dict, state: dict) -> None:
    """Write the generator (:meth:`Generator.save_pretrained`: config.json, model.safetensors,
    README.md), discriminator.safetensors and state.pt (step, optimizers, RNG) into a temporary
    folder beside ``path``, then rename it into place."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        G.save_pretrained(tmp, {k: v for k, v in config.items() if k != "model"})
        save_file({k: v.contiguous() for k, v in D.state_dict().items()}, tmp / "discriminator.safetensors")
        torch.save({**state, "optimizer_G": opt_G.state_dict(), "optimizer_D": opt_D.state_dict(),
                    "rng": rng_state()}, tmp / "state.pt")


def latest_checkpoint(work_dir: Path) -> Path | None:
    done = sorted(p for p in Path(work_dir).glob("ckpt-*") if (p / "state.pt").exists())
    return done[-1] if done else None


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """state.pt of a checkpoint directory (step, epoch, lr, optimizers, RNG states)."""
    return torch.load(Path(path) / "state.pt", map_location=map_location, weights_only=True)


def check_same_config(ckpt: Path, saved: dict, wanted: dict, what: str) -> list[str]:
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff and what == "model":
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}" for k in diff)
        raise ValueError(f"the work checkpoint {ckpt} was trained with a different model config "
                         f"({detail}); restore that model config or start from an empty work_dir")
    return diff


def check_pairing(ckpt: Path, saved: dict, cfg: Any) -> None:
    """Refuse to resume a run under another pairing (checkpoints from before the per-condition
    pairing have no ``shared_geometry`` key: they were trained with one shared geometry)."""
    was = bool(saved.get("shared_geometry", True))
    if was != cfg.shared_geometry:
        how = {True: "one augmentation for all target maps", False: "one augmentation per condition"}
        raise ValueError(f"the work checkpoint {ckpt} was trained with train.shared_geometry={str(was).lower()} "
                         f"({how[was]}), but the config says train.shared_geometry="
                         f"{str(cfg.shared_geometry).lower()}; set train.shared_geometry: {str(was).lower()} "
                         "to finish that run, or start from an empty work folder. Generating from it needs "
                         "no change.")


PUBLISHED = "published"  # under a stage's work root: a copy of the last published checkpoint


def keep_published(checkpoint: Path, kept: Path) -> None:
    """Hard-link the published checkpoint into ``kept`` (no extra disk), replacing the older copy,
    so a later failed run (whose start removes the Snakemake output) never loses it."""
    tmp = kept.with_name(f".{kept.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint, tmp, copy_function=link)
    old = kept.with_name(f".{kept.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if kept.exists():
        os.rename(kept, old)
    os.rename(tmp, kept)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def keeps_published(stage: str, checkpoint: str | Path, work_root: Path, work_dir: Path) -> Iterator[None]:
    """Around a training stage: on failure, say where the last published checkpoint is kept (Snakemake
    has removed ``checkpoint``, the output) and where this run's periodic checkpoints are; on
    success (call :func:`published` with what the block published)."""
    kept = Path(work_root) / PUBLISHED
    try:
        yield
    except BaseException as e:
        if (kept / "config.json").exists():
            note = (f"{stage} failed; the last published checkpoint is kept in {kept} (copy it to {checkpoint} to "
                    f"use it) and the periodic checkpoints of this run in {work_dir}")
            log.error("%s", note)
            e.add_note(note)
        raise


def published(stage: str, checkpoint: Path, work_root: Path, work_dir: Path) -> None:
    """After a stage published ``checkpoint``: hard-link it into ``work_root/published`` and remove
    the work folders of earlier settings, which it supersedes (logged)."""
    kept = Path(work_root) / PUBLISHED
    keep_published(Path(checkpoint), kept)
    for other in Path(work_root).iterdir():
        if other.is_dir() and other not in (Path(work_dir), kept) and not other.name.startswith("."):
            shutil.rmtree(other, ignore_errors=True)
            log.info("%s: removed the superseded work folder %s (the checkpoint of this run is published)", stage,
                     other)
