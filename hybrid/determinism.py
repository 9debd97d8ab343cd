"""Deterministic training on a GPU: the same seed gives the same weights, so a run resumed from
a checkpoint ends where the uninterrupted run would have, on a GPU as on a CPU.

Every kernel a CPU training step runs is deterministic already. On a GPU, by default, three
things are not: cuDNN may pick convolution algorithms that accumulate with atomic adds (and with
``cudnn.benchmark`` the pick itself is timed, so two processes can pick differently), the
backward of ``nn.ReflectionPad2d`` adds with atomics (the generator's pads then take
:func:`reflect_pad`'s form, :class:`ReflectionPad2d`), and cuBLAS needs a fixed workspace.
:func:`deterministic_algorithms` settles all three for the duration of a training run and puts
torch's global switches back afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.utils.deterministic
from torch import nn


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic algorithms on, ``cudnn.benchmark`` off, cuBLAS's workspace fixed
    (``CUBLAS_WORKSPACE_CONFIG``, if not set already); the previous switches are restored on exit.

    New tensors are not filled with NaN (torch's default under deterministic algorithms): nothing
    in training reads memory before writing it, and filling every new tensor costs bandwidth."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]


def reflect_pad(x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, padding, mode="reflect")`` (left, right, top, bottom) built from slices, flips
    and concatenations: the same values, and a backward without atomic adds (each gradient is a
    slice of the output's, summed by autograd in a fixed order)."""
    left, right, top, bottom = padding
    w, h = x.shape[-1], x.shape[-2]
    x = torch.cat([x[..., 1:left + 1].flip(-1), x, x[..., w - right - 1:w - 1].flip(-1)], -1)
    return torch.cat([x[..., 1:top + 1, :].flip(-2), x, x[..., h - bottom - 1:h - 1, :].flip(-2)], -2)


class ReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` (the same values, no parameters) whose gradient is deterministic:
    under deterministic algorithms, off a CPU, with a gradient to compute, it pads by
    :func:`reflect_pad` (torch's own backward on CUDA adds with atomics, and refuses to run under
    deterministic algorithms); otherwise by torch's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and x.device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
            return reflect_pad(x, self.padding)
        return super().forward(x)
