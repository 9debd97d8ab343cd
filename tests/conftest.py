"""Shared test helpers: where ../shared is, and the deterministic "recipe" weights of its fixtures.

Set HYBRID_SHARED_DIR to the read-only shared folder (``.ci/run`` does, when it exists) and
HYBRID_MODEL_DIR to its models/ folder; tests that need them skip with a reason otherwise.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch


def shared_path(*parts: str) -> Path:
    """A path inside $HYBRID_SHARED_DIR, or skip the test saying why."""
    root = os.environ.get("HYBRID_SHARED_DIR")
    if not root:
        pytest.skip("HYBRID_SHARED_DIR is not set (point it at the shared reference folder)")
    p = Path(root, *parts)
    if not p.exists():
        pytest.skip(f"{p} does not exist")
    return p


def model_path(*parts: str) -> Path:
    """A real weights file under $HYBRID_MODEL_DIR, or skip the test saying why."""
    root = os.environ.get("HYBRID_MODEL_DIR")
    if not root:
        pytest.skip("HYBRID_MODEL_DIR is not set (real pretrained weights are not available)")
    p = Path(root, *parts)
    if not p.exists():
        pytest.skip(f"{p} does not exist")
    return p


def recipe_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixture README's deterministic weight for one upstream state_dict key."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.int64)
    if key.endswith("running_var"):
        a = 1 + 0.1 * np.abs(rng.standard_normal(shape))
    elif key.endswith("running_mean"):
        a = 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2:
        a = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    elif key.endswith("bias"):
        a = 0.01 * rng.standard_normal(shape)
    else:
        a = 1 + 0.1 * rng.standard_normal(shape)
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def recipe_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Recipe weights for every key of an upstream layout, given as {key: shape}."""
    return {k: recipe_tensor(k, tuple(s)) for k, s in shapes.items()}


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, above all when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def callers_opencv_threads() -> int:
    """The caller's OpenCV thread count set to 3 (not 1, whatever the machine's cores) for a stage
    that must run its OpenCV on one thread and give this count back; restored afterwards."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    yield 3
    cv2.setNumThreads(before)


@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    """An empty model dir that the model store looks in first (HYBRID_MODEL_DIR), user cache off."""
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setenv("HYBRID_MODEL_DIR", str(d))
    monkeypatch.setenv("HYBRID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HYBRID_OFFLINE", "1")
    return d
