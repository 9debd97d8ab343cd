"""One entry point for every dataset layout: ``read_dataset(layout, options)`` -> manifest."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pandas as pd

from hybrid.data.demo_industrial import read_demo_industrial
from hybrid.data.folder import read_folder
from hybrid.data.heliconius import read_heliconius
from hybrid.data.madsim import read_madsim
from hybrid.data.manifest import ManifestError
from hybrid.data.mvtec import read_mvtec_3d, read_mvtec_ad, read_mvtec_loco
from hybrid.data.realiad import read_realiad
from hybrid.data.visa import read_visa

READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "heliconius": read_heliconius,
    "demo": read_heliconius,  # the demo writes images plus HDR-format CSVs
    "demo_industrial": read_demo_industrial,  # an MVTec AD tree (mvtec_ad reader) plus height maps
    "mvtec_ad": read_mvtec_ad,
    "mvtec_3d": read_mvtec_3d,
    "mvtec_loco": read_mvtec_loco,
    "visa": read_visa,
    "madsim": read_madsim,  # MAD-Sim (PAD benchmark): an MVTec AD tree of LEGO toys
    "realiad": read_realiad,  # Real-IAD: per-category split JSONs, five views
    "folder": read_folder,
}


def reader_options(layout: str) -> dict[str, object]:
    """The options a layout's reader accepts, each with its default (``inspect.Parameter.empty``
    when required)."""
    if layout not in READERS:
        raise ValueError(f"unknown dataset layout {layout!r}; use one of {sorted(READERS)}")
    return {n: p.default for n, p in inspect.signature(READERS[layout]).parameters.items()}


def read_dataset(layout: str, options: dict) -> pd.DataFrame:
    """Call the layout's reader with ``options`` as keyword arguments; dataset column = layout."""
    accepted = reader_options(layout)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"dataset layout {layout!r} does not take the options {unknown}; "
                         f"it accepts {sorted(accepted)}")
    lacking = [n for n, d in accepted.items() if d is inspect.Parameter.empty and n not in options]
    if lacking:
        raise ValueError(f"dataset layout {layout!r} needs the options {lacking}")
    df = READERS[layout](**options)
    wanted = options.get("categories")
    wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
    empty = [c for c in wanted if not (df["category"].astype(str) == str(c)).any()]
    if empty:  # a configured category whose folders hold no images would otherwise vanish
        raise ManifestError(f"dataset.options.categories names {empty}, but no images of them were found under "
                            f"{options.get('root', options)}; check their folders, or drop them from the list")
    attrs = dict(df.attrs)
    df = df.assign(dataset=pd.Series(layout, index=df.index, dtype="string"))
    df.attrs = attrs
    return df
