"""The export stage: generated anomalies as an MVTec AD tree, read back with the project's reader."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from hybrid.data.mvtec import read_mvtec_ad
from hybrid.io import write_parquet_atomic
from hybrid.stages.export import ExportConfig, Inputs, run
from tests.test_segment import make_setup


def stored(shard_dir, rows: pd.DataFrame, field: str) -> dict[str, np.ndarray]:
    out = {}
    for r in rows.itertuples():
        with h5py.File(shard_dir / r.shard, "r") as f:
            out[r.sample_id] = f[field][int(r.index)]
    return out


def test_tree_reads_back_with_images_and_masks_paired(tmp_path):
    inputs = make_setup(tmp_path, depth=False)
    out = tmp_path / "results" / "export"
    listing = run(inputs, out, {})
    tree = read_mvtec_ad(out)  # fails on an anomaly without its mask
    assert set(tree["category"]) == {"widget"}  # gizmo: generate made nothing for it
    counts = tree.groupby(["split", "defect"]).size().to_dict()
    assert counts == {("train", "good"): 8, ("test", "good"): 4, ("test", "generated_AHD_merge"): 5,
                      ("test", "generated_AHE_merge"): 5}
    anomalies = tree[tree["label"] == 1]
    assert anomalies["mask_path"].notna().all() and tree.loc[tree["label"] == 0, "mask_path"].isna().all()

    # every exported image and mask is the stored one, paired by the listing
    gen = pd.read_parquet(inputs.generated).set_index("sample_id")
    images = stored(inputs.generated.parent, gen.reset_index(), "image")
    regions = stored(inputs.generated.parent, gen.reset_index(), "region")
    real = pd.read_parquet(inputs.index)
    real_images = stored(inputs.index.parent, real, "image")
    by_file = listing.set_index("file")
    assert (out / "export.csv").exists() and len(listing) == len(tree)
    for r in tree.itertuples():
        rel = str(Path(r.image_path).relative_to(out.resolve()))
        entry = by_file.loc[rel]
        img = cv2.cvtColor(cv2.imread(r.image_path), cv2.COLOR_BGR2RGB)
        src = images if entry["source"] == "generated" else real_images
        np.testing.assert_array_equal(img, src[entry["sample_id"]])
        if r.label:
            assert r.mask_path.endswith(f"ground_truth/{r.defect}/{Path(r.image_path).stem}_mask.png")
            mask = cv2.imread(r.mask_path, cv2.IMREAD_GRAYSCALE)
            np.testing.assert_array_equal(mask > 127, regions[entry["sample_id"]] > 127)
            assert set(np.unique(mask)) <= {0, 255}
            assert gen.loc[entry["sample_id"], "kind"] == "local"


def test_defect_column_names_folders_and_generated_normals(tmp_path):
    inputs = make_setup(tmp_path, depth=False)
    gen = pd.read_parquet(inputs.generated)
    gen.loc[gen["sample_id"].str.endswith("AHD") & (gen["kind"] == "local"), "defect"] = "crack"
    write_parquet_atomic(gen, inputs.generated)
    out = tmp_path / "export"
    run(Inputs(*inputs.__dict__.values()), out, ExportConfig(decoders=("AHD", "AHE"), train_good="both",
                                                              test_good=False))
    tree = read_mvtec_ad(out)
    counts = tree.groupby(["split", "defect"]).size().to_dict()
    assert counts == {("train", "good"): 8 + 4, ("test", "crack"): 5, ("test", "generated_AHE_merge"): 5}
    assert len(list((out / "widget/ground_truth/crack").glob("*_mask.png"))) == 5

    with pytest.raises(ValueError, match=r"export\.decoders \['AHX'\]: \['AHX'\] unknown; choose from AHD, AHE"):
        run(inputs, tmp_path / "none", {"decoders": ["AHX"]})
    write_parquet_atomic(gen[(gen["kind"] != "local") | (gen["decoder"] != "AHE")], inputs.generated)
    with pytest.raises(ValueError, match=r"no local anomalies from decoders \['AHE'\]"):
        run(inputs, tmp_path / "none", {"decoders": ["AHE"]})
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="train_good"):
        ExportConfig(train_good="fake")
