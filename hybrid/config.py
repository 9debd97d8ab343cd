"""Helpers every config section shares: refusing unknown keys, and choosing the device."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # the schema's pattern for every `device` key
WEIGHT_MODES = ("auto", "real", "random")  # a stage's `weights`: registered files, seeded stand-ins, or either
PRECISIONS = ("auto", "fp32", "bf16")  # a stage's autocast `precision`: auto = bf16 on cuda, fp32 on cpu


def check_device(name: object, key: str) -> str:
    """``name`` when it is auto, cpu, cuda or cuda:N (every stage's ``device``), else an error naming ``key``."""
    if not isinstance(name, str) or not re.match(DEVICE_PATTERN, name):
        raise ValueError(f"{key}: {name!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return name


def choice(options: Iterable, default: object = dataclasses.MISSING, *,
           default_factory: object = dataclasses.MISSING, alone: Iterable = ()) -> dataclasses.Field:
    """A dataclass field whose value (each item, for a list) is one of ``options``, or one of ``alone``
    in place of a list (evaluate.kinds: auto or a list of kinds): the one place a key's choices live.
    ``__post_init__`` checks them with :func:`check_choices`; tests/test_config_truth.py compares them
    with config/schema.yaml's ``enum``."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"choices": tuple(options), "alone": tuple(alone)})


def _is_one_of(value: object, options: Iterable) -> bool:
    """``value in options`` with True / 1 and False / 0 kept apart."""
    return any(value is o if isinstance(o, bool) or isinstance(value, bool) else value == o for o in options)


def _words(options: Iterable, last: str = " or ") -> str:
    names = ["true" if o is True else "false" if o is False else "null" if o is None else str(o) for o in options]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + last + names[-1]


def check_choices(obj: object, section: str) -> None:
    """Every field of dataclass instance ``obj`` declared with :func:`choice` holds one of its choices (a
    list or tuple: only choices); else a ValueError naming ``section.key``, the value and the choices."""
    for f in dataclasses.fields(obj):
        options = f.metadata.get("choices")
        if options is None:
            continue
        value, alone = getattr(obj, f.name), f.metadata.get("alone", ())
        if _is_one_of(value, alone):
            continue
        if alone and not isinstance(value, (list, tuple)):
            raise ValueError(f"{section}.{f.name} {value!r}: use {_words(alone)} or a list of "
                             f"{_words(options, ', ')}")
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if not _is_one_of(v, options)]
            if bad:
                raise ValueError(f"{section}.{f.name} {list(value)}: {bad} unknown; choose from "
                                 f"{_words(options, ', ')}")
        elif not _is_one_of(value, options):
            raise ValueError(f"{section}.{f.name} {value!r}: use {_words(options)}")


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
