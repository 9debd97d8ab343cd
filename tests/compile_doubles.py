"""Stand-ins for ``torch.compile`` (monkeypatched in): the stages' compile switches are tested
without compiling (that takes minutes on the CI's two cores)."""

from __future__ import annotations

import torch


class Broken:
    """What ``torch.compile`` returns where it cannot build kernels: the module's attributes, and
    a call that fails as a missing C++ compiler makes it fail."""

    def __init__(self, module, **kwargs):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("no C++ compiler here")


class Recorder:
    """A ``torch.compile`` stand-in that runs the module eagerly and records, per call, the
    module's class and the batch size (the first tensor argument's length)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, module, **kwargs):
        recorder = self

        class Compiled:
            def __getattr__(self, name):
                return getattr(module, name)

            def __call__(self, *args, **kw):
                x = next(v for v in (*args, *kw.values()) if isinstance(v, torch.Tensor))
                recorder.calls.append((type(module).__name__, len(x)))
                return module(*args, **kw)

        return Compiled()
