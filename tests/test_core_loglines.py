"""A log line per key a minute: what is held back is counted, with its amounts, in the next line let through."""

from __future__ import annotations

from types import SimpleNamespace

from gpufleet.core.loglines import HeldBack, LineLimit


def test_one_line_a_key_a_minute_and_the_next_one_sums_up_what_was_held_back():
    clock = SimpleNamespace(t=0.0)
    lines = LineLimit(60.0, clock=lambda: clock.t)
    assert lines.take("east", 2000) == HeldBack(0, 2000)
    assert [lines.take("east", 2000) for _ in range(3)] == [None] * 3
    assert lines.take("west", 5) == HeldBack(0, 5)  # each key on its own
    clock.t = 59.9
    assert lines.take("east", 1) is None
    clock.t = 60.0
    held = lines.take("east", 2000)
    assert held == HeldBack(4, 8001) and held.since_last("refused") == " (4 more refused since the last line)"
    clock.t = 200.0
    assert lines.take("east").since_last("refused") == ""
