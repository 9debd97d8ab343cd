"""Tiny random-weight stand-ins for the pretrained networks, saved in their upstream layouts."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_depth_anything(path: Path, seed: int = 0):
    """A 137k-parameter random Depth Anything V2 written with save_pretrained to ``path``."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8,
    )
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    model.save_pretrained(path)
    return model


def save_random_pidinet(path: Path, variant: str = "pidinet", seed: int = 0):
    """A random PiDiNet checkpoint in the upstream layout: {'epoch', 'state_dict'} with module. keys."""
    from hybrid.models.pidinet import build_pidinet

    torch.manual_seed(seed)
    model = build_pidinet(variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model
