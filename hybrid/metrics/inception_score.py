"""Inception Score as torch-fidelity computes it (``fidelity --isc``).

IS = mean over splits of exp(E_x[KL(p(y|x) || p(y))]) from the Inception-v3-compat
``logits_unbiased``, after shuffling the samples with ``numpy.random.RandomState(2020)``;
10 splits of ``N // splits``-aligned chunks; the std over splits is reported too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def inception_score(
    logits_unbiased: np.ndarray | torch.Tensor, splits: int = 10, seed: int | None = 2020
) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` chunks; ``seed=None`` keeps the order."""
    logits = torch.as_tensor(logits_unbiased)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, classes); got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"cannot split {n} samples into {splits} splits; need at least one sample per split")
    if seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    logits = logits.double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _batches(images: Iterable[np.ndarray] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive (B,H,W,3) uint8 batches; a change of image size starts a new batch."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    batch: list[np.ndarray] = []
    for img in images:
        img = np.asarray(img)
        if batch and (img.shape != batch[0].shape or len(batch) == batch_size):
            yield np.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def inception_outputs(
    images: Iterable[np.ndarray] | np.ndarray,
    model: nn.Module,
    key: str,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    what: str = "Inception Score",
) -> np.ndarray:
    """One output of Inception-v3-compat (``logits_unbiased`` (N,1008), ``pool`` (N,2048), ...)
    for uint8 RGB images (H,W,3), batched; ``what`` names the metric in messages."""
    model = model.to(device).eval()
    out = []
    for batch in tqdm(_batches(images, batch_size), desc=what, unit="batch", disable=not progress):
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"{what} needs uint8 RGB images shaped (H,W,3); got {batch.dtype} {batch.shape[1:]}")
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        out.append(model(x)[key].cpu().numpy())
    if not out:
        raise ValueError(f"no images given to {what}")
    return np.concatenate(out)


def inception_logits(images: Iterable[np.ndarray] | np.ndarray, model: nn.Module, batch_size: int = 32,
                     device: str = "cpu", progress: bool = True) -> np.ndarray:
    """``logits_unbiased`` (N,1008) of uint8 RGB images (H,W,3), batched."""
    return inception_outputs(images, model, "logits_unbiased", batch_size, device, progress)


def compute_is(
    images: Iterable[np.ndarray] | np.ndarray,
    model: nn.Module,
    batch_size: int = 32,
    device: str = "cpu",
    splits: int = 10,
    seed: int = 2020,
    progress: bool = True,
) -> dict:
    """Inception Score of uint8 RGB images: ``{"is_mean", "is_std", "n_images", "splits", "seed"}``."""
    logits = inception_logits(images, model, batch_size=batch_size, device=device, progress=progress)
    mean, std = inception_score(logits, splits=splits, seed=seed)
    return {"is_mean": mean, "is_std": std, "n_images": int(len(logits)), "splits": splits, "seed": seed}
