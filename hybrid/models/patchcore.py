"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) in plain torch.

As anomalib's ``PatchcoreModel`` does it:

* Embedding: ResNet maps of ``layers`` (default layer2 + layer3 of Wide-ResNet-50-2), each made
  "locally aware" by a 3x3 average pool (stride 1, padding 1, zeros counted), the deeper maps
  resized bilinearly to the first one's size and concatenated over channels (512 + 1024 = 1536
  dims for WRN-50-2, 128 + 256 for ResNet-18). ``target_dim`` optionally reduces the channels by
  adaptive average pooling over the channel axis, like the paper code's final aggregator
  (anomalib keeps the full concatenation, the default here).
* Memory bank: greedy k-center coreset of ``coreset_ratio`` of all training patches (as anomalib's
  ``KCenterGreedy``: a seeded random start, then repeatedly the patch farthest from the chosen
  ones; the start is kept here, anomalib drops it), with distances measured after a seeded sparse
  random projection to ``projection_dim`` dims (the paper's code projects to 128; anomalib picks the
  Johnson-Lindenstrauss dimension at eps 0.9).
* Scores: each test patch's distance to its nearest bank entry is the patch score; the image score
  is the largest patch score s* reweighted as in the paper (eq. 7) and anomalib's
  ``compute_anomaly_score``: w = 1 - exp(d*) / sum_k exp(d_k), over the distances d_k of the test
  patch to the ``num_neighbors`` nearest bank neighbours of its nearest bank entry m* (m* included,
  d* = s*). The patch map is resized bilinearly to the input size (as the paper's code; anomalib
  uses nearest) and smoothed by a Gaussian of sigma 4 (scipy's ``gaussian_filter``, reflect mode).

Memory stays bounded: the projection and the nearest-neighbour search run in chunks of
``chunk_size`` rows (no N x N matrix), the coreset update is a matrix-vector product; everything
runs on the device of the model (a GPU when present). The training embeddings of ``fit`` are held
on that device.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.models.resnet import ResNet, load_resnet, normalize

log = logging.getLogger(__name__)

Images = torch.Tensor | np.ndarray


def sparse_random_projection(dim_in: int, dim_out: int, generator: torch.Generator) -> torch.Tensor:
    """A (dim_in, dim_out) sparse random projection matrix (Li et al. 2006; sklearn's default density
    1/sqrt(dim_in)): entries +-1/sqrt(density * dim_out) with probability density/2 each, else 0."""
    density = 1 / np.sqrt(dim_in)
    u = torch.rand((dim_in, dim_out), generator=generator)
    sign = (u < density / 2).float() - ((u >= density / 2) & (u < density)).float()
    return sign / np.sqrt(density * dim_out)


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int | None = 128, seed: int = 0,
                   chunk_size: int = 65536) -> torch.Tensor:
    """Indices (ordered by selection) of a greedy k-center coreset of up to ``n`` rows of (N, D) ``features``.

    A CPU generator seeded with ``seed`` draws first the projection (when ``projection_dim`` < D),
    then the start row ``randint(N)``, which is the first index (unlike anomalib, which drops it, so
    that its neighbourhood can be missing from the bank); each further one is the row farthest from
    all chosen ones. Selection stops early when every row coincides with a chosen one.
    """
    N, D = features.shape
    g = torch.Generator().manual_seed(seed)
    if projection_dim and projection_dim < D:
        proj_matrix = sparse_random_projection(D, projection_dim, g).to(features.device, torch.float32)
        feats = torch.cat([c.float() @ proj_matrix for c in features.split(chunk_size)])
    else:
        feats = features.float()
    start = int(torch.randint(N, (1,), generator=g))
    sq = (feats * feats).sum(1)
    idx = torch.tensor([start], device=feats.device)
    min_d = torch.full((N,), float("inf"), device=feats.device).index_fill_(0, idx, 0.0)
    chosen = torch.full((n,), start, dtype=torch.long, device=feats.device)
    gaps = torch.full((n,), float("inf"), device=feats.device)
    for i in range(1, n):  # no host sync inside the loop: fast on a GPU
        d = (sq - 2 * (feats @ feats.index_select(0, idx)[0]) + sq.index_select(0, idx)).clamp_min_(0)
        torch.minimum(min_d, d, out=min_d)
        gaps[i], idx = min_d.max(0, keepdim=True)
        chosen[i] = idx[0]
        min_d.index_fill_(0, idx, 0.0)
    return chosen[gaps > 0]


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int = 1,
        chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (M, k) and indices (M, k) of the ``k`` nearest ``bank`` rows of each query
    row, nearest first; both inputs are streamed in chunks of ``chunk_size`` rows."""
    k = min(k, bank.shape[0])
    bank_sq = (bank * bank).sum(1)
    out_d, out_i = [], []
    for q in queries.split(chunk_size):
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = best_i = None
        for start in range(0, bank.shape[0], chunk_size):
            b = bank[start:start + chunk_size]
            d = (q_sq - 2 * q @ b.T + bank_sq[start:start + chunk_size]).clamp_min_(0)
            d, i = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            i += start
            if best_d is not None:
                d = torch.cat([best_d, d], 1)
                d, j = d.topk(min(k, d.shape[1]), dim=1, largest=False)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_d, best_i = d, i
        out_d.append(best_d.sqrt())
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


def anomaly_score(patch_scores: torch.Tensor, locations: torch.Tensor, embedding: torch.Tensor, bank: torch.Tensor,
                  num_neighbors: int = 9, chunk_size: int = 4096) -> torch.Tensor:
    """Image scores (B,) from patch scores (B, P), their nearest bank rows (B, P) and the patch
    embeddings (B, P, D): the max patch score, reweighted by w = 1 - softmax(d)[m*] (see module doc);
    ``num_neighbors`` 1 gives the plain max."""
    if num_neighbors == 1:
        return patch_scores.amax(1)
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    best = patch_scores.argmax(1)
    score, nn_index = patch_scores[rows, best], locations[rows, best]
    _, support = knn(bank[nn_index], bank, num_neighbors, chunk_size)  # (B, k); support[:, 0] is m*
    d = torch.linalg.vector_norm(embedding[rows, best].unsqueeze(1) - bank[support], dim=-1)
    return (1 - F.softmax(d, dim=1)[:, 0]) * score


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of (..., H, W) as ``scipy.ndimage.gaussian_filter`` (mode reflect)."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for dim in (-1, -2):
        n = maps.shape[dim]
        idx = torch.arange(-r, n + r, device=maps.device) % (2 * n)
        idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)  # d c b a | a b c d | d c b a
        maps = maps.index_select(dim, idx).unfold(dim, 2 * r + 1, 1) @ kernel
    return maps


def _batches(data: Images | Iterable, batch_size: int) -> Iterable[torch.Tensor]:
    """Image batches from a tensor/array, or from an iterable of tensors, (tensor, ...) or {"image": ...}."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        yield from (_as_nchw(data[i:i + batch_size]) for i in range(0, len(data), batch_size))
        return
    for item in data:
        item = item["image"] if isinstance(item, dict) else item[0] if isinstance(item, (tuple, list)) else item
        yield _as_nchw(item)


