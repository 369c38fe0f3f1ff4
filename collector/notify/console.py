"""Console notifier: one line per notification on standard output (what `gpufleet up` uses)."""

from __future__ import annotations

import sys
from typing import TextIO

from collector.rules.engine import Notification


class ConsoleNotifier:
    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def send(self, n: Notification, previous: tuple[str, str] | None) -> tuple[str, str] | None:
        stream = self._stream or sys.stdout
        value = "" if n.value is None else f" value={n.value:g}"
        print(f"ALERT {n.text}{value}", file=stream, flush=True)
        return None
