"""docs/decoders_sheet.png: one reference, the depth of one butterfly and the edges of another.

    python docs/make_decoder_sheet.py results/train/checkpoint results/shards/index.parquet \
        results/manifest.parquet docs/decoders_sheet.png

Each row feeds the generator the same reference with a target depth map from one demo butterfly
and a target edge map from another (moved sideways, so the two disagree the way training pairs
do). AHD learned the image under the depth's geometry and AHE under the edges', so AHD's output
should follow the depth's butterfly and AHE's the edge map's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from hybrid.pipeline import load_generator, run_generator, to_uint8
from hybrid.stages.generate import Samples
from hybrid.viz import contact_sheet

SHIFTS = (0.0, 0.12, -0.12)  # the edge map moves by this fraction of the width


def pick(manifest: pd.DataFrame, subspecies: str, k: int = 0) -> str:
    rows = manifest[(manifest["split"] == "train") & (manifest["label"] == 0)
                    & (manifest["subspecies"].astype(str) == subspecies)]
    return str(rows["sample_id"].iloc[k])


def shift(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Move a (1, H, W) map sideways, filling with the border value."""
    px = int(round(frac * x.shape[-1]))
    if px == 0:
        return x
    out = torch.roll(x, px, dims=-1)
    fill = x[..., :1] if px > 0 else x[..., -1:]
    if px > 0:
        out[..., :px] = fill
    else:
        out[..., px:] = fill
    return out


def main(checkpoint: str, index: str, manifest: str, out: str) -> None:
    torch.manual_seed(0)
    G = load_generator(checkpoint, torch.device("cpu"))
    samples = Samples(pd.read_parquet(index), Path(index).parent)
    man = pd.read_parquet(manifest)
    reference, depth_from, edge_from = pick(man, "8"), pick(man, "9"), pick(man, "1")
    ref, dsrc, esrc = samples[reference], samples[depth_from], samples[edge_from]
    images, labels = [], []
    for frac in SHIFTS:
        maps = {"reference_image": ref["image"][None], "target_depth": dsrc["depth"][None],
                "target_edge": shift(esrc["edge"], frac)[None]}
        res = run_generator(G, maps)
        row = [to_uint8(maps["reference_image"])[0], to_uint8(maps["target_depth"])[0],
               to_uint8(maps["target_edge"])[0]]
        names = ["reference", f"depth of {depth_from.rsplit('/', 1)[-1]}",
                 f"edges of {edge_from.rsplit('/', 1)[-1]}" + (f" moved {frac:+.0%}" if frac else "")]
        for d in G.decoder_names:
            row += [to_uint8(res[d]["image"])[0], to_uint8(res[d]["mask"] * 2 - 1)[0]]
            names += [f"{d} (follows {'depth' if d == 'AHD' else 'edges'})", f"{d} mask M"]
        images += [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in row]
        labels += names
    sheet = contact_sheet(images, labels, cols=len(images) // len(SHIFTS), cell=160)
    Image.fromarray(sheet).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