def _as_nchw(x: Images) -> torch.Tensor:
    """A torch batch (N,3,H,W); numpy input may be (N,H,W,3) uint8 as the project's image readers give."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"PatchCore expects RGB image batches (N,3,H,W); got {tuple(x.shape)}")
    return x


class PatchCore:
    """PatchCore with a ResNet backbone; images are RGB (N,3,H,W) floats in 0..1 or uint8
    (ImageNet normalisation is applied here).

    ``backbone``: a registered arch name (loaded with ``load_resnet(backbone, weights, seed=seed)``)
    or a :class:`ResNet`, which is moved to ``device`` and frozen.
    """

    def __init__(self, backbone: str | ResNet = "wide_resnet50_2", layers: tuple[str, ...] = ("layer2", "layer3"),
                 coreset_ratio: float = 0.1, num_neighbors: int = 9, target_dim: int | None = None,
                 projection_dim: int | None = 128, sigma: float = 4.0, device: str | torch.device = "auto",
                 seed: int = 0, weights: str = "auto", chunk_size: int = 4096, batch_size: int = 16) -> None:
        from hybrid.config import resolve_device

        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        net = load_resnet(backbone, weights, seed=seed) if isinstance(backbone, str) else backbone
        self.backbone = net.eval().requires_grad_(False).to(self.device)
        self.layers, self.coreset_ratio, self.num_neighbors = tuple(layers), coreset_ratio, num_neighbors
        self.target_dim, self.projection_dim, self.sigma, self.seed = target_dim, projection_dim, sigma, seed
        self.chunk_size, self.batch_size = chunk_size, batch_size
        self.memory_bank: torch.Tensor | None = None

    @torch.no_grad()
    def embed(self, images: Images) -> torch.Tensor:
        """Patch embeddings (N, h, w, D) of one batch (h, w: the first layer's grid)."""
        feats = self.backbone.features(normalize(_as_nchw(images).to(self.device)), self.layers)
        maps = [F.avg_pool2d(feats[name], 3, stride=1, padding=1) for name in self.layers]
        size = maps[0].shape[-2:]
        emb = torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                     for m in maps[1:]], 1).permute(0, 2, 3, 1)
        if self.target_dim:
            n, h, w, d = emb.shape
            emb = F.adaptive_avg_pool1d(emb.reshape(-1, 1, d), self.target_dim).reshape(n, h, w, self.target_dim)
        return emb.contiguous()

    def fit(self, data: Images | Iterable) -> PatchCore:
        """Build the memory bank from normal images (a batch, or an iterable of batches / loader)."""
        emb = torch.cat([self.embed(b).flatten(0, 2) for b in _batches(data, self.batch_size)])
        n = emb.shape[0] if self.coreset_ratio >= 1 else max(1, int(emb.shape[0] * self.coreset_ratio))
        keep = greedy_coreset(emb, n, self.projection_dim, self.seed) if n < emb.shape[0] else None
        self.memory_bank = emb if keep is None else emb[keep]
        log.info("PatchCore memory bank: %d of %d patches, %d dims (%s)", len(self.memory_bank), len(emb),
                 emb.shape[1], self.backbone.weights_label)
        return self

    @torch.no_grad()
    def predict(self, images: Images | Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (N,) and anomaly maps (N, H, W) at the input size, as float CPU tensors."""
        if self.memory_bank is None:
            raise RuntimeError("PatchCore has no memory bank; call fit() or PatchCore.load() first")
        scores, maps = [], []
        for batch in _batches(images, self.batch_size):
            emb = self.embed(batch)
            b, h, w, d = emb.shape
            dist, loc = knn(emb.reshape(-1, d), self.memory_bank, 1, self.chunk_size)
            patch = dist.reshape(b, h * w)
            scores.append(anomaly_score(patch, loc.reshape(b, h * w), emb.reshape(b, h * w, d), self.memory_bank,
                                        self.num_neighbors, self.chunk_size).cpu())
            up = F.interpolate(patch.reshape(b, 1, h, w), size=batch.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(gaussian_blur(up[:, 0], self.sigma).cpu())
        return torch.cat(scores), torch.cat(maps)

    def _meta(self) -> dict[str, str]:
        return {"arch": self.backbone.arch, "backbone_weights": self.backbone.weights_label,
                "config": json.dumps({"layers": list(self.layers), "coreset_ratio": self.coreset_ratio,
                                      "num_neighbors": self.num_neighbors, "target_dim": self.target_dim,
                                      "projection_dim": self.projection_dim, "sigma": self.sigma,
                                      "seed": self.seed})}

    def save(self, path: str | Path) -> None:
        """Write the memory bank and the settings (safetensors metadata) to ``path``."""
        from safetensors.torch import save_file

        if self.memory_bank is None:
            raise RuntimeError("PatchCore has no memory bank to save; call fit() first")
        save_file({"memory_bank": self.memory_bank.detach().cpu().contiguous()}, str(path), metadata=self._meta())

    @classmethod
    def load(cls, path: str | Path, backbone: ResNet | None = None, weights: str = "auto",
             device: str | torch.device = "auto", chunk_size: int = 4096, batch_size: int = 16) -> PatchCore:
        """A fitted PatchCore from ``save``; the backbone (given, or loaded by the saved arch and seed)
        must carry the same weights as when the bank was built (its ``weights_label``), else ValueError."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta, bank = f.metadata(), f.get_tensor("memory_bank")
        cfg = json.loads(meta["config"])
        model = cls(backbone or meta["arch"], tuple(cfg.pop("layers")), device=device, weights=weights,
                    chunk_size=chunk_size, batch_size=batch_size, **cfg)
        if model.backbone.arch != meta["arch"] or model.backbone.weights_label != meta["backbone_weights"]:
            raise ValueError(f"{path} was built with {meta['arch']} ({meta['backbone_weights']}), but the "
                             f"backbone is {model.backbone.arch} ({model.backbone.weights_label}); its scores "
                             "would be meaningless")
        model.memory_bank = bank.to(model.device)
        return model
