"""HDF5 shards: the contract, atomic writes, and a lazy Dataset usable from DataLoader workers."""

import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from hybrid.data.shards import ShardDataset, ShardWriter, build_index, shard_name, write_shard


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
        assert f["image"].chunks is None  # contiguous: a row is one range of bytes
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


def test_a_streamed_shard_appears_only_when_closed_and_an_aborted_one_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    depth = rng.integers(0, 65536, (4, 8, 8), dtype=np.uint16)
    ids = ["a", "b", "c", "d"]
    w = ShardWriter(tmp_path / "shard-00000.h5", {"image": ((8, 8, 3), np.uint8), "depth": ((8, 8), np.uint16)},
                    {"sample_id": ids}, {"resolution": 8})
    for rows in (slice(2, 4), slice(0, 2)):  # any order
        w.write("image", rows, image[rows])
        w.write("depth", rows, depth[rows])
    assert not (tmp_path / "shard-00000.h5").exists() and len(list(tmp_path.glob(".*.partial"))) == 1
    w.close()
    assert not list(tmp_path.glob(".*"))
    ds = ShardDataset(build_index([tmp_path / "shard-00000.h5"]), ("image", "depth"), tmp_path, raw=True)
    assert all(np.array_equal(ds[i]["image"], image[i]) and np.array_equal(ds[i]["depth"], depth[i]) for i in range(4))
    ds.close()

    w = ShardWriter(tmp_path / "shard-00001.h5", {"image": ((8, 8, 3), np.uint8)}, {"sample_id": ids}, {})
    w.write("image", slice(0, 2), image[:2])
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5"]


def test_reads_of_chunked_filtered_and_contiguous_arrays_agree(tmp_path):
    """A contiguous array (the shards this project writes) is read by one pread of its row, a chunk
    per sample (shards written before) by a direct chunk read; any other layout (a filter, several
    samples per chunk, a big-endian array) is read through h5py; every one gives the same values."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    index = []
    layouts = {"plain.h5": {"chunks": (1, 8, 8, 3)}, "gzip.h5": {"chunks": (1, 8, 8, 3), "compression": "gzip"},
               "contiguous.h5": {}, "two.h5": {"chunks": (2, 8, 8, 3)}, "big.h5": {"dtype": ">u2"}}
    for name, kw in layouts.items():
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("image", data=image.astype(kw.pop("dtype", np.uint8)), **kw)
            f.create_dataset("sample_id", data=np.array([f"{name}{i}" for i in range(3)], dtype=object),
                             dtype=h5py.string_dtype())
        index.append(build_index([tmp_path / name]))
    ds = ShardDataset(pd.concat(index, ignore_index=True), ("image",), tmp_path, raw=True)
    got = [ds[i]["image"] for i in range(len(ds))]
    assert all(np.array_equal(g, image[i % 3]) for i, g in enumerate(got))
    how = {s: how if how in (None, "chunk") else "pread" for (s, _), (_, how, *_) in ds._arrays.items()}
    assert how == {"plain.h5": "chunk", "gzip.h5": None, "contiguous.h5": "pread", "two.h5": None, "big.h5": None}
    ds.close()


def test_a_shard_written_now_is_read_back_by_pread_and_a_cut_file_is_a_clear_error(tmp_path):
    """ShardWriter's arrays are contiguous; each row comes back by one pread at HDF5's offset, the
    last row included; a file cut short while it is open (HDF5 refuses to open a cut file) names the
    file, the array and the row instead of returning a half-filled row."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    depth = rng.integers(0, 65536, (5, 6, 7), dtype=np.uint16)
    path = tmp_path / "shard-00000.h5"
    write_shard(path, {"image": image, "depth": depth}, {"sample_id": [f"s{i}" for i in range(5)]}, {})
    ds = ShardDataset(build_index([path]), ("image", "depth"), tmp_path, raw=True)
    for i in (4, 0, 2):
        assert np.array_equal(ds[i]["image"], image[i]) and np.array_equal(ds[i]["depth"], depth[i])
    assert all(isinstance(how, tuple) for _, how, *_ in ds._arrays.values())
    ds.close()

    ds = ShardDataset(build_index([path]), ("depth",), tmp_path, raw=True)
    assert np.array_equal(ds[3]["depth"], depth[3])  # the file is open
    end = ds._arrays["shard-00000.h5", "depth"][1][1] + depth.nbytes
    assert end == os.path.getsize(path)  # the depth array is the last in the file
    os.truncate(path, end - 1)  # its last row is cut
    assert np.array_equal(ds[3]["depth"], depth[3])
    with pytest.raises(OSError, match=r"shard-00000.h5: array 'depth' row 4 is cut short"):
        ds[4]
    ds.close()


