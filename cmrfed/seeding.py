"""Every random draw's seed, derived from the run seed and what the draw is for.

A run has one seed; each use of randomness gets its own stream derived from it and from the
coordinates of that use (round, site, step, layer, ...), never from global RNG state or from how
many draws came before. So a resumed run, a Flower run and an uninterrupted one draw the same
numbers, and adding a draw somewhere does not shift the others.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from the run seed and integer coordinates (round, client, ...), independent of
    everything else, so resuming a run reproduces the same shuffles."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> 1)


def seeded_generator(seed: int, *labels: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``labels`` only (a sha256 of both).

    Deriving one stream per labelled use keeps each random draw independent of the order and the
    number of the others, so e.g. a layer's LoRA A depends only on (seed, layer, adapter).
    """
    text = "\x1f".join((str(int(seed)), *labels)).encode("utf-8")
    derived = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(derived)
