"""The helpers every config section uses."""

from dataclasses import dataclass

import pytest
import torch

from hybrid.config import check_keys, resolve_device


@dataclass
class Section:
    lr: float = 1.0
    seed: int = 0


def test_unknown_keys_are_named_with_the_section_and_the_valid_keys():
    assert check_keys({"lr": 2.0}, Section, "train") == {"lr": 2.0}
    assert check_keys(None, Section, "train") == {}
    with pytest.raises(ValueError, match=r"unknown train config key\(s\) \['rl'\]; valid keys are \['lr', 'seed'\]"):
        check_keys({"rl": 2.0}, Section, "train")
    assert check_keys({"extra": 1}, Section, "x", extra=["extra"]) == {"extra": 1}
    with pytest.raises(ValueError, match="seed"):
        check_keys({"seed": 1}, Section, "x", hidden=["seed"])


def test_device_auto_and_explicit():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            resolve_device("cuda:0")
