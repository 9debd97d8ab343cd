"""Semantic regions: SAM preprocessing in torch, the paper's refinement, the sam_regions stage, no weights."""

import h5py
import numpy as np
import pytest
import torch

from hybrid.regions import (
    RegionConfig,
    RegionStore,
    load_sam,
    preprocess,
    refine,
    sam_masks,
    semantic_region,
)
from hybrid.stages.sam_regions import run as run_sam_regions
from tests.af_data import make_results

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tiny_sam(path, seed: int = 0):
    """A 36k-parameter random SamModel (64 px input, 8 px patches) written with save_pretrained."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(seed)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    model.save_pretrained(path)
    return model


OPEN = {"pred_iou_thresh": -1e9, "stability_thresh": -1.0, "points_per_side": 4, "points_per_batch": 8,
        "device": "cpu", "min_area": 0.01}  # a random SAM's masks pass every filter


def test_preprocess_matches_the_transformers_pil_processor_within_one_grey_level():
    pil = pytest.importorskip("transformers.models.sam.image_processing_pil_sam")
    img = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    ref = pil.SamImageProcessorPil()(images=img, return_tensors="pt")
    ours, size = preprocess(torch.from_numpy(img)[None], 1024)
    assert size == tuple(ref["reshaped_input_sizes"][0].tolist()) == (683, 1024)
    assert ours.shape == ref["pixel_values"].shape
    assert (ours - ref["pixel_values"]).abs().max() < 1 / 255 / 0.224 + 1e-4  # one level after ImageNet std
    assert (ours[..., 683:, :] == 0).all()  # padded bottom


def test_refine_drops_background_merges_overlaps_and_groups_small_regions():
    h = w = 64
    blank = np.zeros((h, w), bool)

    def box(y0, y1, x0, x1):
        m = blank.copy()
        m[y0:y1, x0:x1] = True
        return m

    object_ = box(10, 30, 10, 30)
    background = ~object_  # touches the whole border
    part_a, part_b = box(40, 56, 36, 50), box(42, 58, 38, 52)  # overlap 84% of the smaller: one region
    dots = [box(5, 7, 50, 52), box(5, 7, 54, 56), box(8, 10, 52, 54)]  # 4 px each, <= 3 px apart: one group
    lone = box(58, 59, 2, 3)  # 1 px, alone: dropped
    cfg = RegionConfig(min_area=0.002, group_radius=0.05)  # 8.2 px; radius 3 px
    labels = refine(np.stack([background, object_, part_a, part_b, *dots, lone]), cfg)
    assert labels.dtype == np.uint8 and labels.shape == (h, w)
    regions = [labels == k for k in range(1, labels.max() + 1)]
    assert len(regions) == 3  # object, merged parts, grouped dots
    assert not labels[background & ~object_ & ~(part_a | part_b) & ~np.any(dots, axis=0)].any()
    assert (labels[object_] == labels[15, 15]).all()
    assert labels[45, 40] == labels[57, 50] != 0  # part_a and part_b: one candidate
    assert labels[6, 51] == labels[6, 55] == labels[9, 53] != 0 and labels[58, 2] == 0
    rng = np.random.default_rng(0)
    picks = [semantic_region(labels, rng, max_regions=2) for _ in range(20)]
    assert all(p.any() and set(np.unique(labels[p])) <= {1, 2, 3} for p in picks)
    assert any(len(np.unique(labels[p])) == 2 for p in picks)  # unions of up to two candidates
    assert semantic_region(np.zeros((4, 4), np.uint8), rng, 3) is None


def test_sam_regions_stage_with_a_tiny_random_sam(tmp_path, model_dir):
    data = make_results(tmp_path)
    save_tiny_sam(model_dir / "sam" / "sam-vit-base")
    model = load_sam("sam_vit_base")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)
    masks = sam_masks(model, images, RegionConfig(**OPEN))
    assert len(masks) == 2 and all(m.dtype == torch.bool and m.shape[1:] == (32, 40) for m in masks)
    assert all(0 < len(m) <= 48 for m in masks)  # 16 points x 3 masks, after NMS
    out = tmp_path / "regions.h5"
    info = run_sam_regions(data["index"], out, OPEN)
    assert info["status"] == "sam" and info["n"] == 24
    with h5py.File(out, "r") as f:
        assert f["labels"].shape == (24, 32, 32) and f.attrs["status"] == "sam"
    store = RegionStore(out)
    assert store.available and store.get("toy_a/disc/train/0/00").shape == (32, 32)
    assert store.get("not/a/sample") is None


def test_missing_sam_weights_name_the_store_entry_or_fall_back(tmp_path, model_dir):
    data = make_results(tmp_path)
    with pytest.raises(ValueError) as e:
        run_sam_regions(data["index"], tmp_path / "r.h5", {"device": "cpu"})
    msg = str(e.value)
    assert "'sam_vit_base'" in msg and "hybrid models fetch sam_vit_base" in msg and "semantic_fallback" in msg
    info = run_sam_regions(data["index"], tmp_path / "r.h5", {"device": "cpu"}, fallback=True)
    assert info["status"] == "fallback"
    store = RegionStore(tmp_path / "r.h5")
    assert not store.available and "hybrid models fetch sam_vit_base" in store.note
    assert store.get("toy_a/disc/train/0/00") is None
