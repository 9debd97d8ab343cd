import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Dataset

from hybrid.checkpoint import load_checkpoint, load_state
from hybrid.models.vgg import VGGFeatures
from hybrid.train import TrainConfig, lr_at, train

MODEL = {"ngf": 4, "n_downsample": 2, "n_blocks": 1}
AUG = {"tps_prob": 0.5, "rtp_prob": 0.5}  # real augmentations, so resume must replay their draws


pytestmark = pytest.mark.usefixtures("one_thread")


def train_cfg(**kw) -> dict:
    return {"epochs": 0, "epochs_decay": 2, "batch_size": 2, "perceptual": "none", "ndf": 8,
            "checkpoint_every": 2, "sample_every": 3, "log_every": 1, "seed": 3, **kw}


class Blobs(Dataset):
    """Tiny in-memory samples shaped like ShardDataset items."""

    def __init__(self, n: int, size: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        self.items = []
        for i in range(n):
            cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
            blob = (-((xx - cx) ** 2 + (yy - cy) ** 2) * 8).exp()
            image = torch.stack([blob * 2 - 1, xx * blob, yy]).clamp(-1, 1)
            edge = ((blob - 0.5).abs() < 0.1).float()[None] * 2 - 1
            self.items.append({"sample_id": f"s{i}", "image": image, "edge": edge, "depth": blob[None] * 2 - 1})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same_checkpoint(a, b) -> None:
    for name in ("model.safetensors", "discriminator.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = load_state(a), load_state(b)
    assert sa["step"] == sb["step"] and sa["lr"] == sb["lr"]
    for opt in ("optimizer_G", "optimizer_D"):
        for k, st in sa[opt]["state"].items():
            assert all(torch.equal(st[n], sb[opt]["state"][k][n]) for n in st), opt


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    data = Blobs(6)  # 3 steps per epoch, 2 epochs (lr, then lr/2)
    straight = train(data, tmp_path / "a" / "ckpt", tmp_path / "a" / "work", MODEL, train_cfg(), AUG,
                     losses_csv=tmp_path / "a" / "losses.csv", samples_dir=tmp_path / "a" / "samples")
    work = tmp_path / "b" / "work"
    last = train(data, tmp_path / "b" / "ckpt", work, MODEL, train_cfg(), AUG, max_steps=5)
    assert last == work / "ckpt-00000004"  # killed after step 5: the step-4 checkpoint is what remains
    assert not (tmp_path / "b" / "ckpt").exists()
    assert [r["step"] for r in rows(work / "losses.csv")] == ["1", "2", "3", "4", "5"]
    resumed = train(data, tmp_path / "b" / "ckpt", work, MODEL, train_cfg(), AUG,
                    losses_csv=tmp_path / "b" / "losses.csv")
    same_checkpoint(straight, resumed)
    # a grid every sample_every steps and one at the end, published with the checkpoint
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    assert load_state(resumed)["step"] == 6
    # the log continues without the rows of the lost step 5, and matches the straight run exactly
    assert rows(tmp_path / "b" / "losses.csv") == rows(tmp_path / "a" / "losses.csv")
    assert [float(r["lr"]) for r in rows(tmp_path / "a" / "losses.csv")] == [2e-4] * 3 + [1e-4] * 3
    # a call after the end only republishes
    again = train(data, tmp_path / "b" / "ckpt", work, MODEL, train_cfg(), AUG)
    same_checkpoint(straight, again)


def test_published_checkpoint_loads_and_samples_are_written(tmp_path):
    cfg = train_cfg(epochs_decay=1, sample_every=5, lambda_l1=1.0, lambda_mask=0.1)
    out = train(Blobs(2), tmp_path / "ckpt", tmp_path / "work", MODEL, cfg, AUG, samples_dir=tmp_path / "samples")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "discriminator.safetensors",
                                                    "model.safetensors", "state.pt"]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["ngf"] == 4 and config["train"]["batch_size"] == 2 and config["step"] == 1
    g = load_checkpoint(out)
    assert not g.training
    w = load_file(out / "model.safetensors")
    assert all(torch.equal(v, w[k]) for k, v in g.state_dict().items())
    state = load_state(out)
    assert {"optimizer_G", "optimizer_D", "rng", "step", "epoch", "lr"} <= set(state)
    (row,) = rows(tmp_path / "work" / "losses.csv")
    assert float(row["G_l1"]) > 0 and float(row["G_mask"]) > 0 and float(row["G_vgg"]) == 0
    grid = Image.open(tmp_path / "samples" / "step-00000001.png")
    # reference | depth | edge | per decoder: its target (A_d, A_e), output, mask; a row per sample
    assert grid.size == (9 * 32, 2 * 32)
    assert not list(tmp_path.glob(".*"))  # no temporary directories left behind


def test_resume_with_another_model_config_names_the_keys(tmp_path):
    train(Blobs(2), tmp_path / "ckpt", tmp_path / "work", MODEL, train_cfg(checkpoint_every=1), AUG, max_steps=1)
    with pytest.raises(ValueError, match=r"ngf: checkpoint 4 vs config 8") as e:
        train(Blobs(2), tmp_path / "ckpt", tmp_path / "work", {**MODEL, "ngf": 8}, train_cfg(), AUG)
    assert "n_blocks" not in str(e.value) and "work_dir" in str(e.value)


def test_perceptual_vgg19_from_the_model_store_resumes_exactly(tmp_path, model_dir):
    torch.manual_seed(0)
    sd = {f"features.{k}": v for k, v in VGGFeatures("vgg19").features.state_dict().items()}
    (model_dir / "torchvision").mkdir()
    torch.save(sd, model_dir / "torchvision" / "vgg19-dcbb9e9d.pth")  # random stand-in, found by the store
    cfg = train_cfg(perceptual="vgg19", checkpoint_every=1, epochs_decay=1)
    data = Blobs(4)
    a = train(data, tmp_path / "a", tmp_path / "wa", MODEL, cfg, AUG)
    train(data, tmp_path / "b", tmp_path / "wb", MODEL, cfg, AUG, max_steps=1)
    b = train(data, tmp_path / "b", tmp_path / "wb", MODEL, cfg, AUG)
    same_checkpoint(a, b)
    vgg = [float(r["G_vgg"]) for r in rows(tmp_path / "wa" / "losses.csv")]
    assert len(vgg) == 2 and all(v > 0 for v in vgg)


@pytest.mark.parametrize("model", [
    {"level": "depth"},  # AnomalyHybrid*: learns depth and edges of the target image
    {"decoders": ["AHE"], "conditions": ["reference_image", "target_edge"]},  # AnomalyFactory-style
])
def test_other_configs_train(tmp_path, model):
    first = train(Blobs(2), tmp_path / "rgb", tmp_path / "w0", MODEL, train_cfg(epochs_decay=1), AUG)
    out = train(Blobs(2), tmp_path / "ckpt", tmp_path / "work", {**MODEL, **model}, train_cfg(epochs_decay=1),
                AUG, init_from=first if model.get("level") == "depth" else None)
    g = load_checkpoint(out)
    assert list(g(torch.zeros(1, g.in_channels, 32, 32))) == g.decoder_names
    if model.get("level") == "depth":  # the encoder started from the RGB-level weights
        start = load_file(first / "model.safetensors")["encoder.1.weight"]
        assert not torch.equal(g.state_dict()["encoder.1.weight"], start)  # and then trained on
        assert g.out_channels == 1


def test_lr_schedule_constant_then_linear_to_zero():
    cfg = TrainConfig(epochs=2, epochs_decay=4, lr=1.0)
    assert [lr_at(cfg, e) for e in range(6)] == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_at(TrainConfig(epochs=3, epochs_decay=0, lr=1.0), 2) == 1.0


def test_train_config_errors_name_the_key():
    with pytest.raises(ValueError, match="lamda_vgg"):
        TrainConfig.from_dict({"lamda_vgg": 10})
    with pytest.raises(ValueError, match="perceptual"):
        TrainConfig.from_dict({"perceptual": "lpips"})
    assert TrainConfig.from_dict({"betas": [0.5, 0.9]}).betas == (0.5, 0.9)
    assert np.isclose(TrainConfig().lr, 2e-4)


def test_resuming_a_shared_geometry_run_under_the_new_pairing_names_the_setting(tmp_path):
    work = tmp_path / "work"
    train(Blobs(2), tmp_path / "ckpt", work, MODEL, train_cfg(checkpoint_every=1), AUG, max_steps=1)
    ckpt = work / "ckpt-00000001"
    config = json.loads((ckpt / "config.json").read_text())
    del config["train"]["shared_geometry"]  # a checkpoint from before the per-condition pairing
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"train.shared_geometry=true .*train.shared_geometry=false"):
        train(Blobs(2), tmp_path / "ckpt", work, MODEL, train_cfg(), AUG)
    assert load_checkpoint(ckpt).level == "rgb"  # it still loads for generation
    out = train(Blobs(2), tmp_path / "ckpt", work, MODEL, train_cfg(shared_geometry=True), AUG)  # the ablation
    assert load_state(out)["step"] == 2


