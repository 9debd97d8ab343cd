"""HDF5 shards: N samples per file, one sample per chunk, written whole or not at all.

Layout of ``shard-NNNNN.h5`` (the data contract): ``image`` uint8 (N,H,W,3); optional ``edge``
uint8 (N,H,W) (edge probability x 255), ``depth`` uint16 (N,H,W) (per-image min-max, larger =
nearer), ``mask`` uint8 (N,H,W); ``sample_id`` utf-8 strings; attributes name the resolution and
the models that made the maps. Generated shards add string columns (reference_id, ...).
An ``index.parquet`` beside the shards maps sample_id -> (shard, index).
"""

from __future__ import annotations

import contextlib
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

from hybrid.io import atomic_path

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
    if "image" not in arrays or "sample_id" not in strings:
        raise ValueError("a shard needs an 'image' array and 'sample_id' strings")
    n = len(strings["sample_id"])
    # Built in memory, then written with plain file I/O: a full or read-only disk is then an ordinary
    # OSError, never a half-closed HDF5 file that the library trips over at interpreter exit.
    with h5py.File(f"in-memory-{id(arrays)}.h5", "w", driver="core", backing_store=False) as f:
        for name, a in arrays.items():
            a = np.asarray(a)
            want = ARRAY_DTYPES.get(name, a.dtype)
            if a.dtype != want or len(a) != n:
                raise ValueError(f"shard array {name!r}: got {a.dtype} x {len(a)}, want {np.dtype(want)} x {n}")
            f.create_dataset(name, data=a, chunks=(1, *a.shape[1:]) if n else None)
        for name, values in strings.items():
            if len(values) != n:
                raise ValueError(f"shard strings {name!r}: {len(values)} values for {n} samples")
            f.create_dataset(name, data=np.array([str(v) for v in values], dtype=object), dtype=_STR)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.flush()
        image = f.id.get_file_image()
    with atomic_path(path) as tmp:
        tmp.write_bytes(image)


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
        return [i for i in mine if not shard_is_current(self.path(i), prints[i])]

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
    """A stored array -> float32 tensor in [-1, 1], channels first."""
    scale = 65535.0 if name.startswith("depth") or a.dtype == np.uint16 else 255.0
    t = torch.from_numpy(np.ascontiguousarray(a).astype(np.float32)) * (2.0 / scale) - 1.0
    return t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)


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
        self._pid = os.getpid()
        if len(self.index):
            self._check_fields(self.index["shard"].iloc[0])

    def _file(self, shard: str) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share HDF5 handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = h5py.File(self.shard_dir / shard, "r")
        return f

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
        f = self._file(row["shard"])
        j = int(row["index"])
        item: dict[str, object] = {"sample_id": str(row["sample_id"])}
        for k in self.fields:
            a = f[k][j]
            item[k] = a if self.raw else to_unit(a, k)
        return item

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
