"""The agent's sampling loop: run every source, enrich what they yield, hand the snapshot to the sinks."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence

from gpufleet.agent.families import Family, Snapshot
from gpufleet.agent.pipeline import Enricher, Sink, Source
from gpufleet.core.metricspec import MetricSpec

log = logging.getLogger(__name__)

# Agent.sample()'s per-source series, one sample per source that ran.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_agent_source_success",
        "gauge",
        "",
        "1 if the source's last collection succeeded.",
        ("node", "source"),
    ),
    MetricSpec(
        "gpufleet_agent_source_duration_seconds",
        "gauge",
        "seconds",
        "Time the source's last collection took.",
        ("node", "source"),
    ),
)


__all__ = ["Agent", "Snapshot"]


class Agent:
    """Samples every source each ``interval`` seconds; a source that raises is reported, not fatal.

    Each source's output goes through the ``enrichers`` (when its series name devices) and the snapshot
    of all of them to every sink.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        node: str,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        sinks: Sequence[Sink] = (),
        enrichers: Sequence[Enricher] = (),
    ) -> None:
        self.sources = list(sources)
        self.node = node
        self.interval = interval
        self._clock = clock
        self._sinks = list(sinks)
        self._enrichers = list(enrichers)
        self._latest = Snapshot(0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.samples_taken = 0
        self._failed: set[str] = set()
        self._enrich_failed: set[int] = set()
        self._source_labels: dict[str, dict[str, str]] = {}  # one dict per source, as sinks key series by it

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    @property
    def latest(self) -> Snapshot:
        with self._lock:
            return self._latest

    def sample(self) -> Snapshot:
        ts = int(self._clock() * 1000)
        families: list[Family] = []
        success = Family(
            "gpufleet_agent_source_success", "gauge", "1 if the source's last collection succeeded."
        )
        duration = Family(
            "gpufleet_agent_source_duration_seconds", "gauge", "Time the source's last collection took."
        )
        for src in self.sources:
            t0 = time.perf_counter()
            collected: list[Family] = []
            try:
                collected = src.collect()
                ok = True
                if src.name in self._failed:
                    self._failed.discard(src.name)
                    log.info("source %s collects again", src.name)
            except Exception:
                ok = False
                if src.name not in self._failed:  # log once per outage, not once per second
                    self._failed.add(src.name)
                    log.exception("source %s failed; the other sources go on", src.name)
            labels = self._source_labels.get(src.name)
            if labels is None:
                labels = self._source_labels[src.name] = {"node": self.node, "source": src.name}
            success.add(labels, 1.0 if ok else 0.0)
            duration.add(labels, time.perf_counter() - t0)
            families.extend(self._enrich(collected) if src.names_devices else collected)
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

    def _enrich(self, families: list[Family]) -> list[Family]:
        for i, enricher in enumerate(self._enrichers):
            try:
                families = enricher.enrich(families)
            except Exception:  # a sample without pod labels beats no sample
                if i not in self._enrich_failed:
                    self._enrich_failed.add(i)
                    log.exception("enriching a sample failed; its series go out without those labels")
                continue
            self._enrich_failed.discard(i)
        return families

    def wake(self) -> None:
        """Sample now (an urgent event happened) instead of at the next tick."""
        self._wake.set()

    def run(self) -> None:
        # What exists now (modules, the field table, NVML handles, the sources' caches) lives as long as the
        # process. Frozen, it is left out of the cyclic collector's full passes, which the per-second samples
        # set off about once a minute: each walked all ~40,000 objects of the process (40 ms on a shared 2-core
        # VM, as much as the sampling of 8 simulated GPUs in that minute) and now walks what was made since.
        gc.collect()
        gc.freeze()
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
