"""Real-IAD (Wang et al., CVPR 2024): 30 objects, each photographed from five views (C1..C5),
with the train / test split given per category by JSON files.

The public layout (the images in one of the resolutions the authors ship, and the split files)::

    <root>/realiad_1024/<category>/OK/S0001/<category>_0001_OK_C1_<time>.jpg
    <root>/realiad_1024/<category>/NG/<defect code>/S0002/<category>_0002_NG_C3_<time>.jpg
    <root>/realiad_1024/<category>/NG/<defect code>/S0002/<category>_0002_NG_C3_<time>.png   (mask)
    <root>/realiad_jsons/realiad_jsons/<category>.json      (multi-view split; _sv, _fuiad_* beside it)

A split file is ``{"meta": {"normal_class": "OK", ...}, "train": [...], "test": [...]}`` whose entries
are ``{"category", "anomaly_class", "image_path", "mask_path"}``, paths relative to the category's
image folder. The reader follows the JSON: its ``train`` / ``test`` lists are the split, label 1 where
``anomaly_class`` is not the normal class (a view of a defective object in which the defect is not
visible is ``OK`` there, so label 0), defect = the anomaly class (``AK``, ``BX``, ... as the JSON
spells them; ``good`` for normal images), mask_path = the entry's mask. Which images exist is the
JSON's business: files in the folders that no JSON names are not read.

The view is part of every sample id, which is ``realiad/<category>/<image path without extension>``
(the file name carries ``_C<k>_``); ``views`` keeps only the named ones (e.g. ``[C1]``, a single-view
setting), taken from that token of the file name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hybrid.data._files import FileIndex, Problems, check_unique, folder, pick_categories
from hybrid.data.manifest import ManifestError

SPLITS = ("train", "test")
VIEW = re.compile(r"_(C\d+)(?:_|$)")


def view_of(path: str | Path) -> str | None:
    """The camera view (``C1`` .. ``C5``) in a Real-IAD file name, or None."""
    m = VIEW.search(Path(path).stem)
    return m.group(1) if m else None


def read_realiad(root: str | Path, images: str = "realiad_1024", jsons: str = "realiad_jsons/realiad_jsons",
                 categories: str | Iterable[str] | None = None, views: Iterable[str] | None = None,
                 missing: str = "error") -> pd.DataFrame:
    """Read Real-IAD through its per-category split JSONs.

    ``images`` (the category folders: realiad_256, realiad_512, realiad_1024 or realiad_raw) and
    ``jsons`` (the folder of ``<category>.json``: realiad_jsons, realiad_jsons_sv, ...) are relative to
    ``root`` unless absolute. A listed image that is absent, or an anomaly without its mask, raises
    with ``missing="error"`` or is dropped and listed in ``df.attrs["skipped"]`` with ``missing="skip"``.
    """
    root = folder(root, "realiad root")
    image_root = folder(root / images, "realiad images folder (option images)")
    json_dir = folder(root / jsons, "realiad split-file folder (option jsons)")
    available = sorted(p.stem for p in json_dir.glob("*.json") if not p.name.startswith("."))
    if not available:
        raise ManifestError(f"no <category>.json split files in {json_dir}; expected Real-IAD's "
                            "realiad_jsons/realiad_jsons/<category>.json (option jsons)")
    wanted_views = None if views is None else {str(v) for v in ([views] if isinstance(views, str) else views)}
    problems = Problems(missing, f"correct root (now {root}), images or jsons, or restore the files")
    files, rows = FileIndex(), []
    for cat in pick_categories(available, categories, json_dir):
        path = json_dir / f"{cat}.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ManifestError(f"{path} is not a readable JSON file ({e})") from e
        if not isinstance(doc, dict) or not any(s in doc for s in SPLITS):
            raise ManifestError(f"{path}: expected a Real-IAD split file with 'train' and/or 'test' lists")
        normal = str((doc.get("meta") or {}).get("normal_class", "OK"))
        base = image_root / cat
        entries = []
        for split in SPLITS:
            for i, e in enumerate(doc.get(split) or []):
                if not isinstance(e, dict) or not e.get("image_path") or "anomaly_class" not in e:
                    raise ManifestError(f"{path}: {split}[{i}] lacks image_path or anomaly_class")
                entries.append((split, e))
        ids = pd.Series([Path(e["image_path"]).with_suffix("").as_posix() for _, e in entries], dtype=object)
        check_unique(ids, path)
        for (split, e), rel in sorted(zip(entries, ids), key=lambda x: (SPLITS.index(x[0][0]), x[1])):
            if wanted_views is not None and view_of(e["image_path"]) not in wanted_views:
                continue
            label = int(str(e["anomaly_class"]) != normal)
            defect = str(e["anomaly_class"]) if label else "good"
            image = files.find(base / e["image_path"])
            if image is None:
                problems.add(base / e["image_path"], path, "missing", cat, defect)
                continue
            mask = files.find(base / e["mask_path"]) if e.get("mask_path") else None
            if label and mask is None:
                problems.add(image, path, "no mask", cat, defect)
                continue
            rows.append({"sample_id": f"realiad/{cat}/{rel}", "dataset": "realiad", "category": cat,
                         "split": split, "label": label, "defect": defect, "image_path": str(image),
                         "mask_path": str(mask) if mask else None})
    if not rows and not problems.records:
        raise ManifestError(f"no realiad images listed in {json_dir}" + (f" for views {sorted(wanted_views)}"
                                                                         if wanted_views is not None else ""))
    return problems.manifest(rows, "realiad", json_dir)
