"""Durations in Prometheus' grammar, for flags and files alike: ``500ms``, ``90s``, ``5m``, ``1h30m``, ``7d``,
``2w``, ``1y``. A whole number per unit, units largest first and each at most once, as Prometheus'
``model.ParseDuration`` reads them (``1y`` is 365 days, ``1w`` 7 days); ``0`` alone is zero."""

from __future__ import annotations

import math
import re

UNITS = {"y": 365 * 86400.0, "w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = re.compile("".join(rf"(?:(?P<{u}>\d+){u})?" for u in UNITS))
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
HOW = "write a whole number per unit (ms s m h d w y), largest unit first, e.g. 500ms, 90s, 5m, 1h30m, 7d"


def parse_duration(value: object, *, unit_required: bool = False, bare_number_s: float = 1.0) -> float:
    """Seconds in ``value``: a Prometheus duration, or a number of ``bare_number_s`` units (seconds unless the
    setting says otherwise: retention counts days). ``unit_required``: a bare number written as text is
    refused (rule files, where ``for: 30`` is more likely a mistake than seconds); ``0`` is still zero."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a duration: it must be a finite number, 0 or more")
        return float(value) * bare_number_s
    text = value.strip() if isinstance(value, str) else ""
    if text == "0":
        return 0.0
    if _NUMBER.fullmatch(text):
        if unit_required:
            raise ValueError(f"{value!r} is not a duration: give it a unit; {HOW}")
        return float(text) * bare_number_s
    m = _DURATION.fullmatch(text)
    if text and m:
        return sum(int(n) * UNITS[u] for u, n in m.groupdict().items() if n is not None)
    if text.startswith("-"):
        raise ValueError(f"{value!r} is not a duration: it is negative")
    raise ValueError(f"{value!r} is not a duration: {HOW}")


def format_duration(seconds: float) -> str:
    """``seconds`` as a Prometheus duration, largest units first: 5400 is ``1h30m``, 0.05 is ``50ms``."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0"
    out = ""
    for unit, size in UNITS.items():
        n, ms = divmod(ms, round(size * 1000))
        out += f"{n}{unit}" if n else ""
    return out
