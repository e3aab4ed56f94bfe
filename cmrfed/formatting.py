"""Numbers as report text, written the same way in every table cmrfed prints or writes.

An undefined number (NaN, None: a metric that cannot be measured) is an em dash, never "nan";
p-values below 0.001 read "<0.001"; byte counts in binary units.
"""

from __future__ import annotations

import math
from typing import Any

UNDEFINED = "—"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def num(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals."""
    return f"{value:.{digits}f}" if _finite(value) else UNDEFINED


def p_value(value: Any) -> str:
    if not _finite(value):
        return UNDEFINED
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def ci(low: Any, high: Any) -> str:
    """A confidence interval, ``[low, high]``."""
    return f"[{num(low)}, {num(high)}]"


def size(value: Any) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    if not _finite(value):
        return UNDEFINED
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"
