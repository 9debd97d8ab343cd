"""Helpers the dataset readers share: listing images, finding files, and the missing-file policy."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hybrid.data.manifest import ManifestError, make_manifest

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MISSING_POLICIES = ("error", "skip")
SHOWN = 20  # how many problem files an error message lists


def read_csv(path: str | Path, required: Iterable[str], what: str,
             nonempty: Iterable[str] = ()) -> tuple[Path, pd.DataFrame]:
    """A CSV as strings (only empty cells are null), with its ``required`` columns checked and
    no empty cell in the ``nonempty`` ones."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ManifestError(f"{what} {path} does not exist; fix its path in the dataset config")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    lacking = [c for c in required if c not in df.columns]
    if lacking:
        raise ManifestError(f"{path} lacks the columns {lacking} (it has {list(df.columns)}); "
                            f"is it a {what}?")
    for col in nonempty:
        if df[col].isna().any():
            rows = (df.index[df[col].isna()] + 2).tolist()  # line numbers, the header is line 1
            raise ManifestError(f"{path}: column {col!r} is empty on lines {rows[:SHOWN]}; "
                                "fill it in or remove those lines")
    return path, df


def check_unique(ids: pd.Series, source: str | Path) -> None:
    """Error naming ``source`` if any id (an image) is listed more than once."""
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise ManifestError(f"{source} lists these images more than once: {dup[:SHOWN]} "
                            f"({len(dup)} in all); keep one row per image")


def check_missing(missing: str) -> str:
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r} is not a policy; use one of {MISSING_POLICIES}")
    return missing


def folder(path: str | Path, what: str) -> Path:
    """The absolute, resolved form of a folder the user named; error if it is not a folder."""
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise ManifestError(f"{what} {p} is not a folder; fix the path in the dataset config")
    return p


def entries(path: Path) -> list[os.DirEntry]:
    """Visible (not dot-named) entries of a folder, sorted by name; none if it does not exist."""
    if not path.is_dir():
        return []
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def subfolders(path: Path) -> list[str]:
    return [e.name for e in entries(path) if e.is_dir()]


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def list_images(path: Path) -> list[Path]:
    """Image files directly in ``path`` (extension case ignored), sorted; other files are ignored.

    Two images with the same stem (``a.png`` and ``a.jpg``) would get the same sample id: error.
    """
    images = [path / e.name for e in entries(path) if e.is_file() and is_image(e.name)]
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise ManifestError(
                f"{stems[p.stem]} and {p} share the name {p.stem!r}, so they would get the same "
                "sample id; rename or remove one of them"
            )
        stems[p.stem] = p
    return images


def pick_categories(
    available: list[str], categories: str | Iterable[str] | None, where: str | Path
) -> list[str]:
    """The categories to read: the named ones (checked), or all ``available`` for None or []."""
    wanted = [categories] if isinstance(categories, str) else list(dict.fromkeys(categories or []))
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ManifestError(f"categories {unknown} are not in {where}; available: {available}")
    if not (wanted or available):
        raise ManifestError(f"no categories found in {where}; check the dataset root")
    return wanted or available


class FileIndex:
    """Finds files by name with the extension's case ignored (``a.jpg`` finds ``a.JPG``).

    Lists each folder once, so thousands of look-ups cost one directory scan per folder.
    """

    def __init__(self) -> None:
        self._folders: dict[Path, dict[tuple[str, str], list[Path]]] = {}

    def _index(self, path: Path) -> dict[tuple[str, str], list[Path]]:
        if path not in self._folders:
            index: dict[tuple[str, str], list[Path]] = {}
            for e in entries(path):
                if e.is_file():
                    stem, ext = os.path.splitext(e.name)
                    index.setdefault((stem, ext.lower()), []).append(path / e.name)
            self._folders[path] = index
        return self._folders[path]

    def find(self, path: Path) -> Path | None:
        """``path`` itself if it exists, else the one file that differs only in extension case."""
        found = self._index(path.parent).get((path.stem, path.suffix.lower()), [])
        return path if path in found else (found[0] if found else None)

    def find_stem(self, path: Path, stem: str, exts: Iterable[str] = IMAGE_EXTS) -> Path | None:
        """The first file ``path/<stem><ext>`` over ``exts`` (in order, any case), or None."""
        index = self._index(path)
        for ext in exts:
            if found := index.get((stem, ext.lower())):
                return found[0]
        return None


class Problems:
    """Records that cannot be used (a missing image, mask or depth) under one ``missing`` policy.

    With ``missing="error"`` :meth:`manifest` raises one error listing them all; with
    ``missing="skip"`` the records are dropped and listed in ``df.attrs["skipped"]``.
    """

    def __init__(self, missing: str, fix: str) -> None:
        self.missing = check_missing(missing)
        self.fix = fix  # what the user should correct, e.g. "correct image_dir (now /data/x)"
        self.records: list[dict[str, str]] = []

    def add(self, path: str | Path, source: str | Path, reason: str, category: str | None = None,
            defect: str | None = None) -> None:
        """Record one unusable file; ``category`` and ``defect`` (where the layout knows them) let
        the protocol split name defect types that lost images."""
        self.records.append({"path": str(path), "source": str(source), "reason": reason,
                             "category": category, "defect": defect})

    def message(self, dataset: str) -> str:
        groups: dict[tuple[str, str], list[str]] = {}
        for r in self.records:
            groups.setdefault((r["reason"], r["source"]), []).append(r["path"])
        lines = [f"{dataset}: records that cannot be used: {len(self.records)}"]
        for (reason, source), paths in groups.items():
            more = f" ... and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
            shown = ", ".join(paths[:SHOWN])
            lines.append(f"- {reason} ({len(paths)}, from {source}): {shown}{more}")
        lines.append(f"To fix: {self.fix}, or set ingest.missing: skip to drop these records "
                     "(they are then listed in the log).")
        return "\n".join(lines)

    def manifest(self, rows: list[dict], dataset: str, source: str | Path) -> pd.DataFrame:
        """The validated manifest of ``rows``, after raising or recording the problems."""
        if self.records and self.missing == "error":
            raise ManifestError(self.message(dataset))
        df = make_manifest(rows, source)
        df.attrs["skipped"] = list(self.records)
        return df
