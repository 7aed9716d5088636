"""Seeds derived from a run's seeds and string tags, so that every stage draws from its own stream."""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, *tags: str) -> int:
    """A 63-bit seed determined by ``seed`` and string tags (stable across runs and platforms)."""
    entropy = [seed] + [zlib.crc32(tag.encode()) for tag in tags]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, *tags: str) -> torch.Generator:
    """A CPU torch.Generator seeded by ``derive_seed(seed, *tags)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))
