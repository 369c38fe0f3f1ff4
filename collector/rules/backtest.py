"""Replay a recorded trace through the rule engine in event time, exactly as it runs live.

The trace is OpenMetrics text with a timestamp on every sample (what ``promtool tsdb create-blocks-from
openmetrics`` reads): families one after another, each series' samples in time order, ``# EOF`` at the end.
The replay ticks the engine every ``step`` seconds of trace time, feeding it every sample up to that tick;
each notification the engine would send becomes one JSON line: ``alert``, ``state``, ``at``, ``labels``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from gpufleet.collector.rules.contract import Notifier
from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import RulePack


class TraceError(ValueError):
    pass


class Writer(Protocol):
    """Where notifications go: a file, standard output, or one that shares a terminal with a status line."""

    def write(self, s: str, /) -> int: ...


def read_trace(fd: IO[str], where: str = "trace") -> list[tuple[int, dict[str, str], float]]:
    """Every sample as (ts_ms, labels with __name__, value), sorted by time."""
    from prometheus_client.openmetrics.parser import text_fd_to_metric_families
    from prometheus_client.samples import Timestamp

    out: list[tuple[int, dict[str, str], float]] = []
    missing = 0
    try:
        for family in text_fd_to_metric_families(fd):
            for s in family.samples:
                if s.timestamp is None:
                    missing += 1
                    continue
                ts = s.timestamp
                ms = (
                    ts.sec * 1000 + ts.nsec // 1_000_000
                    if isinstance(ts, Timestamp)
                    else int(float(ts) * 1000)
                )
                out.append((ms, {"__name__": s.name, **s.labels}, float(s.value)))
    except ValueError as exc:
        raise TraceError(
            f"{where} is not valid OpenMetrics text: {exc}. Each series' samples must be together "
            "and in time order, and the file must end with '# EOF'"
        ) from None
    if missing:
        raise TraceError(
            f"{where}: {missing} sample(s) have no timestamp; a backtest trace needs one on every "
            "sample (name{{labels}} value unix_seconds)"
        )
    out.sort(key=lambda x: x[0])
    return out


def infer_step_ms(samples: list[tuple[int, dict[str, str], float]]) -> int:
    """The trace's sampling interval: the smallest gap between two samples of one series."""
    last: dict[tuple, int] = {}
    best = 0
    for ts, labels, _ in samples:
        key = tuple(sorted(labels.items()))
        if key in last and ts > last[key] and (best == 0 or ts - last[key] < best):
            best = ts - last[key]
        last[key] = ts
    return best or 1000


def replay(
    samples: list[tuple[int, dict[str, str], float]],
    pack: RulePack,
    *,
    step_ms: int | None = None,
    state: MemoryState | None = None,
    notifiers: Iterable[Notifier] = (),
    progress: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Feed the samples to the engine, tick by tick; yield one record per alert in each notification.
    ``progress`` hears how far through the trace the replay is, once per percent."""
    if not samples:
        return
    step_ms = step_ms or infer_step_ms(samples)
    view = MemoryView()
    engine = Engine(pack, view, state or MemoryState(), list(notifiers))
    i, n = 0, len(samples)
    t = samples[0][0]
    start, end = t, samples[-1][0]
    told_pct = -1
    while t <= end + step_ms:
        pct = min(100, (t - start) * 100 // max(end - start, 1))
        if progress is not None and pct != told_pct:
            told_pct = pct
            progress(f"replayed {_clock(min(t, end) - start)} of {_clock(end - start)} of trace ({pct}%)")
        while i < n and samples[i][0] <= t:
            ts, labels, value = samples[i]
            view.observe(labels, ts, value)
            i += 1
        for g in engine.tick(t):
            told = list(g.firing) if g.repeat else g.changes
            for a in told:
                yield {
                    "alert": a.rule,
                    "state": a.state,
                    "at": t / 1000,
                    "labels": a.labels,
                    "value": a.value,
                    "group": g.key,
                    **({"repeat": True} if g.repeat else {}),
                }
        t += step_ms


def _clock(ms: int) -> str:
    s = ms // 1000
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def backtest_file(
    path: Path,
    pack: RulePack,
    out: Writer,
    *,
    step_s: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> int:
    if progress is not None:
        progress(f"reading {path}")
    with open(path) as fd:
        samples = read_trace(fd, str(path))
    count = 0
    for rec in replay(samples, pack, step_ms=int(step_s * 1000) if step_s else None, progress=progress):
        out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        count += 1
    return count