def test_the_reserved_space_bounds_the_whole_shard(tmp_path):
    """The reservation (``_size_bound``) holds the whole file, string columns and their heap
    included, so a full disk shows when the shard is begun, not midway."""
    from hybrid.data.shards import _size_bound

    n = 6000  # enough strings that their heap outgrows the bound's 1 MiB of slack
    arrays = {"image": np.zeros((n, 2, 2, 3), np.uint8), "depth": np.zeros((n, 2, 2), np.uint16)}
    strings = {k: [f"{k}-{'x' * (i % 40)}-{i}" for i in range(n)] for k in ("sample_id", "pair_id", "reference_id",
                                                                          "target_id", "decoder", "manipulation")}
    attrs = {"fingerprint": "f" * 64, "resolution": 4}
    write_shard(tmp_path / "s.h5", arrays, strings, attrs)
    bound = _size_bound(n, {k: (a.shape[1:], a.dtype) for k, a in arrays.items()}, strings, attrs)
    assert os.path.getsize(tmp_path / "s.h5") <= bound


def test_todo_removes_the_temporary_files_a_killed_run_left(tmp_path):
    from hybrid.data.shards import ShardSet

    (tmp_path / ".shard-00001.h5.x1y2.h5.partial").write_bytes(b"half a shard")
    (tmp_path / ".shard-00003.h5.z9.h5.partial").write_bytes(b"another part's shard, being written")
    assert ShardSet(tmp_path, 4, "generate").todo(range(2), ["p0", "p1"]) == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == [".shard-00003.h5.z9.h5.partial"]  # not this part's shard


def test_a_shard_being_written_holds_its_space_and_gives_back_what_it_did_not_use(tmp_path):
    """The space of the whole shard is reserved when it is begun, so another job cannot fill the disk
    midway (HDF5's create truncates the file: a reservation made before it was lost), and the unused
    part of the reservation is given back when the shard is published."""
    import os

    from hybrid.data.shards import _KEEP_SIZE, _fallocate

    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    with open(probe, "r+b") as fh:
        if _fallocate is None or _fallocate(fh.fileno(), _KEEP_SIZE, 0, 1 << 20) != 0:
            pytest.skip("this file system cannot reserve space (fallocate)")
    n, shape = 32, (64, 64, 3)
    data = n * int(np.prod(shape))
    w = ShardWriter(tmp_path / "shard-00000.h5", {"image": (shape, np.uint8)},
                    {"sample_id": [str(i) for i in range(n)]}, {})
    [tmp] = tmp_path.glob(".shard-00000.h5.*")
    assert os.stat(tmp).st_blocks * 512 >= data > os.path.getsize(tmp)  # held before the rows are written
    w.write("image", slice(0, n), np.ones((n, *shape), np.uint8))
    w.close()
    st = os.stat(tmp_path / "shard-00000.h5")
    assert st.st_size >= data and st.st_blocks * 512 <= st.st_size + (64 << 10)  # nothing held past its end


def test_a_file_system_that_cannot_reserve_space_still_gets_its_shard(tmp_path, monkeypatch):
    """Where fallocate is not supported (NFS v3, some cluster file systems) nothing is reserved and
    the shard is written as usual; any other failure to reserve (a full disk) is an error."""
    import ctypes
    import errno

    import hybrid.data.shards as shards

    def unsupported(*args):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(shards, "_fallocate", unsupported)
    arrays, ids = _write(tmp_path, 0, 2)
    ds = ShardDataset(build_index([tmp_path / "shard-00000.h5"]), ("image",), tmp_path, raw=True)
    assert np.array_equal(ds[1]["image"], arrays["image"][1])
    ds.close()

    def full(*args):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(shards, "_fallocate", full)
    with pytest.raises(OSError, match="disk is full"):
        _write(tmp_path, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5"]


def test_a_shard_whose_arrays_disagree_on_the_sample_count_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="'edge'.*need 2"):
        write_shard(tmp_path / "shard-00000.h5", {"image": np.zeros((2, 4, 4, 3), np.uint8),
                                                  "edge": np.zeros((3, 4, 4), np.uint8)},
                    {"sample_id": ["a", "b"]}, {})
    assert list(tmp_path.iterdir()) == []


def test_writing_an_array_the_shard_does_not_have_names_it_and_the_shards_arrays(tmp_path):
    w = ShardWriter(tmp_path / "s.h5", {"image": ((2, 2, 3), np.uint8)}, {"sample_id": ["a"]}, {})
    with pytest.raises(KeyError, match=r"'edge'.*\['image'\]"):
        w.write("edge", slice(0, 1), np.zeros((1, 2, 2), np.uint8))
    w.abort()
