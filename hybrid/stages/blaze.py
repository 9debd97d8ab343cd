"""AnomalyFactory's BlazeDetector (paper 002, Sec. 3.4): the same network turned into a localiser.

Eq. 1 read the other way: the input is an anomaly image with its anomaly edge map, the texture
decoder makes the *normal* content and the heatmap H_B says where the input is anomalous. The
generator level ``blaze`` of :data:`hybrid.models.generator.ROLES` is that: conditions
[target_image (the anomaly image), target_edge (its edge map)], the fused base is the anomaly image,
the decoder learns the normal image (reference_image).

Training pairs come from the frozen Flare, on the fly: the samples of :class:`ManipulatedPairs`
(a normal image I, its edge map edited inside drawn regions: E'), Flare(E', I) with feature noise
of std ``noise_std`` gives the anomaly image A and its heatmap H_F; Blaze learns
G(A, E') -> I with the pix2pixHD losses (VGG or the train section's L1) plus ``w_bh`` x MSE(H_B, H_F)
(Eq. 7, W_BH = 10), 5 epochs by default. Regions and manipulations are drawn as for Flare (the
``anomalyfactory.flare`` settings). ``init: flare`` starts from Flare's weights (every tensor whose
name and shape match: all of them, the input layout being 3 + 1 channels in both) - the paper only
says the architecture is the same [I]; ``scratch`` from pix2pixHD's init.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid.augment import AugmentConfig
from hybrid.checkpoint import keeps_published, published
from hybrid.config import check_choices, check_keys, choice
from hybrid.manipulate import opencv_threads
from hybrid.models.generator import Generator
from hybrid.seeds import derive_seed
from hybrid.stages.boot import DECODER, blaze_model_config, load_af_checkpoint
from hybrid.stages.flare import (
    FlareConfig,
    ManipulatedPairs,
    af_run,
    feature_noise,
    file_stamp,
    train_af,
    work_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlazeConfig:
    """The ``anomalyfactory.blaze`` section. Paper: 5 epochs, W_BH = 10."""

    epochs: int = 5
    batch_size: int = 32
    w_bh: float = 10.0
    noise_std: float = 0.1  # Flare's feature noise when it makes Blaze's training anomalies
    init: str = choice(("flare", "scratch"), "flare")  # flare: start from Flare's weights

    def __post_init__(self) -> None:
        check_choices(self, "anomalyfactory.blaze")
        if self.epochs < 1 or self.batch_size < 1 or self.w_bh < 0 or self.noise_std < 0:
            raise ValueError("anomalyfactory.blaze: epochs and batch_size >= 1, w_bh and noise_std >= 0")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> BlazeConfig:
        return cls(**check_keys(d, cls, "anomalyfactory.blaze"))


@torch.no_grad()
def flare_anomalies(flare: Generator, batch: Mapping[str, torch.Tensor], noise_std: float,
                    seed: int) -> dict[str, torch.Tensor]:
    """The frozen Flare's anomaly image A and heatmap H_F for a batch of (reference_image, target_edge)."""
    cond = flare.inputs(batch)
    noise = feature_noise(flare, len(cond), *cond.shape[-2:], noise_std, seed, cond.device)
    out = flare(cond, noise)[DECODER]
    return {"image": out["image"], "heat": out["mask"]}


@torch.no_grad()
def blaze_targets(G: Generator, flare: Generator, batch: Mapping[str, torch.Tensor], noise_std: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """Blaze's conditions (A, E'), its target (the normal image I) and heatmap target H_F."""
    a = flare_anomalies(flare, batch, noise_std, seed)
    cond = G.inputs({"target_image": a["image"], "target_edge": batch["target_edge"]})
    return {"cond": cond, "target": batch["reference_image"], "heat": a["heat"], "anomaly": a["image"]}


def run(index: str | Path, manifest: str | Path, flare: str | Path, checkpoint: str | Path,
        losses: str | Path, samples: str | Path, work_root: str | Path, train_cfg: Mapping,
        blaze_cfg: Mapping, flare_cfg: Mapping, augment_cfg: Mapping, manipulate_cfg: Mapping,
        sam_cfg: Mapping | None = None, regions: str | Path | None = None, select: Mapping | None = None,
        per_dataset: Mapping[str, int] | None = None, seed: int = 0, paths: Mapping | None = None,
        threads: int = 1, max_steps: int | None = None) -> Path:
    """The blaze stage: Blaze learns from the Flare checkpoint ``flare``'s anomalies (see the module doc)."""
    torch.set_num_threads(max(1, threads))
    bc, fc = BlazeConfig.from_dict(blaze_cfg), FlareConfig.from_dict(flare_cfg)
    flare_G, flare_config = load_af_checkpoint(flare, "flare", "the blaze stage")
    model = blaze_model_config(flare_G.config)
    r = af_run("blaze", fc, bc.epochs, bc.batch_size, index, manifest, train_cfg, augment_cfg, manipulate_cfg, sam_cfg,
               regions, select, per_dataset, seed, paths)
    train, aug, man, max_regions, store = r.train, r.augment, r.manipulate, r.max_regions, r.store
    base, idx, data, fingerprints = r.base, r.idx, r.data, r.fingerprints
    train_seed = int(train.get("seed", 0))
    pairs = ManipulatedPairs(base, AugmentConfig.from_dict(aug), man, fc.manipulations, fc.region_mix, store,
                             max_regions, train_seed + 1)  # other draws than Flare's own training
    key = work_key(model=model, train=train, blaze=dataclasses.asdict(bc), flare=dataclasses.asdict(fc), augment=aug,
                   manipulate=dataclasses.asdict(man), shards=fingerprints, ids=sorted(idx["sample_id"]),
                   flare_ckpt=file_stamp(Path(flare)), regions=str(regions) if store else None, max_regions=max_regions)
    work_root = Path(work_root)
    work = work_root / key
    log.info("blaze: %d training images, anomalies from Flare %s (noise std %g); init %s; work %s", len(pairs), flare,
             bc.noise_std, bc.init, work)

    def targets(G: Generator, batch: Mapping[str, torch.Tensor], step: int) -> dict:
        t = blaze_targets(G, flare_G, batch, bc.noise_std, derive_seed(train_seed, step, 2))
        t["columns"] = [("normal", batch["reference_image"]), ("region", batch["region"]),
                        ("anomaly edge", batch["target_edge"]), ("Flare anomaly", t["anomaly"]),
                        ("heat Flare", t["heat"])]
        return t

    with keeps_published("blaze", checkpoint, work_root, work), opencv_threads(1):  # pairs' OpenCV: one thread
        out = train_af("blaze", pairs, targets, checkpoint, work, model, train, bc.w_bh, 0.0,
                       flare if bc.init == "flare" else None,
                       {**dataclasses.asdict(bc), "flare": str(flare), "regions": store.status if store else "off",
                        "region_mix": fc.region_mix, "manipulations": list(fc.manipulations)},
                       augment_cfg=aug, max_steps=max_steps, losses_csv=losses, samples_dir=samples,
                       data={**data, "flare_data": flare_config.get("data")}, teachers=(flare_G,))
    if out == Path(checkpoint):
        published("blaze", out, work_root, work)
    return out
