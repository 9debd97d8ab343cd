"""Deterministic training: reflection pads without atomic adds, torch's switches set for the run
and restored after it."""

import pytest
import torch
import torch.nn.functional as F

import hybrid.stages.flare
import hybrid.train
from hybrid.determinism import ReflectionPad2d, deterministic_algorithms, reflect_pad
from hybrid.models.generator import Generator
from tests.af_data import make_results, save_af_checkpoint
from tests.test_flare import flare_run
from tests.test_train import AUG, MODEL, Blobs, train_cfg

PADS = [(3, 3, 3, 3), (1, 2, 0, 3), (0, 0, 1, 1), (2, 0, 2, 0)]


@pytest.mark.parametrize("pad", PADS)
def test_reflect_pad_gives_torchs_values_and_gradient(pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    ours, theirs = reflect_pad(x, pad), F.pad(x, pad, mode="reflect")
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    (a,), (b,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(theirs, x, g)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # the same sums, perhaps in another order


def nodes(t: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        names.add(type(n).__name__)
        stack += [f for f, _ in n.next_functions]
    return names


def test_generator_pads_leave_no_atomic_backward_under_deterministic_algorithms():
    """torch's ReflectionPad2d backward adds with atomics on CUDA (and refuses to run under
    deterministic algorithms there); off a CPU (meta here, CUDA in use) the generator's pads take
    the slice-and-flip form instead, and keep torch's kernel otherwise."""
    G = Generator(ngf=4, n_downsample=2, n_blocks=1).to("meta")
    x = torch.zeros(1, G.in_channels, 32, 32, device="meta")
    assert "ReflectionPad2DBackward0" in nodes(G(x)["AHD"]["image"])
    with deterministic_algorithms():
        assert "ReflectionPad2DBackward0" not in nodes(G(x)["AHD"]["image"])
        cpu = Generator(ngf=4, n_downsample=2, n_blocks=1)  # deterministic on a CPU already
        assert "ReflectionPad2DBackward0" in nodes(cpu(torch.zeros(1, cpu.in_channels, 32, 32))["AHE"]["mask"])
    assert any(isinstance(m, ReflectionPad2d) for m in G.modules())


def test_deterministic_algorithms_restore_torchs_switches():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            assert not torch.backends.cudnn.benchmark
        assert torch.is_deterministic_algorithms_warn_only_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def recording(monkeypatch, module, name: str) -> list[tuple[bool, bool]]:
    """Patch ``module.name`` (a step function) to note torch's switches at each call."""
    seen, real = [], getattr(module, name)

    def step(*args, **kw):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))
        return real(*args, **kw)

    monkeypatch.setattr(module, name, step)
    return seen


def test_training_steps_run_under_deterministic_algorithms_and_leave_torch_as_it_was(tmp_path, monkeypatch):
    seen = recording(monkeypatch, hybrid.train, "train_step")
    hybrid.train.train(Blobs(2), tmp_path / "ckpt", tmp_path / "work", MODEL, train_cfg(), AUG, max_steps=2)
    assert seen == [(True, False)] * 2
    assert not torch.are_deterministic_algorithms_enabled()


def test_flare_steps_run_under_deterministic_algorithms_too(tmp_path, monkeypatch):
    """AnomalyFactory's loop (Flare, and Blaze through the same train_af) as the train stage."""
    data, boot = make_results(tmp_path), save_af_checkpoint(tmp_path / "boot", "boot")
    seen = recording(monkeypatch, hybrid.stages.flare, "af_step")
    flare_run(data, boot, tmp_path / "flare", max_steps=2)
    assert seen == [(True, False)] * 2
    assert not torch.are_deterministic_algorithms_enabled()
