"""A plain folder of normal images, optionally one of abnormal images and one of their masks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hybrid.data._files import FileIndex, Problems, folder, list_images, subfolders
from hybrid.data.manifest import ManifestError


def read_folder(normal_dir: str | Path, abnormal_dir: str | Path | None = None,
                mask_dir: str | Path | None = None, category: str = "default",
                missing: str = "error") -> pd.DataFrame:
    """Normal images -> split "train", label 0; abnormal images -> split "test", label 1.

    Only images directly in each folder are read (hidden and non-image files are ignored), plus,
    in ``abnormal_dir``, one level of sub-folders: each is a defect type (``abnormal_dir/scratch/
    *.png`` -> defect "scratch", whose masks are in ``mask_dir/scratch/``); images directly in
    ``abnormal_dir`` have no defect type. With ``mask_dir``, each abnormal image needs a mask
    ``<stem>.<ext>`` or ``<stem>_mask.<ext>`` (any image extension, any case); one without raises
    (``missing="error"``) or is dropped and listed in ``df.attrs["skipped"]``. sample_id is
    ``folder/<category>/<split>/<stem>``, or ``folder/<category>/test/<defect>/<stem>``.
    """
    normal = folder(normal_dir, "normal_dir")
    abnormal = folder(abnormal_dir, "abnormal_dir") if abnormal_dir is not None else None
    masks = folder(mask_dir, "mask_dir") if mask_dir is not None else None
    if masks and not abnormal:
        raise ValueError("mask_dir is set but abnormal_dir is not; masks belong to abnormal images")
    problems = Problems(missing, f"correct mask_dir (now {masks}) or add the masks")
    files = FileIndex()

    def row(image: Path, split: str, label: int, mask: Path | None = None,
            defect: str | None = None) -> dict:
        sub = f"{split}/{defect}" if defect else split
        return {"sample_id": f"folder/{category}/{sub}/{image.stem}", "dataset": "folder",
                "category": category, "split": split, "label": label,
                "defect": defect if label else "good", "image_path": str(image),
                "mask_path": str(mask) if mask else None}

    rows = [row(image, "train", 0) for image in list_images(normal)]
    if not rows:
        raise ManifestError(f"normal_dir {normal} holds no images (png, jpg, jpeg, bmp, tif, tiff)")
    groups = [(None, abnormal), *((d, abnormal / d) for d in subfolders(abnormal))] if abnormal else []
    for defect, images in groups:
        for image in list_images(images):
            mask = None
            if masks:
                where, stem = masks / defect if defect else masks, image.stem
                mask = files.find_stem(where, stem) or files.find_stem(where, f"{stem}_mask")
                if mask is None:
                    problems.add(image, where, "no mask", category, defect)
                    continue
            rows.append(row(image, "test", 1, mask, defect))
    return problems.manifest(rows, "folder", normal)
