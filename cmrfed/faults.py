"""Deterministic fault injection, so crash-safety is proved at exact points rather than with sleeps.

``CMRFED_FAULT="point[:n][,point[:n]...]"`` makes the process kill itself with SIGKILL the n-th
time (default: the first) it reaches the named point. Unset, which is the normal case, every
point is a no-op costing one environment lookup. The points sit where a crash is hardest to
recover from (mid-training, between a log line and its checkpoint, inside an atomic write, during
the final writes); tests use them to show that ``--resume`` ends exactly where an uninterrupted
run ends. SIGKILL, not an exception: nothing (no ``finally``, no atexit) may run, as in a real
``kill -9`` or power loss.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CMRFED_FAULT"

_hits: Counter[str] = Counter()


def _targets(spec: str) -> dict[str, int]:
    """``"a:2,b"`` -> ``{"a": 2, "b": 1}``."""
    targets = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition(":")
        targets[name] = int(count) if count else 1
    return targets


def fault_point(name: str) -> None:
    """Kill this process here if ``CMRFED_FAULT`` names this point and its count is reached."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted = _targets(spec).get(name)
    if wanted is None:
        return
    _hits[name] += 1
    if _hits[name] == wanted:
        os.kill(os.getpid(), signal.SIGKILL)