def test_depth_level_starts_g_and_d_from_the_rgb_run_and_refuses_the_wrong_level(tmp_path):
    rgb = train(Blobs(2), tmp_path / "rgb", tmp_path / "w0", MODEL, train_cfg(epochs_decay=1), AUG)
    star_cfg = {**MODEL, "level": "depth"}
    star = train(Blobs(2), tmp_path / "star", tmp_path / "w1", star_cfg, train_cfg(epochs_decay=1, lr=1e-12), AUG,
                 init_from=rgb)
    d_rgb, d_star = (load_file(p / "discriminator.safetensors") for p in (rgb, star))
    deep = [k for k in d_star if d_star[k].shape == d_rgb[k].shape]
    # all but the first conv of each scale (8 -> 6 input channels) match
    assert set(d_star) - set(deep) == {"scales.0.blocks.0.0.weight", "scales.1.blocks.0.0.weight"}
    assert all(torch.allclose(d_star[k], d_rgb[k], atol=1e-6) for k in deep)  # copied, then a lr-0 step
    with pytest.raises(ValueError, match=r"depth-level \(AnomalyHybrid\*\).*rgb-level \(AnomalyHybrid\)"):
        train(Blobs(2), tmp_path / "again", tmp_path / "w2", star_cfg, train_cfg(epochs_decay=1), AUG, init_from=star)
    with pytest.raises(ValueError, match=r"depth-level \(AnomalyHybrid\*\) generator, but .* rgb-level"):
        load_checkpoint(star, level="rgb")
