"""HDF5 shards: N samples per file, each array contiguous, written whole or not at all.

Layout of ``shard-NNNNN.h5`` (the data contract): ``image`` uint8 (N,H,W,3); optional ``edge``
uint8 (N,H,W) (edge probability x 255), ``depth`` uint16 (N,H,W) (per-image min-max, larger =
nearer), ``mask`` uint8 (N,H,W); ``sample_id`` utf-8 strings; attributes name the resolution and
the models that made the maps. Generated shards add string columns (reference_id, ...).
An ``index.parquet`` beside the shards maps sample_id -> (shard, index).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hybrid.io import atomic_path, explain

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:05d}.h5"
KEPT = ".published"  # in a shard folder: hard links to the last complete set (shards, index, ...)
ARRAY_DTYPES = {"image": np.uint8, "edge": np.uint8, "depth": np.uint16, "mask": np.uint8}
_STR = h5py.string_dtype("utf-8")


def shard_name(i: int) -> str:
    return SHARD_PATTERN.format(i)


def write_shard(path: str | Path, arrays: Mapping[str, np.ndarray], strings: Mapping[str, Sequence[str]],
                attrs: Mapping[str, object]) -> None:
    """Write one shard atomically. ``arrays`` must include ``image``; ``strings`` ``sample_id``."""
    arrays = {k: np.asarray(a) for k, a in arrays.items()}
    writer = ShardWriter(path, {k: (a.shape[1:], a.dtype) for k, a in arrays.items()}, strings, attrs)
    try:
        for name, a in arrays.items():
            writer.write(name, slice(0, writer.n), a)  # checks the row count
    except BaseException as e:
        writer.abort(e)
        raise
    writer.close()


class ShardWriter:
    """One shard written as it is filled, published whole or not at all.

    ``arrays``: name -> (per-sample shape, dtype); ``strings`` (known up front) must hold
    ``sample_id``, whose length is the sample count. Blocks of rows are written with :meth:`write`
    in any order, from one thread at a time; :meth:`close` renames the temporary file onto ``path``,
    :meth:`abort` removes it. The file's space is reserved as soon as HDF5 has created it, so a
    full disk (or quota) is an ordinary OSError before any row is written, never a half-written
    HDF5 file that the library trips over when its objects are freed, and no other job can fill
    the disk midway. (Writing straight into the file costs about an eighth
    of the CPU of building an in-memory HDF5 image and copying it out: 0.3 vs 2.4 ms per 256 px
    sample; streaming blocks of rows needs no shard-sized buffer.) Arrays are contiguous, not
    chunked: HDF5 writes a block of rows as one range of bytes instead of a chunk (and its index
    entry) per row, 0.16 against 0.26 ms of CPU per 256 px generated row of five arrays, and a row
    is read back by one ``pread`` (:meth:`ShardDataset.read`).
    """

    def __init__(self, path: str | Path, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 strings: Mapping[str, Sequence[str]], attrs: Mapping[str, object]) -> None:
        if "image" not in arrays or "sample_id" not in strings:
            raise ValueError("a shard needs an 'image' array and 'sample_id' strings")
        self.n = n = len(strings["sample_id"])
        for name, (_, dtype) in arrays.items():
            want = ARRAY_DTYPES.get(name, dtype)
            if np.dtype(dtype) != want:
                raise ValueError(f"shard array {name!r}: got {np.dtype(dtype)}, want {np.dtype(want)}")
        for name, values in strings.items():
            if len(values) != n:
                raise ValueError(f"shard strings {name!r}: {len(values)} values for {n} samples")
        self.path = Path(path)
        self._datasets: dict[str, tuple[h5py.Dataset, tuple[int, ...], np.dtype, h5py.h5s.SpaceID]] = {}
        self._atomic = atomic_path(path)
        self._tmp = tmp = self._atomic.__enter__()
        self._file = None
        try:
            self._file = h5py.File(tmp, "w")  # creating truncates: space is reserved after
            _reserve(tmp, _size_bound(n, arrays, strings, attrs))
            for name, (shape, dtype) in arrays.items():  # contiguous: see the class's note
                dset = self._file.create_dataset(name, (n, *shape), dtype)
                self._datasets[name] = (dset, tuple(shape), dset.dtype, dset.id.get_space())
            for name, values in strings.items():
                self._file.create_dataset(name, data=np.array([str(v) for v in values], dtype=object), dtype=_STR)
            for k, v in attrs.items():
                self._file.attrs[k] = v
        except BaseException as e:
            self._discard(e)
            raise

    def write(self, name: str, rows: slice, values: np.ndarray) -> None:
        """``values`` into the contiguous rows ``rows`` of the array ``name``, in one HDF5 call.

        Few large calls, not one per row: the writer runs in a thread beside a busy main thread,
        and each call that gives up the GIL waits to get it back (1,024 direct chunk writes took
        5.5 s beside a busy Python thread against 0.1 s alone; 64 slice writes 0.7 s against 0.17)."""
        got = self._datasets.get(name)
        if got is None:
            raise KeyError(f"shard array {name!r} is not among this shard's arrays {sorted(self._datasets)}")
        dset, shape, dtype, space = got  # asked once: each h5py property call queries the file
        start, stop, step = rows.indices(self.n)
        values = np.asarray(values)
        if step != 1 or values.dtype != dtype or values.shape != (stop - start, *shape):
            raise ValueError(f"shard array {name!r}: rows {rows} need {stop - start} x {shape} {dtype} "
                             f"(contiguous), got {values.shape} {values.dtype}")
        if stop == start:
            return
        try:  # HDF5's own call on the rows' selection: h5py's slicing costs about 0.1 ms of Python per call
            space.select_hyperslab((start,) + (0,) * len(shape), values.shape)
            dset.id.write(h5py.h5s.create_simple(values.shape), space, np.ascontiguousarray(values))
        except OSError as e:
            raise explain(e, self.path) from e

    def close(self) -> None:
        """Finish the file, give back the space reserved beyond its end, and rename it onto ``path``."""
        try:
            self._file.close()
            os.truncate(self._tmp, os.path.getsize(self._tmp))  # frees the unused reservation
        except BaseException as e:
            self._discard(e)
            raise
        self._atomic.__exit__(None, None, None)

    def abort(self, error: BaseException | None = None) -> None:
        """Remove the temporary file (after a failure, or when the shard is not wanted)."""
        with contextlib.suppress(BaseException):
            self._discard(error or RuntimeError(f"{self.path} abandoned"))

    def _discard(self, error: BaseException) -> None:
        """Close the file quietly and remove it; raises ``error`` as :func:`hybrid.io.explain` words
        it when that names a file-system cause (a full or read-only disk)."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
        self._atomic.__exit__(type(error), error, error.__traceback__)


