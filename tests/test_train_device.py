"""The train loop's GPU-speed paths, checked on the CPU: augmentation applied to whole batches on
the device, losses synchronised once per log interval, and the torch.compile switch's fallback."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import default_collate

from hybrid.augment import AugmentConfig
from hybrid.models.generator import Generator
from hybrid.train import PairDataset, train
from tests.compile_doubles import Broken, Recorder
from tests.test_train import AUG, MODEL, Blobs, rows, same_checkpoint, train_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
STRONG = AugmentConfig(tps_prob=1.0, rtp_prob=1.0, flip_lr=0.5, flip_tb=0.5)


@pytest.mark.parametrize("model", [MODEL, {**MODEL, "level": "depth"}])
@pytest.mark.parametrize("shared", [False, True])
def test_batched_device_augmentation_equals_the_per_sample_path(model, shared):
    G = Generator(**model)
    data = Blobs(6)
    plain = PairDataset(data, G, STRONG, seed=7, shared_geometry=shared)
    deferred = PairDataset(data, G, STRONG, seed=7, shared_geometry=shared, defer=True)
    keys = [(3, i) for i in (4, 0, 5, 2)]
    batch = deferred.apply(default_collate([deferred[k] for k in keys]), torch.device("cpu"))
    want = default_collate([plain[k] for k in keys])
    assert batch.keys() == want.keys()
    for k in want:
        assert batch[k].shape == want[k].shape
        torch.testing.assert_close(batch[k], want[k], atol=1e-6, rtol=0, msg=k)
        assert not torch.equal(want[k][0], want[k][1])  # real, different augmentations


def test_training_with_device_augmentation_on_the_cpu_matches_the_dataset_path(tmp_path):
    data = Blobs(4)
    a = train(data, tmp_path / "a", tmp_path / "wa", MODEL, train_cfg(epochs_decay=1), AUG)
    b = train(data, tmp_path / "b", tmp_path / "wb", MODEL, train_cfg(epochs_decay=1, augment_on="device"), AUG)
    la, lb = rows(tmp_path / "wa" / "losses.csv"), rows(tmp_path / "wb" / "losses.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == ["1", "2"]
    for ra, rb in zip(la, lb):
        for k in ra:
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-4, abs=1e-6), k
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


def test_losses_synchronised_per_log_interval_give_the_same_csv_and_weights(tmp_path):
    data = Blobs(6)  # 3 steps per epoch: blocks of 2 cross the epoch end and the checkpoints
    every = train(data, tmp_path / "a", tmp_path / "wa", MODEL, train_cfg(log_every=1), AUG)
    blocks = train(data, tmp_path / "b", tmp_path / "wb", MODEL, train_cfg(log_every=4), AUG)
    assert rows(tmp_path / "wa" / "losses.csv") == rows(tmp_path / "wb" / "losses.csv")
    assert len(rows(tmp_path / "wb" / "losses.csv")) == 6
    same_checkpoint(every, blocks)


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", Broken)
    data = Blobs(4)
    eager = train(data, tmp_path / "a", tmp_path / "wa", MODEL, train_cfg(epochs_decay=1), AUG)
    with caplog.at_level(logging.WARNING, logger="hybrid.train"):
        compiled = train(data, tmp_path / "b", tmp_path / "wb", MODEL, train_cfg(epochs_decay=1, compile=True), AUG)
    assert "torch.compile failed (RuntimeError: no C++ compiler here)" in caplog.text
    same_checkpoint(eager, compiled)
    assert rows(tmp_path / "wa" / "losses.csv") == rows(tmp_path / "wb" / "losses.csv")


def test_compile_covers_the_generator_the_discriminator_and_vgg19(tmp_path, model_dir, monkeypatch):
    """train.compile compiles every network of the step, not only the generator; the step is the
    same step (the stand-in runs the modules eagerly: the very losses)."""
    from hybrid.models.vgg import VGGFeatures

    (model_dir / "torchvision").mkdir()
    sd = {f"features.{k}": v for k, v in VGGFeatures("vgg19").features.state_dict().items()}
    torch.save(sd, model_dir / "torchvision" / "vgg19-dcbb9e9d.pth")  # random stand-in, found by the store
    data = Blobs(4)
    cfg = train_cfg(perceptual="vgg19", epochs_decay=1)
    train(data, tmp_path / "a", tmp_path / "wa", MODEL, cfg, AUG)
    recorder = Recorder()
    monkeypatch.setattr(torch, "compile", recorder)
    train(data, tmp_path / "b", tmp_path / "wb", MODEL, {**cfg, "compile": True}, AUG)
    assert {name for name, _ in recorder.calls} == {"Generator", "MultiscaleDiscriminator", "VGGLoss"}
    assert rows(tmp_path / "wa" / "losses.csv") == rows(tmp_path / "wb" / "losses.csv")
