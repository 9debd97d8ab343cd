"""The helpers every config section uses."""

from dataclasses import dataclass

import pytest
import torch

from hybrid.config import check_choices, check_device, check_keys, choice, resolve_device


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


@dataclass
class Choosy:
    weights: str = choice(("auto", "real", "random"), "auto")
    kinds: list = choice(("global", "local"), default_factory=lambda: ["local"])
    depth: object = choice(("auto", True, False), "auto")
    which: object = choice(("global", "local"), "auto", alone=("auto",))

    def __post_init__(self) -> None:
        check_choices(self, "sec")


def test_choices_are_checked_naming_the_key_and_the_choices():
    assert Choosy(depth=True).depth is True and Choosy(kinds=["global", "local"]).kinds == ["global", "local"]
    with pytest.raises(ValueError, match=r"sec\.weights 'x': use auto, real or random"):
        Choosy(weights="x")
    with pytest.raises(ValueError,
                       match=r"sec\.kinds \['local', 'normal'\]: \['normal'\] unknown; choose from global, local"):
        Choosy(kinds=["local", "normal"])
    assert Choosy(which=["local"]).which == ["local"]
    with pytest.raises(ValueError, match=r"sec\.which 'global': use auto or a list of global, local"):
        Choosy(which="global")  # auto alone, or a list of the choices
    for bad in (1, "true", None):  # True / 1 kept apart; booleans are not their names
        with pytest.raises(ValueError, match=r"sec\.depth .*: use auto, true or false"):
            Choosy(depth=bad)


def test_devices_are_auto_cpu_cuda_or_cuda_n():
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_device(ok, "x.device") == ok
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", None, 0):
        with pytest.raises(ValueError, match=r"x\.device: .* is not a device; use auto, cpu, cuda or cuda:N"):
            check_device(bad, "x.device")
