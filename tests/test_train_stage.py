"""The train stage's promises: a failed rerun never loses the published checkpoint, superseded work
folders go only once a new checkpoint is published (and the log says so), outputs follow the umask."""

import logging
import os
import stat

import pytest

from hybrid.checkpoint import PUBLISHED
from hybrid.io import write_parquet_atomic
from hybrid.stages.train import run as run_train_stage
from tests.test_generate import make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = {"ngf": 4, "n_downsample": 2, "n_blocks": 1, "conditions": ["reference_image", "target_depth", "target_edge"]}


def train_cfg(**kw) -> dict:
    return {"epochs": 1, "epochs_decay": 0, "batch_size": 4, "perceptual": "none", "ndf": 4, "n_layers_D": 2,
            "num_D": 1, "checkpoint_every": 1, "sample_every": 100, "log_every": 1, "device": "cpu", **kw}


def run(tmp_path, **kw):
    return run_train_stage(tmp_path / "shards" / "index.parquet", tmp_path / "manifest.parquet",
                           tmp_path / "results" / "checkpoint", tmp_path / "results" / "losses.csv",
                           tmp_path / "results" / "samples", tmp_path / "work", MODEL, train_cfg(**kw), {})


def test_a_failed_rerun_keeps_the_last_published_checkpoint_and_says_where(tmp_path, model_dir, caplog):
    _, manifest = make_dataset(tmp_path)
    write_parquet_atomic(manifest, tmp_path / "manifest.parquet")
    old_umask = os.umask(0o027)
    try:
        first = run(tmp_path)
    finally:
        os.umask(old_umask)
    kept = tmp_path / "work" / PUBLISHED
    assert (kept / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    # a settings change that fails inside the job (VGG19 weights absent offline), after Snakemake
    # has removed the old output as it does at a job's start
    import shutil

    shutil.rmtree(first)
    with caplog.at_level(logging.INFO), pytest.raises(FileNotFoundError):
        run(tmp_path, perceptual="vgg19", lr=1e-3)
    assert f"the last published checkpoint is kept in {kept}" in caplog.text
    assert (kept / "model.safetensors").exists() and len([p for p in (tmp_path / "work").iterdir()]) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(tmp_path, lr=1e-3)  # fixed: published, and only now are the superseded folders removed
    assert sorted(p.name for p in (tmp_path / "work").iterdir() if p.name != PUBLISHED).__len__() == 1
    assert caplog.text.count("removed the superseded work folder") == 2


def test_checkpoints_follow_the_umask(tmp_path):
    _, manifest = make_dataset(tmp_path)
    write_parquet_atomic(manifest, tmp_path / "manifest.parquet")
    old_umask = os.umask(0o022)
    try:
        out = run(tmp_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
