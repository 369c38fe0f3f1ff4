"""Durations as people write them in flags and files: ``500ms``, ``30s``, ``5m``, ``24h``, ``7d``, ``2w``."""

from __future__ import annotations

import re
from typing import Any

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_duration(value: Any, *, unit_required: bool = False) -> float:
    """Seconds in ``value``: a number (seconds) or a number with a unit. ``unit_required``: a bare number
    written as text is refused (rule files, where ``for: 30`` is more likely a mistake than seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration: it is negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m or (unit_required and m.group(2) is None):
        raise ValueError(f"{value!r} is not a duration (write 30s, 5m, 24h or 7d)")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]
