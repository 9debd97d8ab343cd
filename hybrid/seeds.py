"""One seed derivation for the whole project: a seed is a pure function of its parts.

Every random draw that must not depend on batch size, worker count or order (a training sample's
augmentation, a generated pair's manipulation, a baseline's category) takes its seed from here.
Parts are ints or strings (a string enters as its CRC-32, so a category name can be a part).
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(*parts: int | str, bits: int = 63) -> int:
    """A seed of ``bits`` (63 or 32) bits from ``parts`` via ``np.random.SeedSequence``."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    ss = np.random.SeedSequence(ints)
    if bits == 63:
        return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)
    if bits == 32:
        return int(ss.generate_state(1, dtype=np.uint32)[0])
    raise ValueError(f"derive_seed: bits must be 63 or 32, got {bits}")


def rng(*parts: int | str) -> np.random.Generator:
    """A numpy Generator seeded directly with ``parts`` (strings as their CRC-32)."""
    return np.random.default_rng([zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts])
