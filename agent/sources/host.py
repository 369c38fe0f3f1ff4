"""Host source: CPU, memory and load of the node.

On Linux it reads ``/proc/stat``, ``/proc/meminfo`` and ``/proc/loadavg`` itself, through files it keeps
open, each read from its start (the kernel writes the text anew for every read). A sample every second is
then three ``pread`` calls, without an open and a close for each. Opening and parsing them anew through psutil each second took about a fifth of the on-CPU
samples of an agent with no GPU source (the py-spy profile of bench/agent_cost.py). Where ``/proc`` is not
there (a laptop running ``--simulate``) it asks psutil.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gpufleet.agent.families import Family
from gpufleet.core.metricspec import MetricSpec

# Logical cores rarely change (hotplug); they are counted again at most this often, not every sample.
CORES_EVERY_S = 60.0


class VirtualMemory(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def available(self) -> int: ...


class Psutil(Protocol):
    """The part of the psutil module the source reads where there is no ``/proc``."""

    def cpu_percent(self, interval: float | None = None) -> float: ...

    def virtual_memory(self) -> VirtualMemory: ...

    def cpu_count(self) -> int | None: ...


class ProcFile:
    """A ``/proc`` file kept open and read from its start on each :meth:`read` (the kernel writes it anew)."""

    __slots__ = ("_fd", "_size", "path")

    def __init__(self, path: Path, size: int = 8192) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = size

    def read(self) -> bytes:
        if self._fd < 0:
            raise OSError(f"{self.path} is closed")
        data = os.pread(self._fd, self._size, 0)
        while len(data) == self._size:  # larger than the last read: grow once and read whole
            self._size *= 2
            data = os.pread(self._fd, self._size, 0)
        return data

    def first_line(self) -> bytes:
        """The first line alone (``/proc/stat``'s total over all cores): the kernel still writes the whole
        text, but only its start is copied and split."""
        if self._fd < 0:
            raise OSError(f"{self.path} is closed")
        data = os.pread(self._fd, 256, 0)
        return data.split(b"\n", 1)[0]

    def close(self) -> None:
        """Close once; later calls do nothing, so a number the process reuses is never closed by mistake."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class ProcStats:
    """CPU busy share since the last read, memory and load, from ``<proc_root>/{stat,meminfo,loadavg}``."""

    def __init__(self, proc_root: Path) -> None:
        opened: list[ProcFile] = []
        self._last: list[int] | None = None
        self._ratio = 0.0
        try:
            for name in ("stat", "meminfo", "loadavg"):
                opened.append(ProcFile(proc_root / name))
            self._stat, self._meminfo, self._loadavg = opened
            self.cpu_busy_ratio()  # prime: the first call has no period to measure
            self.memory()
            self.load1()
        except (OSError, ValueError, IndexError):  # not the /proc it should be: the caller asks psutil
            for f in opened:
                f.close()
            raise

    def cpu_busy_ratio(self) -> float:
        """The share of all cores' time since the last call that was neither idle nor waiting on I/O (as
        ``psutil.cpu_percent`` counts it); guest time is inside user time, so it is not added again."""
        # cpu  user nice system idle iowait irq softirq steal [guest guest_nice]
        line = self._stat.first_line().split()
        if len(line) < 6 or line[0] != b"cpu":
            raise ValueError(f"{self._stat.path} does not start with the kernel's cpu line")
        ticks = [int(x) for x in line[1:9]]
        last = self._last
        if last is None:
            self._last = ticks
            return 0.0
        # iowait may go backwards (proc(5)): each field's change counts from 0, as psutil counts it
        deltas = [max(now - before, 0) for now, before in zip(ticks, last, strict=False)]
        total = sum(deltas)
        if total == 0:  # under a tick since the last read (a sample an XID woke early): the last share
            return self._ratio
        self._last = ticks
        self._ratio = min(max(1.0 - (deltas[3] + deltas[4]) / total, 0.0), 1.0)
        return self._ratio

    def memory(self) -> tuple[int, int]:
        """(total, available) bytes; without MemAvailable (kernels before 3.14) free + buffers + cached."""
        kb: dict[bytes, int] = {}
        for line in self._meminfo.read().splitlines():
            key, _, rest = line.partition(b":")
            if key in _MEMINFO_KEYS:
                kb[key] = int(rest.split()[0])
        total = kb.get(b"MemTotal", 0)
        available = kb.get(b"MemAvailable")
        if available is None:
            available = kb.get(b"MemFree", 0) + kb.get(b"Buffers", 0) + kb.get(b"Cached", 0)
        return total * 1024, available * 1024

    def load1(self) -> float:
        return float(self._loadavg.read().split(None, 1)[0])

    def close(self) -> None:
        for f in (self._stat, self._meminfo, self._loadavg):
            f.close()


_MEMINFO_KEYS = frozenset((b"MemTotal", b"MemAvailable", b"MemFree", b"Buffers", b"Cached"))


class HostSource:
    name = "host"
    names_devices = False

    def __init__(
        self,
        node: str,
        *,
        cluster: str | None = None,
        proc_root: str | Path = "/proc",
        psutil_module: Psutil | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._labels = {"node": node, **({"cluster": cluster} if cluster else {})}
        self._clock = clock
        self._proc: ProcStats | None = None
        self._ps: Psutil | None = psutil_module
        if psutil_module is None:
            try:
                self._proc = ProcStats(Path(proc_root))
            except (OSError, ValueError, IndexError):  # no /proc (not Linux): psutil knows the platform's way
                import psutil

                self._ps = psutil
        if self._ps is not None:
            self._ps.cpu_percent(interval=None)  # prime, as above
        self._cores = 0
        self._cores_at: float | None = None
        self._closed = False

    def start(self) -> None:
        return None

    def close(self) -> None:
        self._closed = (
            True  # a sample already under way may still read: it finds the files closed, not reused
        )
        if self._proc is not None:
            self._proc.close()

    def _core_count(self) -> int:
        now = self._clock()
        if self._cores_at is None or now - self._cores_at >= CORES_EVERY_S:
            self._cores = (self._ps.cpu_count() if self._ps is not None else os.cpu_count()) or 0
            self._cores_at = now
        return self._cores

    def collect(self) -> list[Family]:
        if self._closed:
            return []
        if self._proc is not None:
            busy = self._proc.cpu_busy_ratio()
            total, available = self._proc.memory()
            load1 = self._proc.load1()
        else:
            assert self._ps is not None
            busy = self._ps.cpu_percent(interval=None) / 100.0
            vm = self._ps.virtual_memory()
            total, available = vm.total, vm.available
            load1 = os.getloadavg()[0]
        labels = self._labels
        values = (busy, total - available, total, load1, self._core_count())
        return [
            Family(spec.name, spec.kind, spec.help, [(labels, float(value))])
            for spec, value in zip(METRICS, values, strict=True)
        ]


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
