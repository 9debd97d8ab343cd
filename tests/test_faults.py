"""A training job killed mid-run (SIGTERM, as a scheduler's time limit sends, and SIGKILL) resumes
from its last checkpoint when the workflow is run again, instead of starting from zero."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.workflow_helpers import REPO, SNAKEMAKE, snakemake, write_config

LONG_TRAIN = {"train": {"epochs": 20, "epochs_decay": 0, "checkpoint_every": 10, "sample_every": 1000,
                        "log_every": 10}}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    write_config(work, LONG_TRAIN)
    snakemake(work, "--cores", "2", "results/shards/index.parquet")
    return work


def _start_train(work):
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile",
           str(work / "config.yaml"), "--cores", "2", "results/train/checkpoint"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_checkpoint(work, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ckpts = list((work / "results/train/work").glob("*/ckpt-*"))
        if ckpts:
            return ckpts
        assert proc.poll() is None, "training ended before writing its first checkpoint"
        time.sleep(0.1)
    raise AssertionError("no training checkpoint appeared within the time limit")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_training_resumes_from_its_checkpoint(preprocessed, sig):
    work = preprocessed
    subprocess.run(["rm", "-rf", str(work / "results/train")], check=True)
    proc = _start_train(work)
    _wait_for_checkpoint(work, proc)
    os.killpg(proc.pid, sig)  # the whole job: snakemake and the training script
    proc.wait(timeout=60)
    assert not (work / "results/train/checkpoint/model.safetensors").exists()
    kept = sorted((work / "results/train/work").glob("*/ckpt-*"))
    assert kept, "the periodic checkpoint must survive the kill"
    killed_at = int(kept[-1].name.split("-")[1])

    if sig == signal.SIGKILL:  # a hard kill leaves Snakemake's lock behind
        snakemake(work, "--unlock")
    snakemake(work, "--cores", "2", "--rerun-incomplete", "results/train/checkpoint")
    log = (work / "results/logs/train.log").read_text()
    resumed = re.search(r"resumed from .*ckpt-\d+ at step (\d+)", log)
    assert resumed and int(resumed.group(1)) == killed_at >= 10, log[-2000:]
    assert (work / "results/train/checkpoint/model.safetensors").exists()
    steps = [int(line.split(",")[0]) for line in (work / "results/train/losses.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, steps[-1] + 1))  # one row per step, none lost or repeated
