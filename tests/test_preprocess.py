"""The preprocess stage as a function: bad files, skipping, resuming, and unwritable outputs."""

from __future__ import annotations

import contextlib
import subprocess

import cv2
import numpy as np
import pandas as pd
import pytest

import hybrid.stages.preprocess as pp
from hybrid.data.images import ImageError
from hybrid.data.manifest import make_manifest
from hybrid.data.shards import ShardDataset
from hybrid.io import OutputError
from hybrid.stages.preprocess import PreprocessConfig
from hybrid.stages.preprocess import run as preprocess


def _manifest(tmp_path, n=7, bad=()):
    rows = []
    for i in range(n):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        if i in bad:
            p.write_text("not an image")
        else:
            a = np.zeros((20, 30, 3), np.uint8)
            cv2.circle(a, (15, 10), 3 + i, (255, 255, 255), -1)
            cv2.imwrite(str(p), a)
        rows.append({"sample_id": f"s{i}", "dataset": "folder", "split": "train", "label": 0, "image_path": str(p)})
    return make_manifest(rows, "test")


def _cfg(**kw):
    return PreprocessConfig(**{"resolution": 16, "edge_model": "canny", "depth_source": "none", "workers": 0,
                               "batch_size": 2, "shard_size": 3, "device": "cpu", **kw})


def test_shards_hold_every_image_with_edges(tmp_path):
    index = preprocess(_manifest(tmp_path), tmp_path / "out", _cfg())
    assert list(index["sample_id"]) == [f"s{i}" for i in range(7)]
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.h5")) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    item = ShardDataset(tmp_path / "out" / "index.parquet", fields=("image", "edge"))[6]
    assert item["image"].shape == (3, 16, 16) and item["edge"].max() == 1.0
    assert not list((tmp_path / "out").glob(".*partial"))


def test_bad_file_fails_with_its_path_and_the_fix(tmp_path):
    m = _manifest(tmp_path, bad=(4,))
    with pytest.raises(ImageError) as e:
        preprocess(m, tmp_path / "out", _cfg())
    assert "4.png" in str(e.value) and "bad_images: skip" in str(e.value)
    assert not (tmp_path / "out" / "index.parquet").exists()


def test_skip_keeps_every_other_image_and_lists_the_bad_one(tmp_path):
    index = preprocess(_manifest(tmp_path, bad=(4,)), tmp_path / "out", _cfg(bad_images="skip"))
    assert list(index["sample_id"]) == ["s0", "s1", "s2", "s3", "s5", "s6"]
    skipped = pd.read_parquet(tmp_path / "out" / "skipped.parquet")
    assert list(skipped["sample_id"]) == ["s4"] and "not a readable image" in skipped["reason"][0]


def test_interrupted_run_leaves_no_complete_looking_file_and_resumes(tmp_path, monkeypatch):
    m, out = _manifest(tmp_path), tmp_path / "out"
    calls = {"n": 0}
    real_flush = pp._flush

    def dying_flush(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while the second shard is being written
        return real_flush(*args, **kw)

    monkeypatch.setattr(pp, "_flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        preprocess(m, out, _cfg())
    assert [p.name for p in out.iterdir()] == ["shard-00000.h5"]  # no index, no partial shard
    first = (out / "shard-00000.h5").stat().st_mtime_ns

    written = []
    monkeypatch.setattr(pp, "_flush", lambda out_dir, i, *a: written.append(i) or real_flush(out_dir, i, *a))
    index = preprocess(m, out, _cfg())
    assert written == [1, 2] and len(index) == 7
    assert (out / "shard-00000.h5").stat().st_mtime_ns == first
    assert preprocess(m, out, _cfg()) is not None and written == [1, 2]  # all complete: nothing rewritten
    preprocess(m, out, _cfg(resolution=12))  # a changed setting rewrites every shard
    assert written == [1, 2, 0, 1, 2]


@contextlib.contextmanager
def _tmpfs(path, options):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root) to make a full or read-only file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no h5py noise
def test_full_disk_gives_a_clear_error(tmp_path):
    with _tmpfs(tmp_path / "small", "size=64k") as out:
        with pytest.raises(OutputError, match="disk is full") as e:
            preprocess(_manifest(tmp_path, n=3), out, _cfg(resolution=128))
        assert "shard-00000.h5" in str(e.value)
        assert not list(out.glob("*.h5")) and not list(out.glob(".*"))


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no h5py noise
def test_read_only_output_gives_a_clear_error(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as out:
        with pytest.raises(OutputError, match="read-only"):
            preprocess(_manifest(tmp_path, n=3), out, _cfg())


def test_a_mask_of_another_size_is_stretched_with_a_warning_or_fails_as_configured(tmp_path, caplog):
    man = _manifest(tmp_path, n=2)
    for i, size in ((0, (30, 20)), (1, (15, 10))):  # (w, h): the first fits its 30x20 image, the second not
        m = np.zeros(size[::-1], np.uint8)
        m[: size[1] // 2] = 255
        cv2.imwrite(str(tmp_path / f"m{i}.png"), m)
    man["mask_path"] = pd.array([str(tmp_path / "m0.png"), str(tmp_path / "m1.png")], dtype="string")
    with caplog.at_level("WARNING", logger="hybrid.stages.preprocess"):
        preprocess(man, tmp_path / "out", _cfg())
    assert "m1.png is 15x10 but its image is 30x20; stretched onto the image" in caplog.text
    assert "m0.png" not in caplog.text
    mask = ShardDataset(tmp_path / "out" / "index.parquet", fields=("mask",), raw=True)[1]["mask"]
    assert mask[:8].all() and not mask[8:].any()  # the top half, stretched
    with pytest.raises(ImageError, match=r"m1.png is 15x10 but its image is 30x20; fix the mask, or set "
                                         r"preprocess.mask_mismatch: resize"):
        preprocess(man, tmp_path / "out2", _cfg(mask_mismatch="error"))
