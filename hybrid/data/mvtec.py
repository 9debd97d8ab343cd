"""MVTec AD, MVTec 3D-AD and MVTec LOCO AD: category folders of split/defect image folders.

Every layout is ``root/<category>/<split>/<defect>/...`` with splits train, validation (-> "val")
and test; "good" images are label 0, every other defect folder label 1. Hidden files and
non-images (license.txt, readme, .DS_Store) are ignored; image extensions are matched in any case.
sample_id is ``<dataset>/<category>/<split>/<defect>/<stem>``; rows are sorted by category,
split, defect and file name. An anomalous image without its mask (or a 3D-AD image without its
xyz depth) raises with ``missing="error"``, or is dropped and listed in ``df.attrs["skipped"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from hybrid.data._files import FileIndex, Problems, entries, folder, list_images, pick_categories, subfolders
from hybrid.data.manifest import ManifestError

SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}
DEPTH_EXTS = (".tiff", ".tif")
Categories = str | Iterable[str] | None  # one name, several, or None / [] for all


def _walk(root: Path, categories: Categories) -> Iterator[tuple[str, str, str, Path]]:
    """(category, split, defect, defect folder) for every defect folder, in sorted order."""
    available = [c for c in subfolders(root) if any((root / c / s).is_dir() for s in SPLIT_DIRS)]
    for cat in pick_categories(available, categories, root):
        for split_dir, split in SPLIT_DIRS.items():
            for defect in subfolders(root / cat / split_dir):
                yield cat, split, defect, root / cat / split_dir / defect


def _row(dataset: str, cat: str, split: str, defect: str, image: Path,
         mask: Path | None = None, depth: Path | None = None) -> dict:
    return {"sample_id": f"{dataset}/{cat}/{split}/{defect}/{image.stem}", "dataset": dataset,
            "category": cat, "split": split, "label": int(defect != "good"), "defect": defect,
            "image_path": str(image), "mask_path": str(mask) if mask else None,
            "depth_path": str(depth) if depth else None}


def _problems(missing: str, root: Path) -> Problems:
    return Problems(missing, f"correct root (now {root}) or restore the files")


def _finish(rows: list[dict], problems: Problems, dataset: str, root: Path,
            layout: str) -> pd.DataFrame:
    if not rows and not problems.records:
        raise ManifestError(f"no {dataset} images found under {root}; expected {layout}")
    return problems.manifest(rows, dataset, root)


def read_mvtec_ad(root: str | Path, categories: Categories = None,
                  missing: str = "error") -> pd.DataFrame:
    """MVTec AD: ``<cat>/{train,test}/<defect>/*.png``; an anomaly's mask is
    ``<cat>/ground_truth/<defect>/<stem>_mask.png``."""
    return read_ad_tree(root, categories, missing, "mvtec_ad")


def read_ad_tree(root: str | Path, categories: Categories, missing: str, dataset: str) -> pd.DataFrame:
    """An MVTec AD tree read as ``dataset`` (ids ``<dataset>/...``): MVTec AD and MAD-Sim."""
    root = folder(root, f"{dataset} root")
    problems, files, rows = _problems(missing, root), FileIndex(), []
    for cat, split, defect, d in _walk(root, categories):
        for image in list_images(d):
            mask = None
            if defect != "good":
                gt = root / cat / "ground_truth" / defect
                mask = files.find_stem(gt, f"{image.stem}_mask")
                if mask is None:
                    problems.add(image, gt, "no mask", cat, defect)
                    continue
            rows.append(_row(dataset, cat, split, defect, image, mask))
    return _finish(rows, problems, dataset, root, "<category>/train/good/*.png")


def read_mvtec_3d(root: str | Path, categories: Categories = None,
                  missing: str = "error") -> pd.DataFrame:
    """MVTec 3D-AD: ``<cat>/<split>/<defect>/rgb/*.png``, ``xyz/<stem>.tiff``, ``gt/<stem>.png``.

    The xyz tiff becomes depth_path (required); gt becomes mask_path where present (required for
    anomalies; the all-black masks of good test images are kept too).
    """
    root = folder(root, "mvtec_3d root")
    problems, files, rows = _problems(missing, root), FileIndex(), []
    for cat, split, defect, d in _walk(root, categories):
        for image in list_images(d / "rgb"):
            depth = files.find_stem(d / "xyz", image.stem, DEPTH_EXTS)
            mask = files.find_stem(d / "gt", image.stem)
            if depth is None:
                problems.add(image, d / "xyz", "no depth", cat, defect)
            elif mask is None and defect != "good":
                problems.add(image, d / "gt", "no mask", cat, defect)
            else:
                rows.append(_row("mvtec_3d", cat, split, defect, image, mask, depth))
    return _finish(rows, problems, "mvtec_3d", root, "<category>/train/good/rgb/*.png")


def read_mvtec_loco(root: str | Path, categories: Categories = None,
                    missing: str = "error") -> pd.DataFrame:
    """MVTec LOCO AD: ``<cat>/<split>/<defect>/*.png``; masks are folders of PNGs.

    An anomaly's mask_path is the folder ``<cat>/ground_truth/<defect>/<stem>/`` (000.png,
    001.png, ...; the image loader takes the union of its PNGs); it must hold at least one PNG.
    """
    root = folder(root, "mvtec_loco root")
    problems, rows = _problems(missing, root), []
    for cat, split, defect, d in _walk(root, categories):
        for image in list_images(d):
            mask = None
            if defect != "good":
                mask = root / cat / "ground_truth" / defect / image.stem
                if not any(e.is_file() and e.name.lower().endswith(".png") for e in entries(mask)):
                    problems.add(image, mask.parent, "no mask", cat, defect)
                    continue
            rows.append(_row("mvtec_loco", cat, split, defect, image, mask))
    return _finish(rows, problems, "mvtec_loco", root, "<category>/train/good/*.png")
