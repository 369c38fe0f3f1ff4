"""The seams of the agent's pipeline: sources → enrich → sinks, and the agent's own metrics.

::

    sources/ (one table) ──▶ enrich (who holds each GPU) ──▶ sinks (/metrics, push)

A source yields the families of one sample; an enricher adds labels no source can know by itself (the
pod a GPU was given to); a sink takes the enriched snapshot. Components that keep counters of their
own (the pusher, the spool, the pod-resources client, the NVML gateway) expose them through
``collect()``, in the style of prometheus-client's custom collectors, and ``/metrics`` shows their union.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gpufleet.agent.families import Family, Snapshot


class Source(Protocol):
    """One metric source (agent/sources/<name>.py), listed in agent/sources/__init__.py."""

    @property
    def name(self) -> str: ...

    @property
    def names_devices(self) -> bool:
        """True when its series name GPUs by ``uuid`` (MIG instances by ``mig_uuid``): the enrich stage then
        adds who holds each device. A source that labels its own pods (inference) says False."""
        ...

    def start(self) -> None: ...

    def collect(self) -> list[Family]:
        """The families of one sample. May raise: the agent reports the source as failed and goes on."""
        ...

    def close(self) -> None: ...


class Enricher(Protocol):
    """A stage between sources and sinks: returns the families with labels added, never fewer series."""

    def enrich(self, families: list[Family]) -> list[Family]: ...


class Sink(Protocol):
    """An output of the pipeline: takes every enriched snapshot (the pusher, the /metrics exposition)."""

    def __call__(self, snapshot: Snapshot, /) -> None: ...


class MetricsCollector(Protocol):
    """A component's own metrics, read at scrape time; label sets without ``node`` (the agent adds it)."""

    def collect(self) -> list[Family]: ...


class OwnMetrics:
    """The agent's own metrics: the union of its components' ``collect()``, every series labelled with the node."""

    def __init__(self, node: str, components: Sequence[MetricsCollector]) -> None:
        self._node = node
        self._components = list(components)

    def collect(self) -> list[Family]:
        out: list[Family] = []
        for component in self._components:
            for fam in component.collect():
                out.append(
                    Family(
                        fam.name,
                        fam.kind,
                        fam.help,
                        [({"node": self._node, **labels}, value) for labels, value in fam.samples],
                    )
                )
        return out


__all__ = ["Enricher", "MetricsCollector", "OwnMetrics", "Sink", "Source"]
