"""How far long work has got, on one self-overwriting line of standard error, only while that is a terminal:
a pipe or a log file gets nothing (the work's own output and its summary line say what happened)."""

from __future__ import annotations

import io
import shutil
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO


class StatusLine:
    """Call it with a text to show (it is a ``progress`` callback); ``clear()`` or leaving the ``with`` block
    removes the line. At most one redraw per ``min_interval_s``, so callers may report as often as they like."""

    def __init__(
        self,
        prefix: str = "",
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        min_interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self._stream) if enabled is None else enabled
        self._prefix = prefix
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last = float("-inf")
        self._shown = False

    def __call__(self, text: str) -> None:
        now = self._clock()
        if not self.enabled or now - self._last < self._min_interval_s:
            return
        self._last = now
        width = shutil.get_terminal_size().columns - 1  # a wrapped line cannot be overwritten with \r
        self._stream.write("\r" + f"{self._prefix}{text}"[:width] + "\x1b[K")
        self._stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False
            self._last = float("-inf")

    def above(self, stream: TextIO) -> io.TextIOBase:
        """``stream`` for output that shares the terminal: each write first takes the status line away (the
        next report draws it again below)."""
        return _Above(self, stream)

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.clear()


class _Above(io.TextIOBase):
    def __init__(self, status: StatusLine, stream: TextIO) -> None:
        self._status = status
        self._stream = stream

    def write(self, s: str) -> int:
        self._status.clear()
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
