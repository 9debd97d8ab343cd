"""Butterfly hybrid classification (AnomalyHybrid Table 6): DINOv2 features, two heads, HDR scoring.

Features follow the HDR challenge's DINOv2 baseline: the image resized to 224x224 (aspect
ignored, no crop), /255, ImageNet mean/std, then ``concat(CLS, mean of patch tokens)`` of
``last_hidden_state`` (2 x hidden: 1536 for dinov2-base). The baseline calls torchvision's
``Resize((224, 224))`` on PIL images, i.e. PIL bilinear, which is antialiased when shrinking; we
reproduce it in torch (bilinear, ``antialias=True``, a width pass then a height pass, each
rounded half up to uint8 levels as PIL does), which agrees with PIL to within one grey level
(on about 1% of pixels).

Heads, each fit on (optionally) standardised features:
- ``linear``: the paper's "3 linear layers" head, an MLP D -> 512 -> 128 -> 1 with ReLU and
  dropout (widths are not in the paper), Adam + BCE-with-logits for a fixed number of epochs.
- ``sgd``: ``SGDClassifier(loss="log_loss")`` with the hyper-parameters of the HDR baseline's
  shipped ``clf.pkl`` (l2, alpha 1e-3, constant eta0 1e-3, max_iter 10000, tol 1e-3,
  n_iter_no_change 100, unweighted classes). That baseline used raw features;
  ``HeadConfig(standardize=False)`` reproduces it.
The score of a test image is the predicted hybrid probability, scored with
:func:`hybrid.metrics.challenge.challenge_scores`.

Reading shards and manifests is the caller's job: this module takes arrays.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from hybrid.config import check_choices, check_keys, choice
from hybrid.io import atomic_path
from hybrid.metrics.challenge import challenge_scores, write_predictions

if TYPE_CHECKING:
    from transformers import Dinov2Model

log = logging.getLogger(__name__)

SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PREPROCESS = "resize224-pil-bilinear-aa/imagenet-norm/cls+meanpatch"  # part of the cache key
HEADS = ("linear", "sgd")
SGD_LEARNING_RATES = ("constant", "optimal", "invscaling", "adaptive")  # scikit-learn SGDClassifier's


# ----------------------------------------------------------------------------- features


def load_dinov2(name_or_dir: str = "dinov2_base", device: str | torch.device = "cpu") -> Dinov2Model:
    """A DINOv2 model in eval mode from a ``save_pretrained`` directory or a model-store name
    (``dinov2_small``/``_base``/``_large``/``_giant``). An existing directory wins."""
    from transformers import Dinov2Model

    from hybrid.models.store import hf_model_dir  # lazy: keeps this module light to import

    path = hf_model_dir(name_or_dir, "dinov2_", "facebook/dinov2-*")
    return Dinov2Model.from_pretrained(path, local_files_only=True).to(device).eval()


def preprocess(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``pixel_values`` (3, 224, 224) float32 of one uint8 RGB image (H, W, 3), as the HDR baseline."""
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"an image must be uint8 (H, W, 3) RGB, got {x.dtype} {tuple(x.shape)}")
    x = x.permute(2, 0, 1)[None].float()
    # PIL resamples the width first and stores uint8 (rounded half up) after each pass. (Pillow
    # since python-pillow/Pillow#9549 goes height first when the height shrinks much more; the
    # baseline's 2024 Pillow did not.)
    if x.shape[-1] != SIZE:
        x = F.interpolate(x, size=(x.shape[-2], SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = torch.floor(x + 0.5).clamp(0, 255)
    if x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = torch.floor(x + 0.5).clamp(0, 255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x / 255 - mean) / std)[0]


def pooled_features(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """``concat(CLS, mean of the patch tokens)``: (B, T, D) -> (B, 2D)."""
    return torch.cat([last_hidden_state[:, 0], last_hidden_state[:, 1:].mean(dim=1)], dim=1)


def model_fingerprint(model: Dinov2Model) -> str:
    """A short hash of the model's shape and some of its weights, plus the preprocessing."""
    c = model.config
    h = hashlib.sha256(f"{PREPROCESS}|{c.hidden_size}|{c.num_hidden_layers}|{c.patch_size}".encode())
    sd = model.state_dict()
    for key in ("embeddings.cls_token", "layernorm.weight", "layernorm.bias"):
        h.update(sd[key].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _default_name(model: Dinov2Model) -> str:
    return Path(str(getattr(model.config, "name_or_path", "") or "dinov2")).name or "dinov2"


class FeatureCache:
    """Features of one model, keyed by sample id, in ``<dir>/<model name>.npz`` (ids, features,
    fingerprint). A file written by other weights or preprocessing is ignored and replaced."""

    def __init__(self, cache_dir: str | Path, model_name: str, fingerprint: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
        self.path = Path(cache_dir) / f"{safe}.npz"
        self.fingerprint = fingerprint
        self.rows: dict[str, np.ndarray] = {}
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as z:
                stored, ids, feats = str(z["fingerprint"]), z["ids"].tolist(), z["features"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("feature cache %s is unreadable (%s); recomputing and replacing it", self.path, e)
            return
        if stored == fingerprint:
            self.rows = dict(zip(ids, feats))
        else:
            log.warning("%s was computed with other weights or preprocessing; recomputing", self.path)

    def save(self) -> None:
        ids = list(self.rows)
        feats = np.stack([self.rows[i] for i in ids]).astype(np.float32) if ids else np.zeros((0, 0), np.float32)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, ids=np.asarray(ids, dtype=str), features=feats, fingerprint=np.asarray(self.fingerprint))


def _load(item: np.ndarray | str | Path) -> np.ndarray:
    if isinstance(item, (str, Path)):
        from hybrid.data.images import read_image  # lazy: OpenCV only when reading files

        return read_image(item)
    return np.asarray(item)


@torch.inference_mode()
def extract_features(
    model: Dinov2Model,
    images: Iterable[np.ndarray | str | Path],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    ids: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """DINOv2 features (N, 2 * hidden) float32 of uint8 RGB arrays or image paths, in input order.

    With ``cache_dir``, features are cached per sample id (``ids``, or the paths when the images
    are paths) under ``model_name`` (default: the model directory's name), so a rerun computes
    only new ids. Ids must be unique and stable for the image content. Moves ``model`` to ``device``.
    """
    images = list(images)
    if ids is None and cache_dir is not None:
        if not all(isinstance(i, (str, Path)) for i in images):
            raise ValueError("extract_features: pass ids= for in-memory images when cache_dir is set")
        ids = [str(i) for i in images]
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"extract_features: {len(ids)} ids for {len(images)} images")
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()
        if dup:
            raise ValueError(f"extract_features: repeated sample ids {dup[:5]}; ids must be unique")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.to(device).eval()
    dim = 2 * model.config.hidden_size
    cache = FeatureCache(cache_dir, model_name or _default_name(model), model_fingerprint(model)) \
        if cache_dir is not None else None
    todo = [i for i in range(len(images)) if cache is None or ids[i] not in cache.rows]
    out = np.zeros((len(images), dim), np.float32)
    if cache is not None:
        for i in set(range(len(images))) - set(todo):
            out[i] = cache.rows[ids[i]]
        log.info("features: %d cached, %d to compute (%s)", len(images) - len(todo), len(todo), cache.path)
    try:
        for start in tqdm(range(0, len(todo), batch_size), desc="DINOv2 features", disable=not progress):
            chunk = todo[start : start + batch_size]
            x = torch.stack([preprocess(_load(images[i])) for i in chunk]).to(device)
            feats = pooled_features(model(pixel_values=x).last_hidden_state).float().cpu().numpy()
            for i, f in zip(chunk, feats):
                out[i] = f
                if cache is not None:
                    cache.rows[ids[i]] = f
    finally:  # keep what was computed, even when interrupted
        if cache is not None and todo:
            cache.save()
    return out


# ----------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of both heads (the ``classify`` config section)."""

    standardize: bool = True  # z-score features with the training set's mean/std
    linear_hidden: tuple[int, ...] = (512, 128)
    linear_dropout: float = 0.2
    linear_lr: float = 1e-3
    linear_weight_decay: float = 0.0
    linear_epochs: int = 50
    linear_batch_size: int = 64
    sgd_alpha: float = 1e-3
    sgd_learning_rate: str = choice(SGD_LEARNING_RATES, "constant")
    sgd_eta0: float = 1e-3
    sgd_max_iter: int = 10_000
    sgd_tol: float | None = 1e-3  # None: no tolerance stop (scikit-learn's tol=None)
    sgd_n_iter_no_change: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_hidden", tuple(int(w) for w in self.linear_hidden))
        check_choices(self, "classify")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> HeadConfig:
        """From a config mapping; unknown keys are refused."""
        return cls(**check_keys(d, cls, "classify"))


def make_mlp(in_dim: int, hidden: Sequence[int] = (512, 128), dropout: float = 0.2) -> nn.Sequential:
    """The "3 linear layers" head: Linear-ReLU-Dropout per hidden width, then Linear to 1 logit."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, 1))


def _standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def fit_predict(head: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                config: HeadConfig = HeadConfig(), seed: int = 0) -> np.ndarray:
    """Fit one head and return the hybrid probability of each test row (float64)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
    if config.standardize:
        mean, std = _standardizer(x_train)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if head == "sgd":
        from sklearn.linear_model import SGDClassifier

        clf = SGDClassifier(
            loss="log_loss", penalty="l2", alpha=config.sgd_alpha, learning_rate=config.sgd_learning_rate,
            eta0=config.sgd_eta0, max_iter=config.sgd_max_iter, tol=config.sgd_tol,
            n_iter_no_change=config.sgd_n_iter_no_change, class_weight={0: 1, 1: 1}, random_state=seed,
        )
        clf.fit(x_train, y_train)
        return clf.predict_proba(x_test)[:, 1].astype(np.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_mlp(x_train.shape[1], config.linear_hidden, config.linear_dropout)
        opt = torch.optim.Adam(net.parameters(), lr=config.linear_lr, weight_decay=config.linear_weight_decay)
        xt = torch.as_tensor(x_train, dtype=torch.float32)
        yt = torch.as_tensor(y_train, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(config.linear_epochs):
            for idx in torch.randperm(len(xt), generator=gen).split(config.linear_batch_size):
                loss = F.binary_cross_entropy_with_logits(net(xt[idx])[:, 0], yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            return torch.sigmoid(net(torch.as_tensor(x_test, dtype=torch.float32))[:, 0]).double().numpy()


# ----------------------------------------------------------------------------- experiment


def training_sets(features_train: np.ndarray, labels_train: np.ndarray,
                  generated: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """{name: (X, y, n_generated)}: "train", "train+<key>" per generated set (labelled 1), and
    "train+both" (all generated sets; "train+all" when there are more than two)."""
    sets = {"train": (features_train, labels_train, 0)}
    pieces = {}
    for key, g in generated.items():
        g = np.asarray(g, dtype=np.float32)
        if g.ndim != 2 or g.shape[1] != features_train.shape[1] or len(g) == 0:
            raise ValueError(
                f"generated set {key!r} has shape {g.shape}; expected (n > 0, {features_train.shape[1]})"
            )
        pieces[key] = g
    combos = [(f"train+{k}", [k]) for k in pieces]
    if len(pieces) > 1:
        combos.append(("train+both" if len(pieces) == 2 else "train+all", list(pieces)))
    for name, keys in combos:
        g = np.concatenate([pieces[k] for k in keys])
        y = np.concatenate([labels_train, np.ones(len(g), np.int64)])
        sets[name] = (np.concatenate([features_train, g]), y, len(g))
    return sets


def run_classification(
    features_train: np.ndarray,
    labels_train: np.ndarray,
    generated: Mapping[str, np.ndarray],
    features_test: np.ndarray,
    test_filenames: Sequence[str],
    reference_df: pd.DataFrame,
    heads: Sequence[str] = HEADS,
    seed: int = 0,
    config: HeadConfig | None = None,
    out_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Train every head on every training set and score the test set with the challenge rule.

    One row per (head, train_set): recalls, challenge_score, the two thresholds, ``n_train``
    (rows fit on, generated included) and ``n_generated``. With ``out_dir``, writes
    ``<out_dir>/<head>_<train_set>.txt`` in the challenge's predictions format.
    """
    config = config or HeadConfig()
    x = np.asarray(features_train, dtype=np.float32)
    y = np.asarray(labels_train).astype(np.int64).reshape(-1)
    xt = np.asarray(features_test, dtype=np.float32)
    test_filenames = [str(n) for n in test_filenames]
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features_train {x.shape} and labels_train ({len(y)},) do not match")
    if not set(np.unique(y)) == {0, 1}:
        raise ValueError(f"labels_train must contain both 0 (non-hybrid) and 1 (hybrid), got {sorted(set(y))}")
    if xt.ndim != 2 or xt.shape[1] != x.shape[1] or len(xt) != len(test_filenames):
        raise ValueError(
            f"features_test {xt.shape} must have {x.shape[1]} columns and one row per test filename "
            f"({len(test_filenames)})"
        )
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        raise ValueError(f"unknown heads {unknown}; choose from {HEADS}")
    rows = []
    for train_set, (xs, ys, n_gen) in training_sets(x, y, generated).items():
        for head in heads:
            log.info("classify: %s head on %s (%d rows, %d generated)", head, train_set, len(xs), n_gen)
            scores = fit_predict(head, xs, ys, xt, config, seed)
            result = challenge_scores(pd.DataFrame({"filename": test_filenames, "score": scores}), reference_df)
            rows.append({
                "head": head, "train_set": train_set, "n_train": len(xs), "n_generated": n_gen,
                **{k: result[k] for k in ("major_recall", "minor_recall", "mimic_recall", "challenge_score",
                                          "species_a_threshold", "mimic_threshold")},
            })
            if out_dir is not None:
                write_predictions(Path(out_dir) / f"{head}_{train_set}.txt", test_filenames, scores)
    return pd.DataFrame(rows)
