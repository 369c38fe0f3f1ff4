"""The pipeline's outputs: the latest snapshot, which ``/metrics`` serves, and the pusher's own metrics.

The pusher is a sink as it is (``Pusher.__call__`` takes a snapshot); :class:`PushMetrics` reads its
counters through its public attributes.
"""

from __future__ import annotations

import threading

from gpufleet.agent.families import Family, Snapshot
from gpufleet.agent.push import Pusher
from gpufleet.core.metricspec import MetricSpec


class LatestSnapshot:
    """Sink that keeps the newest enriched snapshot for the exposition to serve at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest = Snapshot(0)

    def __call__(self, snapshot: Snapshot, /) -> None:
        with self._lock:
            self._latest = snapshot

    @property
    def latest(self) -> Snapshot:
        with self._lock:
            return self._latest


class PushMetrics:
    """The pusher's own metrics (the agent adds ``node``)."""

    def __init__(self, pusher: Pusher) -> None:
        self._pusher = pusher

    def collect(self) -> list[Family]:
        p = self._pusher
        out = []
        for name, kind, help_text, value in (
            (
                "gpufleet_agent_push_samples_total",
                "counter",
                "Samples the collector acknowledged.",
                p.sent_samples,
            ),
            (
                "gpufleet_agent_push_failures_total",
                "counter",
                "Pushes that failed and were kept for retry.",
                p.failed_pushes,
            ),
            (
                "gpufleet_agent_push_pending_samples",
                "gauge",
                "Samples waiting to be pushed.",
                p.pending_samples(),
            ),
        ):
            f = Family(name, kind, help_text)
            f.add({}, value)
            out.append(f)
        dropped = Family(
            "gpufleet_agent_push_dropped_samples_total",
            "counter",
            "Samples dropped, by reason: refused by the collector for good (a 4xx other than 408 and 429), "
            "or over the pending limit.",
        )
        for reason, n in sorted(p.dropped_samples.items()):
            dropped.add({"reason": reason}, n)
        out.append(dropped)
        return out


# PushMetrics' series (the agent adds ``node``); they exist when the agent pushes to a collector.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_agent_push_samples_total",
        "counter",
        "",
        "Samples the collector acknowledged.",
        ("node",),
        "when pushing",
    ),
    MetricSpec(
        "gpufleet_agent_push_failures_total",
        "counter",
        "",
        "Pushes that failed and were kept for retry.",
        ("node",),
        "when pushing",
    ),
    MetricSpec(
        "gpufleet_agent_push_dropped_samples_total",
        "counter",
        "",
        "Samples dropped, by reason: refused by the collector for good (a 4xx other than 408 and 429), "
        "or over the pending limit.",
        ("node", "reason"),
        "when pushing",
    ),
    MetricSpec(
        "gpufleet_agent_push_pending_samples",
        "gauge",
        "",
        "Samples waiting to be pushed.",
        ("node",),
        "when pushing",
    ),
)


__all__ = ["LatestSnapshot", "PushMetrics"]
