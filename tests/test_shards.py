"""HDF5 shards: the contract, atomic writes, and a lazy Dataset usable from DataLoader workers."""

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hybrid.data.shards import ShardDataset, build_index, shard_name, write_shard


def _write(tmp_path, i, n, start=0, with_maps=True):
    rng = np.random.default_rng(i)
    arrays = {"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)}
    if with_maps:
        arrays["edge"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays["depth"] = rng.integers(0, 65536, (n, 8, 8), dtype=np.uint16)
    ids = [f"s{start + k}" for k in range(n)]
    write_shard(tmp_path / shard_name(i), arrays, {"sample_id": ids}, {"resolution": 8, "edge_model": "canny"})
    return arrays, ids


def test_shard_contract(tmp_path):
    arrays, ids = _write(tmp_path, 0, 3)
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        assert f["image"].dtype == np.uint8 and f["image"].shape == (3, 8, 8, 3)
        assert f["image"].chunks == (1, 8, 8, 3)
        assert f["depth"].dtype == np.uint16
        assert list(f["sample_id"].asstr()[:]) == ids
        assert f.attrs["edge_model"] == "canny"


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        write_shard(tmp_path / "shard-00000.h5", {"image": np.zeros((2, 4, 4, 3), np.uint8),
                                                  "depth": np.zeros((2, 4, 4), np.float32)},
                    {"sample_id": ["a", "b"]}, {})
    assert list(tmp_path.iterdir()) == []


def test_dataset_reads_lazily_in_unit_range(tmp_path):
    a0, ids0 = _write(tmp_path, 0, 3)
    a1, ids1 = _write(tmp_path, 1, 2, start=3)
    index = build_index([tmp_path / shard_name(0), tmp_path / shard_name(1)])
    index.to_parquet(tmp_path / "index.parquet")
    ds = ShardDataset(tmp_path / "index.parquet")
    assert len(ds) == 5 and ds._files.keys() <= {"shard-00000.h5"}
    item = ds[4]
    assert item["sample_id"] == "s4"
    assert item["image"].shape == (3, 8, 8) and item["edge"].shape == (1, 8, 8)
    torch.testing.assert_close(item["image"], torch.from_numpy(a1["image"][1]).permute(2, 0, 1).float() / 127.5 - 1)
    torch.testing.assert_close(item["depth"][0], torch.from_numpy(a1["depth"][1].astype(np.float32)) / 32767.5 - 1)
    raw = ShardDataset(tmp_path / "index.parquet", raw=True)[0]
    np.testing.assert_array_equal(raw["image"], a0["image"][0])


def test_dataset_in_worker_processes(tmp_path):
    _write(tmp_path, 0, 4)
    build_index([tmp_path / shard_name(0)]).to_parquet(tmp_path / "index.parquet")
    ds = ShardDataset(tmp_path / "index.parquet")
    ds[0]  # the parent opened a handle; workers must open their own
    ids = [sid for b in DataLoader(ds, batch_size=2, num_workers=2) for sid in b["sample_id"]]
    assert sorted(ids) == ["s0", "s1", "s2", "s3"]


def test_missing_maps_named(tmp_path):
    _write(tmp_path, 0, 2, with_maps=False)
    build_index([tmp_path / shard_name(0)]).to_parquet(tmp_path / "index.parquet")
    with pytest.raises(KeyError, match="edge"):
        ShardDataset(tmp_path / "index.parquet")
