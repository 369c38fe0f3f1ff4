"""Host source: CPU, memory and load of the node, through psutil."""

from __future__ import annotations

import os
from typing import Protocol

from gpufleet.agent.families import Family
from gpufleet.core.metricspec import MetricSpec


class VirtualMemory(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def available(self) -> int: ...


class Psutil(Protocol):
    """The part of the psutil module the source reads; tests pass a stand-in."""

    def cpu_percent(self, interval: float | None = None) -> float: ...

    def virtual_memory(self) -> VirtualMemory: ...

    def cpu_count(self) -> int | None: ...


class HostSource:
    name = "host"
    names_devices = False

    def __init__(self, node: str, *, cluster: str | None = None, psutil_module: Psutil | None = None) -> None:
        if psutil_module is None:
            import psutil

            psutil_module = psutil
        self._ps: Psutil = psutil_module
        self._labels = {"node": node, **({"cluster": cluster} if cluster else {})}
        self._ps.cpu_percent(interval=None)  # prime: the first call has no period to measure

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def collect(self) -> list[Family]:
        ps, labels = self._ps, self._labels
        cpu = Family(
            "gpufleet_host_cpu_utilization_ratio",
            "gauge",
            "Share of all CPU cores busy since the last sample.",
        )
        cpu.add(labels, ps.cpu_percent(interval=None) / 100.0)
        vm = ps.virtual_memory()
        used = Family(
            "gpufleet_host_memory_used_bytes", "gauge", "Host memory in use (total minus available), bytes."
        )
        used.add(labels, vm.total - vm.available)
        total = Family("gpufleet_host_memory_total_bytes", "gauge", "Host memory in total, bytes.")
        total.add(labels, vm.total)
        load = Family("gpufleet_host_load1", "gauge", "One-minute load average.")
        load.add(labels, os.getloadavg()[0])
        cores = Family("gpufleet_host_cpu_cores", "gauge", "Logical CPU cores.")
        cores.add(labels, ps.cpu_count() or 0)
        return [cpu, used, total, load, cores]


_HOST_LABELS = ("cluster", "node")
# The host source's series, as collect() emits them (tests compare the two).
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_host_cpu_utilization_ratio",
        "gauge",
        "ratio",
        "Share of all CPU cores busy since the last sample.",
        _HOST_LABELS,
    ),
    MetricSpec(
        "gpufleet_host_memory_used_bytes",
        "gauge",
        "bytes",
        "Host memory in use (total minus available), bytes.",
        _HOST_LABELS,
    ),
    MetricSpec(
        "gpufleet_host_memory_total_bytes", "gauge", "bytes", "Host memory in total, bytes.", _HOST_LABELS
    ),
    MetricSpec("gpufleet_host_load1", "gauge", "", "One-minute load average.", _HOST_LABELS),
    MetricSpec("gpufleet_host_cpu_cores", "gauge", "", "Logical CPU cores.", _HOST_LABELS),
)
