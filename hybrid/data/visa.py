"""VisA: images listed in a split CSV (``split_csv/1cls.csv``: object, split, label, image, mask).

label is 'normal' or 'anomaly'; image and mask are paths relative to the dataset root (mask is
empty for normal images). sample_id is ``visa/<image path without extension>``, e.g.
``visa/candle/Data/Images/Normal/0000``; rows are sorted by object, split and image.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hybrid.data._files import FileIndex, Problems, check_unique, folder, pick_categories, read_csv
from hybrid.data.manifest import ManifestError

COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def read_visa(root: str | Path, split_csv: str | Path = "split_csv/1cls.csv",
              categories: str | Iterable[str] | None = None,
              missing: str = "error") -> pd.DataFrame:
    """Read VisA through its split CSV (relative to ``root`` unless absolute).

    Image and mask extensions are matched in any case. An anomaly without a mask (empty cell or
    absent file), like a missing image, raises with ``missing="error"`` or is dropped and listed in
    ``df.attrs["skipped"]`` with ``missing="skip"``.
    """
    root = folder(root, "visa root")
    csv, df = read_csv(root / split_csv, COLUMNS, "VisA split CSV",
                       nonempty=("object", "split", "label", "image"))
    bad = sorted(set(df["label"]) - set(LABELS))
    if bad:
        raise ManifestError(f"{csv}: label values {bad} are not 'normal' or 'anomaly'")
    wanted = pick_categories(sorted(df["object"].dropna().unique()), categories, csv)
    df = df[df["object"].isin(wanted)].sort_values(["object", "split", "image"])
    df = df.assign(id=df["image"].map(lambda p: Path(p).with_suffix("").as_posix()))
    check_unique(df["id"], csv)

    problems = Problems(missing, f"correct root (now {root}) or restore the files")
    files, rows = FileIndex(), []
    for r in df.to_dict("records"):
        image = files.find(root / r["image"])
        if image is None:
            problems.add(root / r["image"], csv, "missing", r["object"])
            continue
        mask = files.find(root / r["mask"]) if isinstance(r["mask"], str) else None
        label = LABELS[r["label"]]
        if label and mask is None:
            problems.add(image, csv, "no mask", r["object"])
            continue
        rows.append({"sample_id": f"visa/{r['id']}", "dataset": "visa", "category": r["object"],
                     "split": r["split"], "label": label, "defect": None if label else "good",
                     "image_path": str(image), "mask_path": str(mask) if mask else None})
    return problems.manifest(rows, "visa", csv)
