"""The agent's sampling loop: run every source, keep the latest snapshot, hand it to the outputs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.agent.families import Family

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Snapshot:
    timestamp_ms: int
    families: list[Family] = field(default_factory=list)


class Agent:
    """Samples every source each ``interval`` seconds; a source that raises is reported, not fatal."""

    def __init__(self, sources: Sequence[Any], *, node: str, interval: float = 1.0,
                 clock: Callable[[], float] = time.time, sinks: Sequence[Callable[[Snapshot], None]] = ()) -> None:
        self.sources = list(sources)
        self.node = node
        self.interval = interval
        self._clock = clock
        self._sinks = list(sinks)
        self._latest = Snapshot(0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.samples_taken = 0
        self._failed: set[str] = set()

    def add_sink(self, sink: Callable[[Snapshot], None]) -> None:
        self._sinks.append(sink)

    @property
    def latest(self) -> Snapshot:
        with self._lock:
            return self._latest

    def sample(self) -> Snapshot:
        ts = int(self._clock() * 1000)
        families: list[Family] = []
        success = Family("gpufleet_agent_source_success", "gauge", "1 if the source's last collection succeeded.")
        duration = Family("gpufleet_agent_source_duration_seconds", "gauge", "Time the source's last collection took.")
        for src in self.sources:
            t0 = time.perf_counter()
            try:
                families.extend(src.collect())
                ok = True
                if src.name in self._failed:
                    self._failed.discard(src.name)
                    log.info("source %s collects again", src.name)
            except Exception:
                ok = False
                if src.name not in self._failed:  # log once per outage, not once per second
                    self._failed.add(src.name)
                    log.exception("source %s failed; the other sources go on", src.name)
            labels = {"node": self.node, "source": src.name}
            success.add(labels, 1.0 if ok else 0.0)
            duration.add(labels, time.perf_counter() - t0)
        families += [success, duration]
        snap = Snapshot(ts, families)
        with self._lock:
            self._latest = snap
        self.samples_taken += 1
        for sink in self._sinks:
            try:
                sink(snap)
            except Exception:
                log.exception("output failed to take a sample")
        return snap

    def wake(self) -> None:
        """Sample now (an urgent event happened) instead of at the next tick."""
        self._wake.set()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow source): skip ticks instead of bursting
                next_at = time.monotonic()
                delay = 0
            if self._wake.wait(delay):
                self._wake.clear()
                next_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for src in self.sources:
            try:
                src.close()
            except Exception:
                log.exception("source %s failed to close", src.name)