def _raw_access(f: h5py.File, a: h5py.Dataset, dtype: np.dtype) -> tuple[int, int] | str | None:
    """How :meth:`ShardDataset.read` reads a row of ``a`` without a selection: (file descriptor,
    byte offset) of a contiguous array of plain numbers in the machine's byte order, in a file
    opened by HDF5's default (POSIX) driver; ``"chunk"`` for one unfiltered chunk per row; else None."""
    if dtype.kind not in "uif" or not dtype.isnative:
        return None
    plist = a.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS and f.driver == "sec2" and hasattr(os, "preadv"):  # not on Windows
        offset = a.id.get_offset()  # None: never written
        return None if offset is None else (f.id.get_vfd_handle(), offset)
    if layout == h5py.h5d.CHUNKED and a.chunks == (1, *a.shape[1:]) and plist.get_nfilters() == 0:
        return "chunk"
    return None


def _no_cache() -> h5py.h5p.PropDAID:
    """A dataset access list without a chunk cache (h5py's ``rdcc_nbytes=0`` keeps the default)."""
    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(0, 0, 1.0)
    return access


def _size_bound(n: int, arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                strings: Mapping[str, Sequence[str]], attrs: Mapping[str, object]) -> int:
    """More than the bytes a shard takes: the contiguous arrays (no chunk index), the strings with
    their heap records, the attributes, 1 MiB for the rest. (A generated shard of 1,024 rows at
    256 px: 0.5 MB beyond its arrays, against a bound of 4.1 MB beyond them.)"""
    text = sum(len(str(v).encode()) + 32 for values in strings.values() for v in values)
    data = sum(n * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return data + 256 * n * len(strings) + text + sum(len(str(v)) + 256 for v in attrs.values()) + (1 << 20)


_KEEP_SIZE = 1  # FALLOC_FL_KEEP_SIZE


def _reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes to ``path`` without changing its size: the blocks stay allocated as
    the file grows into them (:meth:`ShardWriter.close` frees what it did not use).

    Linux's fallocate(2) is called directly: where a file system cannot reserve space (NFS v3,
    some cluster file systems) nothing is reserved, instead of glibc's ``posix_fallocate``
    fallback that writes a byte into every block, which would write the file twice."""
    if _fallocate is None:
        return
    with open(path, "r+b") as fh:
        if _fallocate(fh.fileno(), _KEEP_SIZE, 0, size) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(code, os.strerror(code), str(path))


def _libc_fallocate():
    """libc's ``fallocate`` (Linux), or None."""
    try:
        f = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


_fallocate = _libc_fallocate()


