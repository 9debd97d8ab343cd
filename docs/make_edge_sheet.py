"""docs/edges_depth.png: image | PiDiNet edges | Canny edges | depth, for demo and real photos.

    HYBRID_MODEL_DIR=... python docs/make_edge_sheet.py PHOTO.png [PHOTO.png ...]

PiDiNet uses the real table5_pidinet weights (found through the model store); depth is the demo's
own height map for demo images and Depth Anything V2 Small for photos when its weights are
present (otherwise the depth cell says so).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hybrid.data.demo import DemoConfig, make_demo
from hybrid.data.images import read_image
from hybrid.models.depth import load_depth_anything, predict_depth, sensor_nearness
from hybrid.models.edges import make_edge_detector
from hybrid.models.store import MissingWeightsError
from hybrid.viz import contact_sheet

SIZE = 256


def gray(a: np.ndarray) -> np.ndarray:
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    return (a * 255).astype(np.uint8)


def main(photos: list[str]) -> None:
    pidinet = make_edge_detector("pidinet", "cpu")
    canny = make_edge_detector("canny", "cpu")
    try:
        depth_model = load_depth_anything("depth_anything_small")
    except MissingWeightsError:
        depth_model = None
    rows: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        make_demo(tmp, DemoConfig(train_per_subspecies=1, test_per_subspecies=1, train_hybrids_per_type=1,
                                  test_hybrids_per_type=1))
        for p in sorted(Path(tmp, "images").glob("*.jpg"))[:3]:
            z = sensor_nearness(Path(tmp, "depth", p.stem + ".tiff"), (SIZE, SIZE))
            rows.append((read_image(p, SIZE), gray(z), f"demo {p.stem}"))
    for p in photos:
        img = read_image(p, SIZE)
        d = None
        if depth_model is not None:
            d = gray(predict_depth(depth_model, torch.from_numpy(img)[None])[0].numpy())
        rows.append((img, d, Path(p).stem))
    images, labels = [], []
    for img, d, name in rows:
        batch = torch.from_numpy(img)[None]
        images += [img, gray(pidinet(batch)[0].numpy()), gray(canny(batch)[0].numpy()),
                   d if d is not None else np.full((SIZE, SIZE), 230, np.uint8)]
        labels += [name, "PiDiNet (fused)", "Canny", "depth" if d is not None else "depth: weights absent"]
    sheet = contact_sheet(images, labels, cols=4, cell=192)
    Image.fromarray(sheet).quantize(256).save(Path(__file__).with_name("edges_depth.png"), optimize=True)


if __name__ == "__main__":
    main(sys.argv[1:])
