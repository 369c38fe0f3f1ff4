"""Console notifier: one line per alert that fires or resolves, on standard output (what `gpufleet up` uses)."""

from __future__ import annotations

import sys
from typing import TextIO

from gpufleet.collector.rules.contract import Delivery
from gpufleet.collector.rules.dispatch import GroupNotification


class ConsoleNotifier:
    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def send(self, g: GroupNotification, /) -> Delivery:
        stream = self._stream or sys.stdout
        told = g.changes if not g.repeat else list(g.firing)
        for n in told:
            value = "" if n.value is None else f" value={n.value:.4g}"
            again = " (still firing)" if g.repeat else ""
            print(f"ALERT {n.text}{value}{again}", file=stream, flush=True)
        return Delivery()