def read_attrs(path: str | Path) -> dict[str, object]:
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def shard_is_current(path: str | Path, fingerprint: str) -> bool:
    """True when ``path`` is a readable shard written with ``fingerprint`` (resume keeps it)."""
    if not Path(path).exists():
        return False
    try:
        return read_attrs(path).get("fingerprint") == fingerprint
    except OSError:  # a damaged file from an old crash: rewrite it
        return False


def part_range(n: int, part: int, parts: int) -> range:
    """The ``part``-th (0-based) of ``parts`` contiguous ranges that split ``range(n)`` evenly."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}: need 0 <= part < parts")
    return range(part * n // parts, (part + 1) * n // parts)


class ShardSet:
    """The numbered shards of one resumable stage (preprocess, generate, baselines) in ``out_dir``.

    The stage decides how many shards there are and each one's fingerprint; this class says which
    must be written (missing, stale or damaged: :meth:`todo`), checks a scatter's parts are all
    there (:meth:`require`), and, once the stage has written its index, removes shards past the
    end and keeps the complete set recoverable (:meth:`finish`): hard links to every shard and
    the index files in ``out_dir/.published`` (no extra disk). A later run that fails half way,
    after Snakemake removed its output and some shards were rewritten, leaves that last complete
    set whole there; :meth:`kept_note` says so in the error.
    """

    def __init__(self, out_dir: str | Path, n_shards: int, stage: str) -> None:
        self.out_dir, self.n, self.stage = Path(out_dir), n_shards, stage

    def path(self, i: int) -> Path:
        return self.out_dir / shard_name(i)

    def todo(self, mine: Iterable[int], prints: Mapping[int, str] | Sequence[str]) -> list[int]:
        """The shards of ``mine`` whose file is missing, unreadable or has another fingerprint."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        todo = [i for i in mine if not shard_is_current(self.path(i), prints[i])]
        for i in todo:  # temporary files of a killed run (a shard is written over minutes)
            for stale in self.out_dir.glob(f".{shard_name(i)}.*.partial"):
                stale.unlink(missing_ok=True)
        return todo

    def require(self, job: str) -> None:
        """A gather's check: every shard is there (each part finished), else name the missing."""
        missing = [shard_name(i) for i in range(self.n) if not self.path(i).exists()]
        if missing:
            raise FileNotFoundError(f"{self.stage} gather: {len(missing)} shards are missing in {self.out_dir} "
                                    f"({', '.join(missing[:5])}); rerun the {job} jobs that write them")

    def finish(self, files: Sequence[str]) -> None:
        """After the index ``files`` (names in ``out_dir``) are written: delete shards past the end
        and replace ``.published`` with hard links to this complete set."""
        for stale in self.out_dir.glob("shard-*.h5"):
            if int(stale.stem.split("-")[1]) >= self.n:
                stale.unlink()
        kept = self.out_dir / KEPT
        tmp = self.out_dir / f"{KEPT}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in [*(shard_name(i) for i in range(self.n)), *files]:
            if (self.out_dir / name).exists():
                try:
                    os.link(self.out_dir / name, tmp / name)
                except OSError:  # a file system without hard links: the set is not kept
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
        old = self.out_dir / f"{KEPT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if kept.exists():
            os.rename(kept, old)
        os.rename(tmp, kept)
        shutil.rmtree(old, ignore_errors=True)

    def kept_note(self) -> str | None:
        """Where the last complete set is, for an error message (None when there is none)."""
        kept = self.out_dir / KEPT
        if not kept.is_dir():
            return None
        return (f"the last complete {self.stage} output is kept in {kept} (its shards and index; copy them "
                f"into {self.out_dir} to use them while this run is fixed)")


@contextlib.contextmanager
def says_what_is_kept(out_dir: str | Path, stage: str):
    """Around a shard-writing stage: a failure logs, and notes on the exception, where the last
    complete set is kept (:meth:`ShardSet.kept_note`)."""
    try:
        yield
    except BaseException as e:
        note = ShardSet(out_dir, 0, stage).kept_note()
        if note:
            log.error("%s failed: %s", stage, note)
            e.add_note(note)
        raise


def build_index(shard_paths: Sequence[str | Path]) -> pd.DataFrame:
    """sample_id, shard (file name), index: one row per sample, in shard order."""
    rows = []
    for p in shard_paths:
        with h5py.File(p, "r") as f:
            ids = f["sample_id"].asstr()[:]
        rows += [(sid, Path(p).name, i) for i, sid in enumerate(ids)]
    return pd.DataFrame(rows, columns=["sample_id", "shard", "index"]).astype(
        {"sample_id": "string", "shard": "string", "index": "int64"}
    )


def to_unit(a: np.ndarray, name: str) -> torch.Tensor:
    """A stored array -> float32 tensor in [-1, 1], channels first (computed in place on one float copy)."""
    scale = 65535.0 if name.startswith("depth") or a.dtype == np.uint16 else 255.0
    t = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).mul_(2.0 / scale).sub_(1.0)
    return t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)


