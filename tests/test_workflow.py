"""The workflow end to end on a tiny demo (every stage for real), then what reruns after an edit."""

from __future__ import annotations

import re
import subprocess

import h5py
import numpy as np
import pandas as pd
import pytest

from hybrid.data.images import read_image
from tests.workflow_helpers import REPO, SNAKEMAKE, scheduled, snakemake, write_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    write_config(work)
    snakemake(work, "--cores", "2")
    return work


def test_lint_is_clean():
    out = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "good condition" in out.stdout + out.stderr, out.stdout + out.stderr


def test_manifest_and_shards_match_the_source_images(demo_run):
    manifest = pd.read_parquet(demo_run / "results/manifest.parquet")
    index = pd.read_parquet(demo_run / "results/shards/index.parquet")
    assert 20 <= len(manifest) <= 100
    assert set(index["sample_id"]) == set(manifest["sample_id"])
    assert set(manifest["hybrid_type"].dropna()) == {"signal", "non-signal", "mimic"}
    assert (manifest["depth_path"].notna()).all()
    by_id = manifest.set_index("sample_id")
    shards = sorted((demo_run / "results/shards").glob("shard-*.h5"))
    assert len(shards) == -(-len(manifest) // 16)  # shard_size 16
    for shard in shards:
        with h5py.File(shard) as f:
            assert f.attrs["resolution"] == 32 and f.attrs["edge_model"] == "canny"
            assert f.attrs["depth_source"] == "dataset"
            ids = f["sample_id"].asstr()[:]
            for i in (0, len(ids) - 1):
                src = read_image(by_id.loc[ids[i], "image_path"], 32)
                np.testing.assert_array_equal(f["image"][i], src)
                assert f["edge"][i].dtype == np.uint8 and f["edge"][i].max() == 255
                d = f["depth"][i]
                assert d.dtype == np.uint16 and d.min() == 0 and d.max() == 65535
                assert d[8:24, 8:24].mean() > d[:2, :2].mean()  # the butterfly is nearer than the background corner


def test_nothing_reruns_on_an_unchanged_tree(demo_run):
    assert scheduled(demo_run) == {}


AFTER_TRAIN = {"generate", "evaluate", "classify", "report", "all"}


def test_every_stage_wrote_its_outputs(demo_run):
    r = demo_run / "results"
    for path in ("train/checkpoint/config.json", "train/checkpoint/model.safetensors", "train/checkpoint/state.pt",
                 "train/losses.csv", "generated/manifest.parquet", "metrics/evaluate.json",
                 "metrics/classify.json", "report/index.html"):
        assert (r / path).exists(), path
    assert list((r / "train/samples").glob("*.png")) and list((r / "generated/sheets").glob("*.png"))
    generated = pd.read_parquet(r / "generated/manifest.parquet")
    assert set(generated["decoder"]) == {"AHD", "AHE"} and set(generated["kind"]) == {"global", "local", "normal"}
    assert sorted((r / "metrics/predictions").glob("*.txt"))


def test_snakemake_report_holds_the_marked_outputs(demo_run, tmp_path):
    """`snakemake --report` (make report) on the finished run: the outputs marked report() with their captions."""
    import zipfile

    out = tmp_path / "report.zip"
    snakemake(demo_run, "--report", str(out))
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        html = z.read(next(n for n in names if n.endswith("/report.html"))).decode()
    files = {n.rsplit("/", 1)[1] for n in names if "/data/raw/" in n}
    assert {"losses.csv", "evaluate.json", "classify.json", "index.html"} <= files
    assert any(f.startswith("step-") and f.endswith(".png") for f in files)  # the training samples (patterns)
    for text in ("Training", "Evaluation", "Generation quality", "Hybrid detection", "Inception Score"):
        assert text in html, text


def test_preprocess_param_reruns_preprocess_and_descendants_only(demo_run):
    jobs = scheduled(demo_run, "--config", "preprocess={resolution: 24}")
    assert set(jobs) == {"preprocess", "train"} | AFTER_TRAIN


def test_ingest_param_reruns_from_ingest(demo_run):
    jobs = scheduled(demo_run, "--config", "ingest={missing: skip}")
    assert set(jobs) == {"ingest", "preprocess", "train"} | AFTER_TRAIN


def test_train_hyper_parameter_reruns_train_onward_not_ingest_or_preprocess(demo_run):
    assert set(scheduled(demo_run, "--config", "train={lr: 0.001}")) == {"train"} | AFTER_TRAIN


def test_generation_count_reruns_generation_onward_only(demo_run):
    assert set(scheduled(demo_run, "--config", "generate={local: {count: 3}}")) == AFTER_TRAIN


def test_generator_code_change_reruns_train_onward(demo_run, tmp_path):
    """A copy of the workflow whose hybrid/models/generator.py differs: train and what follows."""
    import shutil

    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("Snakefile", "rules", "workflow", "config", "hybrid"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, copy / name)
    with open(copy / "hybrid/models/generator.py", "a") as f:
        f.write("\n# an edit\n")
    out = subprocess.run([*SNAKEMAKE, "-s", str(copy / "Snakefile"), "--directory", str(demo_run), "--configfile",
                          str(demo_run / "config.yaml"), "-n", "--quiet", "rules"], capture_output=True, text=True)
    table = (out.stdout + out.stderr).split("job", 1)[1].split("total", 1)[0]
    assert set(re.findall(r"^(\w+)\s+\d+\s*$", table, re.M)) == {"train"} | AFTER_TRAIN


def test_unknown_key_and_wrong_type_fail_before_any_job(demo_run):
    proc = snakemake(demo_run, "-n", "--config", "preprocess={resolutoin: 24}", check=False)
    assert proc.returncode != 0 and "resolutoin" in proc.stdout + proc.stderr
    proc = snakemake(demo_run, "-n", "--config", "preprocess={batch_size: many}", check=False)
    assert proc.returncode != 0 and "batch_size" in proc.stdout + proc.stderr and "integer" in proc.stdout + proc.stderr


def test_preprocess_rule_with_pidinet_and_depth_anything(tmp_path):
    """The network models through the real loading path: random PiDiNet and a tiny Depth Anything
    V2 given by explicit paths in the config (models.paths)."""
    from tests.tiny_models import save_random_pidinet, save_tiny_depth_anything

    pidinet = tmp_path / "weights" / "table5_pidinet.pth"
    save_random_pidinet(pidinet)
    depth = tmp_path / "weights" / "da"
    save_tiny_depth_anything(depth)
    write_config(tmp_path, {
        "preprocess": {"edge_model": "pidinet", "depth_source": "depth_anything_small"},
        "models": {"paths": {"pidinet": str(pidinet), "depth_anything_small": str(depth)}},
        "demo": {"train_per_subspecies": 1, "test_per_subspecies": 1, "train_hybrids_per_type": 1,
                 "test_hybrids_per_type": 1},
    })
    snakemake(tmp_path, "--cores", "2", "results/shards/index.parquet")
    shard = sorted((tmp_path / "results/shards").glob("shard-*.h5"))[0]
    with h5py.File(shard) as f:
        assert f.attrs["edge_model"] == "pidinet" and f.attrs["edge_weights"] == str(pidinet)
        assert f.attrs["depth_source"] == "depth_anything_small" and f.attrs["depth_weights"] == str(depth)
        edge, d = f["edge"][:], f["depth"][:]
    assert edge.shape[1:] == (32, 32) and edge.std() > 0
    assert d.dtype == np.uint16 and (d.reshape(len(d), -1).max(1) == 65535).all()


def test_depth_level_generator_trains_from_the_rgb_weights_and_generates_aligned_depth(demo_run):
    jobs = scheduled(demo_run, "--config", "train_depth={enabled: true}")
    # AH* is trained, and generation (and what reads it) now also writes depth-level anomalies
    assert {"train_depth", "generate"} <= set(jobs) and not {"preprocess", "train"} & set(jobs)
    snakemake(demo_run, "--cores", "2", "results/generated/manifest.parquet", "--config",
              "train_depth={enabled: true, epochs: 1, epochs_decay: 0}")
    import json

    cfg = json.loads((demo_run / "results/train_depth/checkpoint/config.json").read_text())
    assert cfg["model"]["level"] == "depth"
    assert cfg["model"]["conditions"] == ["target_image", "reference_depth", "reference_edge"]
    assert cfg["data"]["depth_field"] == "depth"  # the demo's shards hold no separate sensor depth
    log = (demo_run / "results/logs/train_depth.log").read_text()
    assert "initialised G from" in log and "initialised D from" in log
    shard = sorted((demo_run / "results/generated").glob("shard-*.h5"))[0]
    with h5py.File(shard) as f:
        assert f["depth_generated"].dtype == np.uint16 and f["edge_generated"].dtype == np.uint8
        assert f["depth_generated"].shape == f["image"].shape[:3] == f["edge_generated"].shape
        assert f.attrs["depth_checkpoint"] == "results/train_depth/checkpoint"


def test_fetch_models_rule_collects_what_the_stages_need(demo_run, tmp_path, monkeypatch):
    import json

    from tests.tiny_models import save_random_pidinet

    ckpt = tmp_path / "pidinet.pth"
    save_random_pidinet(ckpt)
    monkeypatch.setenv("HYBRID_OFFLINE", "1")
    monkeypatch.setenv("HYBRID_MODEL_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path / "cache"))
    edge = "preprocess={edge_model: pidinet}"
    snakemake(demo_run, "--cores", "1", "fetch_models", "--config", edge, f"models={{paths: {{pidinet: {ckpt}}}}}")
    assert json.loads((demo_run / "resources/models.json").read_text()) == {"pidinet": str(ckpt)}
    proc = snakemake(demo_run, "--cores", "1", "--forcerun=fetch_models", "fetch_models", "--config", edge,
                     "train={perceptual: vgg19}", check=False)
    # offline with weights missing: the run stops before any job, naming every missing one and the fix
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "hybrid models fetch pidinet vgg19" in out
