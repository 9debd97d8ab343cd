"""Helpers every config section shares: refusing unknown keys, and choosing the device."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # the schema's pattern for every `device` key


def check_device(name: object, key: str) -> str:
    """``name`` when it is auto, cpu, cuda or cuda:N (every stage's ``device``), else an error naming ``key``."""
    if not isinstance(name, str) or not re.match(DEVICE_PATTERN, name):
        raise ValueError(f"{key}: {name!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return name


def check_keys(d: Mapping | None, cls: type, section: str, extra: Iterable[str] = (),
               hidden: Iterable[str] = ()) -> dict:
    """``d`` as a dict, after refusing any key that is not a field of dataclass ``cls`` (or in
    ``extra``); the error names the section, the unknown keys and the valid ones."""
    d = dict(d or {})
    valid = sorted({f.name for f in dataclasses.fields(cls)} - set(hidden) | set(extra))
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {section} config key(s) {unknown}; valid keys are {valid}")
    return d


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when torch sees a GPU, else cpu; an explicit cuda without one is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but torch sees no GPU; set device: auto or cpu")
    return torch.device(name)
