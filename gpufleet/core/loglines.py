"""Log lines that can repeat without end (a client refused on every request, a sender whose every batch is
refused) let through at most one a minute per key, with what was held back in between."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HeldBack:
    """What a line let through sums up: ``lines`` held back since the last line of its key, and ``amount``:
    the amounts of those and of this one (samples, series)."""

    lines: int
    amount: int

    def since_last(self, what: str) -> str:
        """`` (N more … since the last line)``, or nothing when none was held back."""
        return f" ({self.lines} more {what} since the last line)" if self.lines else ""


class LineLimit:
    """One line per key per ``every_s``: ``take`` answers a :class:`HeldBack` when the line may go out, else
    None (the line is counted, with its amount, for the next one)."""

    MAX_KEYS = 10_000  # past it, keys quiet for a whole period are forgotten

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[object, float] = {}
        self._held: dict[object, tuple[int, int]] = {}  # key -> (lines, amount) held back

    def take(self, key: object, amount: int = 0) -> HeldBack | None:
        now = self._clock()
        with self._lock:
            lines, held = self._held.pop(key, (0, 0))
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._held[key] = (lines + 1, held + amount)
                return None
            self._last[key] = now
            if len(self._last) > self.MAX_KEYS:
                self._last = {k: t for k, t in self._last.items() if now - t < self.every_s}
                self._held = {k: v for k, v in self._held.items() if k in self._last}
        return HeldBack(lines, held + amount)