def unit_tensor(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A map kept in its stored form (channels first) as float32 in [-1, 1] on its own device, by
    the operations of :func:`to_unit`: uint8 (images, edges) over 255, any other integer type
    (depth: its uint16 values, also as int32) over 65535; a float tensor unchanged. The generate
    stage sends maps to the device this way (fewer bytes, and no float conversion on the host).
    ``out``: a float32 tensor of ``x``'s shape (a view into a larger one) that receives the values."""
    if out is not None:
        out.copy_(x)
        return out if x.is_floating_point() else out.mul_(2.0 / _int_scale(x)).sub_(1.0)
    if x.is_floating_point():
        return x
    return x.to(torch.float32).mul_(2.0 / _int_scale(x)).sub_(1.0)


def _int_scale(x: torch.Tensor) -> float:
    return 255.0 if x.dtype == torch.uint8 else 65535.0


class ShardDataset(Dataset):
    """Samples from the shards listed in ``index.parquet``, read lazily (memory flat in dataset size).

    Items are dicts: ``sample_id`` plus each of ``fields`` as a float32 tensor in [-1, 1]
    (image (3,H,W), edge/depth/mask (1,H,W)); with ``raw=True`` the stored arrays as they are.
    File handles are opened per process on first use, so DataLoader workers each get their own.
    """

    def __init__(self, index: str | Path | pd.DataFrame, fields: Sequence[str] = ("image", "edge", "depth"),
                 shard_dir: str | Path | None = None, raw: bool = False) -> None:
        if isinstance(index, pd.DataFrame):
            if shard_dir is None:
                raise ValueError("shard_dir is needed when the index is given as a DataFrame")
            self.index = index.reset_index(drop=True)
        else:
            self.index = pd.read_parquet(index)
            shard_dir = shard_dir or Path(index).parent
        self.shard_dir = Path(shard_dir)
        self.fields = tuple(fields)
        self.raw = raw
        self._files: dict[str, h5py.File] = {}
        self._arrays: dict[tuple[str, str], tuple] = {}  # (dataset, raw access, sample shape, dtype)
        self._pid = os.getpid()
        if len(self.index):
            self._check_fields(self.index["shard"].iloc[0])

    def _file(self, shard: str) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share HDF5 handles
            self._files, self._arrays, self._pid = {}, {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = h5py.File(self.shard_dir / shard, "r")
        return f

    def read(self, shard: str, name: str, j: int) -> np.ndarray:
        """Sample ``j`` of the array ``name`` of ``shard``, as stored.

        Each dataset is opened once per process and without a chunk cache (a 1 MiB cache kept per
        input shard would grow with the data set). A contiguous array (the shards written now) is
        read with one ``pread`` of the row's bytes on HDF5's own file handle, at the offset HDF5
        gives: 0.016 ms for a 256 px image against 0.027 through h5py. A chunk of one sample
        without a filter (shards written before 2026-12-06) is read with one direct chunk read,
        about 3x cheaper than a selection.
        """
        got = self._arrays.get((shard, name))
        if got is None or self._pid != os.getpid():
            f = self._file(shard)
            a = h5py.Dataset(h5py.h5d.open(f.id, name.encode(), _no_cache()))
            shape, dtype = a.shape, a.dtype  # asked once: each h5py property call queries the file
            got = self._arrays[shard, name] = (a, _raw_access(f, a, dtype), shape[1:], dtype)
        a, how, shape, dtype = got
        if how is None:
            return a[j]
        out = np.empty(shape, dtype)
        raw = out.reshape(-1).view(np.uint8)
        if how == "chunk":
            a.id.read_direct_chunk((j,) + (0,) * len(shape), out=raw)
            return out
        fd, offset = how
        if os.preadv(fd, [raw], offset + j * raw.size) != raw.size:
            raise OSError(f"{self.shard_dir / shard}: array {name!r} row {j} is cut short (the file is truncated); "
                          "rerun the stage that wrote it")
        return out

    def _check_fields(self, shard: str) -> None:
        f = self._file(shard)
        missing = [k for k in self.fields if k not in f]
        if missing:
            raise KeyError(
                f"{self.shard_dir / shard} has no {missing} arrays (it has {sorted(f.keys())}); "
                "run the preprocess stage with the edge model and depth source configured"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, object]:
        row = self.index.iloc[i]
        j = int(row["index"])
        item: dict[str, object] = {"sample_id": str(row["sample_id"])}
        for k in self.fields:
            a = self.read(row["shard"], k, j)
            item[k] = a if self.raw else to_unit(a, k)
        return item

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files, self._arrays = {}, {}

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_files"], state["_arrays"] = {}, {}
        return state
