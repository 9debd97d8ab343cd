"""The classify_defects stage: a ResNet-34 trained on generated anomalies classifies real defects.

The industrial protocol of the papers (AnomalyHybrid Tables 5 and 7, after DFMGAN and
AnomalyDiffusion): per category, a ResNet-34 (ImageNet weights through the model store as
``resnet34``, torchvision's layout, loaded unchanged; a seeded random stand-in labelled as such
when they are absent and ``weights: auto``) is fine-tuned on the generated local anomalies of one
variant (AHD, AHE or both decoders; optionally one manipulation subset, Table 7's rows), labelled
with the defect type each was generated from, and tested on the category's real *eval* anomalies
(the two thirds not used as generation base), labelled with their defect type. The number is the
accuracy; the mean over categories is the table's last row.

Training recipe (``ClassifyDefectsConfig``; the papers give no recipe, these values are ours):
Adam at ``lr`` for ``epochs`` over the generated set, batch ``batch_size``, inputs resized to
``input_size`` (256 as the papers' images), random left-right / top-bottom flips, ImageNet
normalisation, cross-entropy; bf16 autocast and channels_last on CUDA. Seeds fix the stand-in,
the new head, the batch order and the flips.

Nothing is dropped silently: a category with fewer than two generated defect types, no eval
anomalies, or eval defect types the generator never made gets a row with the reason (those eval
images count as errors: the classifier cannot name a type it never saw).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hybrid.config import PRECISIONS, WEIGHT_MODES, check_choices, check_device, check_keys, choice, resolve_device
from hybrid.io import write_json_atomic, write_parquet_atomic
from hybrid.manipulate import MANIPULATION_NAMES
from hybrid.models.generator import DECODERS
from hybrid.models.resnet import ARCHS, load_resnet, normalize
from hybrid.stages.evaluate import read_images, read_inputs

log = logging.getLogger(__name__)

MEAN = "(mean)"
COLUMNS = ["category", "variant", "manipulation", "accuracy", "n_train", "n_test", "n_classes", "classes",
           "weights", "note"]


@dataclass
class ClassifyDefectsConfig:
    """The ``classify_defects`` config section (``paths``: store name -> explicit weights file)."""

    enabled: str | bool = choice(("auto", True, False), "auto")  # auto: industrial layouts (the rules decide)
    weights: str = choice(WEIGHT_MODES, "auto")
    arch: str = choice(tuple(ARCHS), "resnet34")
    variants: list[str] = choice((*DECODERS, "both"), default_factory=lambda: ["AHD", "AHE", "both"])
    manipulations: list[str] = choice(("all", *MANIPULATION_NAMES), default_factory=lambda: ["all"])  # Table 7's rows
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 32
    input_size: int = 256
    flips: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = choice(PRECISIONS, "auto")  # auto: bf16 on cuda
    paths: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.enabled, str) and self.enabled.lower() in ("true", "false"):
            self.enabled = self.enabled.lower() == "true"  # from a --config override
        if not self.variants:
            raise ValueError("classify_defects.variants is empty; use some of AHD, AHE, both")
        if not self.manipulations:
            raise ValueError("classify_defects.manipulations is empty; use all and/or merge, remove, replace, tps")
        check_choices(self, "classify_defects")
        check_device(self.device, "classify_defects.device")
        for key in ("epochs", "batch_size", "input_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"classify_defects.{key} must be at least 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"classify_defects.lr must be positive, got {self.lr}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> ClassifyDefectsConfig:
        d = check_keys(d, cls, "classify_defects")
        d["paths"] = dict(d.get("paths") or {})
        return cls(**d)


def _tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in 0..1."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def train_and_test(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, n_classes: int,
                   cfg: ClassifyDefectsConfig, device: torch.device, seed: int) -> tuple[np.ndarray, str]:
    """Fine-tune a fresh ResNet on (train_x, train_y); the predicted classes of ``test_x`` and the
    label of the backbone's weights."""
    torch.manual_seed(seed)
    model = load_resnet(cfg.arch, cfg.weights, cfg.paths.get(cfg.arch), seed=cfg.seed)
    label = model.weights_label
    model.replace_fc(n_classes, seed=seed)
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and cuda)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=g)
        for lo in range(0, len(order), cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            x = train_x[idx]
            if cfg.flips:
                flip = torch.rand(2, len(idx), generator=g) < 0.5
                x = torch.where(flip[0, :, None, None, None], x.flip(-1), x)
                x = torch.where(flip[1, :, None, None, None], x.flip(-2), x)
            x = normalize(x.to(device, non_blocking=True)).contiguous(memory_format=fmt)
            with autocast:
                loss = F.cross_entropy(model(x).float(), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    preds = []
    with torch.no_grad(), autocast:
        for lo in range(0, len(test_x), cfg.batch_size):
            x = normalize(test_x[lo:lo + cfg.batch_size].to(device)).contiguous(memory_format=fmt)
            preds.append(model(x).float().argmax(1).cpu())
    return torch.cat(preds).numpy(), label


def eval_anomalies(manifest: pd.DataFrame, index: pd.DataFrame, category: str) -> pd.DataFrame:
    """The category's real eval anomalies in the shards (with their defect), sorted by sample id."""
    m = manifest[(manifest["category"] == category) & (manifest["split"] == "test") & (manifest["label"] == 1)]
    if "protocol" in m.columns and m["protocol"].notna().any():
        m = m[m["protocol"] == "eval"]
    rows = index.merge(m[["sample_id", "defect"]], on="sample_id")
    return rows.sort_values("sample_id").reset_index(drop=True)


def run(generated_manifest: str | Path | pd.DataFrame, generated_dir: str | Path, manifest: str | Path | pd.DataFrame,
        shard_index: str | Path, out_dir: str | Path, cfg: ClassifyDefectsConfig | Mapping | None = None) -> dict:
    """Train and test per category, variant and manipulation subset; write
    ``out_dir/classify_defects.json`` and ``.parquet``; return the JSON content."""
    cfg = cfg if isinstance(cfg, ClassifyDefectsConfig) else ClassifyDefectsConfig.from_dict(cfg)
    gen, real, index, shard_dir = read_inputs(generated_manifest, manifest, shard_index)
    device = resolve_device(cfg.device)
    if "defect" not in gen.columns or not gen["defect"].notna().any():
        raise ValueError("classify_defects needs generated anomalies labelled with their defect type: generate "
                         "with generate.local.source: base (the industrial protocol) so each records its defect")
    gen = gen[(gen["kind"] == "local") & gen["defect"].notna()].reset_index(drop=True)
    rows, skipped = [], []
    weights = None
    for category in sorted(gen["category"].astype(str).unique()):
        g = gen[gen["category"] == category].reset_index(drop=True)
        test = eval_anomalies(real, index, category)
        classes = sorted(g["defect"].astype(str).unique())
        base = {"category": category, "n_classes": len(classes), "classes": ", ".join(classes)}
        if len(classes) < 2 or test.empty:
            why = (f"{len(classes)} generated defect type(s) ({', '.join(classes)}); classification needs 2"
                   if len(classes) < 2 else f"no real eval anomalies of {category} in the shards")
            skipped.append({"category": category, "reason": why})
            log.warning("classify_defects: %s skipped: %s", category, why)
            rows.append({**base, "variant": "all", "manipulation": "all", "accuracy": math.nan, "note": why})
            continue
        unseen = sorted(set(test["defect"].astype(str)) - set(classes))
        note = (f"eval defect types never generated, counted as errors: {', '.join(unseen)}" if unseen else "")
        if unseen:
            skipped.append({"category": category, "reason": note})
        test_x = _tensor(read_images(test, shard_dir), cfg.input_size)
        lookup = {c: i for i, c in enumerate(classes)}
        test_y = np.array([lookup.get(str(d), -1) for d in test["defect"]])
        all_images = read_images(g, generated_dir)
        for variant in cfg.variants:
            for manip in cfg.manipulations:
                sel = np.ones(len(g), bool) if variant == "both" else (g["decoder"] == variant).to_numpy(copy=True)
                if manip != "all":
                    sel = sel & (g["manipulation"] == manip).to_numpy()
                labels = g.loc[sel, "defect"].astype(str)
                row = {**base, "variant": variant, "manipulation": manip, "n_train": int(sel.sum()),
                       "n_test": len(test), "note": note}
                if labels.nunique() < 2:
                    why = f"{labels.nunique()} defect type(s) among the {int(sel.sum())} {variant}/{manip} images"
                    skipped.append({"category": category, "variant": variant, "manipulation": manip, "reason": why})
                    rows.append({**row, "accuracy": math.nan, "note": why})
                    continue
                seed = cfg.seed + 1000 * cfg.variants.index(variant) + cfg.manipulations.index(manip)
                pred, weights = train_and_test(_tensor(all_images[sel], cfg.input_size),
                                               torch.tensor([lookup[c] for c in labels]), test_x, len(classes),
                                               cfg, device, seed)
                acc = float((pred == test_y).mean())
                log.info("classify_defects: %s %s/%s: accuracy %.4f (%d generated, %d real eval)", category,
                         variant, manip, acc, int(sel.sum()), len(test))
                rows.append({**row, "accuracy": acc, "weights": weights})
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    means = []
    for (variant, manip), part in table[table["variant"] != "all"].groupby(["variant", "manipulation"], sort=False):
        scored = part["accuracy"].notna()
        means.append({"category": MEAN, "variant": variant, "manipulation": manip,
                      "accuracy": part["accuracy"].mean(), "n_train": int(part["n_train"].sum()),
                      "n_test": int(part["n_test"].sum()), "weights": weights,
                      "note": f"mean over {int(scored.sum())} of {table['category'].nunique()} categories"})
    table = pd.concat([table, pd.DataFrame(means)], ignore_index=True).reindex(columns=COLUMNS)
    for c in ("n_train", "n_test", "n_classes"):
        table[c] = table[c].astype("Int64")
    result = {
        "stage": "classify_defects",
        "weights": weights,
        "rows": [{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in r.items()}
                 for r in table.to_dict("records")],
        "skipped": skipped,
        "config": {k: v for k, v in asdict(cfg).items() if k != "paths"},
    }
    out_dir = Path(out_dir)
    write_parquet_atomic(table, out_dir / "classify_defects.parquet")
    write_json_atomic(out_dir / "classify_defects.json", result)
    log.info("classify_defects: wrote %s (%d rows, %d skipped)", out_dir / "classify_defects.json", len(table),
             len(skipped))
    return result
