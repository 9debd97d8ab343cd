"""Atomic file writes: a reader or Snakemake never sees a half-written output.

Errors that come from the output's file system (full disk, read-only, no permission) are raised
as :class:`OutputError`, naming the file and what to do, whichever library hit them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)

_ADVICE = {
    errno.ENOSPC: ("the disk is full", "free space, or move results/ to a larger file system"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota or move results/"),
    errno.EROFS: ("the file system is read-only", "run from a writable folder or remount it read-write"),
    errno.EACCES: ("permission denied", "make the output folder writable for this user"),
    errno.EPERM: ("operation not permitted", "make the output folder writable for this user"),
}
# Some libraries (HDF5) report the cause only in their message text.
_TEXT = {"No space left": errno.ENOSPC, "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES,
         "Disk quota exceeded": errno.EDQUOT}


class OutputError(OSError):
    """An output could not be written because of its file system; the message says what to do."""


def explain(e: Exception, path: Path) -> Exception:
    """``e`` as an :class:`OutputError` naming ``path`` when it is a file-system problem, else ``e``.
    HDF5 raises RuntimeError on close with the errno only in its text, hence the text match."""
    code = getattr(e, "errno", None)
    code = code if code in _ADVICE else next((c for t, c in _TEXT.items() if t in str(e)), None)
    if code is None:
        return e
    what, todo = _ADVICE[code]
    return OutputError(code, f"cannot write {path}: {what}; {todo}")


def _reraise(e: Exception, path: Path) -> None:
    err = explain(e, path)
    if err is e:
        raise e
    raise err from e


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name starts with ``.`` and ends with ``.partial`` so globbing readers skip it.
    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or f"{path.suffix}.partial",
                                   dir=path.parent)
        os.close(fd)
    except OSError as e:
        _reraise(e, path)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should follow the umask
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        tmp_path.unlink(missing_ok=True)
        _reraise(e, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_png(path: str | Path, image) -> None:
    """An RGB (H, W, 3) or gray (H, W) uint8 array as a PNG at ``path``, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(df, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def publish(src: Path, dst: Path) -> None:
    """Rename the finished directory ``src`` onto ``dst`` (an old ``dst`` is moved aside first and
    removed once the new one is in place)."""
    if not dst.exists():
        os.rename(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)  # the old one survives a failure
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (``.<name>.*.partial``, mode per the umask); when
    the block succeeds, every file in it is given the umask's mode and the folder is renamed onto
    ``path`` (:func:`publish`). On error the temporary folder is removed and ``path`` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700: folders follow the umask like every output
    except OSError as e:
        _reraise(e, path)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) make 0600 files
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_UMASK)
        publish(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            _reraise(e, path)
        raise
