"""preprocess.chunks / generate.chunks: K scatter jobs plus a gather give what one job gives."""

from __future__ import annotations

import hashlib
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from tests.workflow_helpers import snakemake, write_config

TARGET = "results/generated/manifest.parquet"
# Enough images for several preprocess shards (8 per shard) and generated shards (4 per shard).
SMALL = {"preprocess": {"shard_size": 8}, "generate": {"shard_size": 4, "batch_size": 3},
         "train": {"epochs": 0, "epochs_decay": 1}}
STAGES = ["preprocess_chunk", "preprocess", "generate_chunk", "generate"]


def scattered(k: int) -> dict:
    return {**SMALL, "preprocess": {**SMALL["preprocess"], "chunks": k},
            "generate": {**SMALL["generate"], "chunks": k}}


def shard_content(path) -> dict:
    with h5py.File(path, "r") as f:
        return {"arrays": {k: f[k][:] for k in f}, "attrs": dict(f.attrs)}


def same_shard(a: dict, b: dict, name: str, ignore=()) -> None:
    assert a["arrays"].keys() == b["arrays"].keys(), name
    for k in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][k], b["arrays"][k], err_msg=f"{name} {k}")
    strip = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
    assert strip(a["attrs"]) == strip(b["attrs"]), name


def snapshot(work) -> dict:
    res = work / "results"
    return {
        "shards": {p.name: p.read_bytes() for p in sorted((res / "shards").glob("shard-*.h5"))},
        "index": pd.read_parquet(res / "shards/index.parquet"),
        "skipped": pd.read_parquet(res / "shards/skipped.parquet"),
        "generated": {p.name: shard_content(p) for p in sorted((res / "generated").glob("shard-*.h5"))},
        "manifest": pd.read_parquet(res / "generated/manifest.parquet"),
        "sheets": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in sorted((res / "generated/sheets").glob("*.png"))},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One workflow run with K = 1, then preprocess and generate again (shards deleted) with K = 2,
    from the same manifest and checkpoint (train is not rerun: its output stays as it is)."""
    work = tmp_path_factory.mktemp("scatter")
    write_config(work, scattered(1))
    snakemake(work, "--cores", "2", TARGET)
    one = snapshot(work)
    for folder in ("shards", "generated"):
        for p in (work / "results" / folder).glob("shard-*.h5"):
            p.unlink()
    shutil.rmtree(work / "results/generated/sheets")
    write_config(work, scattered(2))
    snakemake(work, "--cores", "2", TARGET, "--allowed-rules", *STAGES)
    return work, one, snapshot(work)


def test_scatter_two_chunks_give_the_single_job_shards_index_and_manifest(runs):
    work, one, two = runs
    assert len(one["shards"]) >= 3 and len(one["generated"]) >= 3
    assert one["shards"].keys() == two["shards"].keys()
    for name in one["shards"]:  # preprocess shards: byte for byte (same inputs, same fingerprint)
        assert one["shards"][name] == two["shards"][name], name
    pd.testing.assert_frame_equal(one["index"], two["index"])
    pd.testing.assert_frame_equal(one["skipped"], two["skipped"])
    assert one["generated"].keys() == two["generated"].keys()
    for name in one["generated"]:  # the fingerprint names the input shards' new file times
        same_shard(one["generated"][name], two["generated"][name], name, ignore=("fingerprint",))
    pd.testing.assert_frame_equal(one["manifest"], two["manifest"])
    assert one["sheets"] == two["sheets"] and one["sheets"]
    parts = sorted(p.name for p in (work / "results/generated/chunks").glob("*.parquet"))
    assert parts == ["0-of-2.parquet", "1-of-2.parquet"]
    rows = pd.concat([pd.read_parquet(work / "results/generated/chunks" / p) for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(rows, two["manifest"])  # each part's rows: its range of the manifest
    logs = sorted(p.name for p in (work / "results/logs").glob("*-[0-9].log"))
    assert logs == ["generate-0.log", "generate-1.log", "preprocess-0.log", "preprocess-1.log"]


def test_scatter_rerun_after_a_failed_chunk_redoes_only_that_chunk(runs):
    work, one, _ = runs
    run = ("--cores", "2", TARGET, "--allowed-rules", *STAGES)
    gen = work / "results/generated"
    last = sorted(gen.glob("shard-*.h5"))[-1]  # in the second part's range
    last.unlink()
    last.mkdir()  # the part cannot rename its finished shard onto a folder: that job fails
    for p in [gen / "manifest.parquet", *(gen / "chunks").glob("*.parquet")]:
        p.unlink()
    failed = snakemake(work, *run, "--keep-going", check=False)
    assert failed.returncode != 0
    assert (gen / "chunks/0-of-2.parquet").exists() and not (gen / "chunks/1-of-2.parquet").exists()
    assert not (gen / "manifest.parquet").exists()
    last.rmdir()
    logs = {p.name: p.stat().st_mtime_ns for p in (work / "results/logs").glob("*.log")}
    snakemake(work, *run)
    again = {p.name: p.stat().st_mtime_ns for p in (work / "results/logs").glob("*.log")}
    assert {n for n in again if again[n] != logs.get(n)} == {"generate-1.log", "generate.log"}
    pd.testing.assert_frame_equal(pd.read_parquet(gen / "manifest.parquet"), one["manifest"])
    same_shard(shard_content(last), one["generated"][last.name], last.name, ignore=("fingerprint",))
