"""The export stage: generated anomalies and their masks as an MVTec AD folder tree.

``<out>/<category>/train/good/NNN.png`` holds the normal training images (the real ones from the
preprocess shards, and/or the generated normal images: ``train_good``), ``<category>/test/<defect>/
NNN.png`` the generated local anomalies with their ground-truth regions as
``<category>/ground_truth/<defect>/NNN_mask.png`` (0 / 255), and ``<category>/test/good/NNN.png``
the real normal test images, so any MVTec AD tool (and this project's ``mvtec_ad`` reader) takes the
tree as it is. The defect folder is the generated row's ``defect`` (defect-aware generation from
the protocol's base set) where it has one, else ``generated_<decoder>_<manipulation>``. Images are
at the working resolution, as stored. ``export.csv`` at the root lists every file with the sample
it came from. The tree is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from hybrid.config import check_choices, check_keys, choice
from hybrid.data.manifest import read_manifest
from hybrid.data.shards import ShardDataset
from hybrid.io import atomic_dir
from hybrid.models.generator import DECODERS

log = logging.getLogger(__name__)

TRAIN_GOOD = ("real", "generated", "both")


@dataclass(frozen=True)
class ExportConfig:
    """The ``export`` config section (``enabled`` only decides whether ``rule all`` asks for it)."""

    enabled: bool = False
    decoders: tuple[str, ...] = choice(DECODERS, DECODERS)  # generated anomalies of these decoders
    train_good: str = choice(TRAIN_GOOD, "real")  # what goes to train/good
    test_good: bool = True  # the real normal test images as test/good

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoders", tuple(self.decoders))
        if not self.decoders:
            raise ValueError("export.decoders: name at least one decoder (AHD, AHE)")
        check_choices(self, "export")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> ExportConfig:
        return cls(**check_keys(d, cls, "export"))


@dataclass(frozen=True)
class Inputs:
    manifest: Path  # results/manifest.parquet
    index: Path  # results/shards/index.parquet
    generated: Path  # results/generated/manifest.parquet


def folder_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "_"


def defect_names(gen: pd.DataFrame) -> pd.Series:
    """The test folder of each generated row: its ``defect`` where set, else generated_<decoder>_<manipulation>."""
    fallback = "generated_" + gen["decoder"].astype(str) + "_" + gen["manipulation"].astype(str)
    if "defect" not in gen.columns:
        return fallback.map(folder_name)
    d = gen["defect"].astype("string")
    return d.where(d.notna() & (d.str.len() > 0), fallback).astype(str).map(folder_name)


def _png(path: Path, image: np.ndarray) -> None:
    a = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def run(inputs: Inputs, out_dir: str | Path, cfg: ExportConfig | Mapping | None = None) -> pd.DataFrame:
    """Write the tree to ``out_dir``; return its listing (file, mask, category, split, defect, source,
    sample_id), also written as ``out_dir/export.csv``."""
    cfg = cfg if isinstance(cfg, ExportConfig) else ExportConfig.from_dict(cfg)
    out_dir = Path(out_dir)
    manifest = read_manifest(inputs.manifest)
    real = manifest.merge(pd.read_parquet(inputs.index), on="sample_id")
    real_dir, gen_dir = Path(inputs.index).parent, Path(inputs.generated).parent
    gen = pd.read_parquet(inputs.generated)
    gen = gen.assign(category=gen["category"].astype(str), kind=gen["kind"].astype(str),
                     decoder=gen["decoder"].astype(str))
    local = gen[(gen["kind"] == "local") & gen["decoder"].isin(cfg.decoders)].copy()
    if local.empty:
        raise ValueError(f"export: the generated manifest {inputs.generated} has no local anomalies from decoders "
                         f"{list(cfg.decoders)} (kinds {sorted(gen['kind'].unique())}, decoders "
                         f"{sorted(gen['decoder'].unique())}); enable generate.kinds local or set export.decoders")
    local["folder"] = defect_names(local)
    listing: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        for category in sorted(local["category"].unique()):
            listing += _category(tmp, category, real, local[local["category"] == category], gen, real_dir, gen_dir, cfg)
        table = pd.DataFrame(listing, columns=["file", "mask", "category", "split", "defect", "source", "sample_id"])
        table.to_csv(tmp / "export.csv", index=False)
    log.info("export: wrote %s: %d images in %d categories (%s)", out_dir, len(table), table["category"].nunique(),
             ", ".join(f"{k} {v}" for k, v in table.groupby(["split", "defect"]).size().items()))
    log.info("export settings: %s", asdict(cfg))
    return table


def _category(root: Path, category: str, real: pd.DataFrame, local: pd.DataFrame, gen: pd.DataFrame,
              real_dir: Path, gen_dir: Path, cfg: ExportConfig) -> list[dict]:
    c = folder_name(category)
    rows: list[dict] = []

    def write_images(split: str, defect: str, frame: pd.DataFrame, shard_dir: Path, source: str,
                     start: int = 0, masks: bool = False) -> int:
        if frame.empty:
            return start
        frame = frame.sort_values("sample_id").reset_index(drop=True)
        data = ShardDataset(frame[["sample_id", "shard", "index"]], ["image", "region"] if masks else ["image"],
                            shard_dir, raw=True)
        folder = root / c / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        for i, sid in enumerate(frame["sample_id"].astype(str)):
            item = data[i]
            name = f"{start + i:03d}"
            _png(folder / f"{name}.png", item["image"])
            mask = None
            if masks:
                gt = root / c / "ground_truth" / defect
                gt.mkdir(parents=True, exist_ok=True)
                _png(gt / f"{name}_mask.png", np.where(item["region"] > 127, 255, 0).astype(np.uint8))
                mask = f"{c}/ground_truth/{defect}/{name}_mask.png"
            rows.append({"file": f"{c}/{split}/{defect}/{name}.png", "mask": mask, "category": category,
                         "split": split, "defect": defect, "source": source, "sample_id": sid})
        data.close()
        return start + len(frame)

    cat = real[real["category"].astype(str) == category]
    n = 0
    if cfg.train_good in ("real", "both"):
        n = write_images("train", "good", cat[(cat["split"] == "train") & (cat["label"] == 0)], real_dir, "real")
    if cfg.train_good in ("generated", "both"):
        normals = gen[(gen["category"] == category) & (gen["kind"] == "normal") & gen["decoder"].isin(cfg.decoders)]
        n = write_images("train", "good", normals, gen_dir, "generated", n)
    if n == 0:
        log.warning("export: %s has no train/good images (train_good: %s)", category, cfg.train_good)
    for defect, part in local.groupby("folder", sort=True):
        write_images("test", str(defect), part, gen_dir, "generated", masks=True)
    if cfg.test_good:
        write_images("test", "good", cat[(cat["split"] == "test") & (cat["label"] == 0)], real_dir, "real")
    return rows
