"""A bounded on-disk spool of remote-write batches the collector could not take yet.

One file per batch, written atomically (temporary file, fsync, rename, fsync of the folder), so an agent
killed at any moment leaves either the whole batch or none of it, and a restarted agent replays what is
there. File names sort in replay order: urgent batches (an XID, a GPU lost) first, then the rest oldest
first::

    <priority>-<sequence>-<created_ms>-<samples>.batch      priority 0 = urgent, 1 = normal

Size and age are bounded; what must be dropped to stay within them (oldest normal batches first) is
counted by reason and logged, never lost in silence.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpufleet.agent.families import Family
from gpufleet.core.durations import parse_duration
from gpufleet.core.metricspec import MetricSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MAX_AGE_S = 24 * 3600.0
_NAME = re.compile(r"^([01])-(\d{20})-(\d+)-(\d+)\.batch$")


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    path: Path
    urgent: bool
    seq: int
    created_ms: int
    samples: int
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


class SpoolError(OSError):
    """The spool folder cannot be used (missing rights, read-only file system)."""


class Spool:
    """Batches waiting for the collector, on disk. Thread-safe."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
        fsync: bool = True,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(
                f"cannot use spool folder {self.dir} ({exc.strerror or exc}); give the agent a "
                "writable folder with --spool-dir (GPUFLEET_SPOOL_DIR)"
            ) from None
        for stale in self.dir.glob(
            "*.tmp"
        ):  # a write cut short by a crash: never renamed, so never acknowledged
            stale.unlink(missing_ok=True)
        self._entries: dict[str, SpoolEntry] = {}
        for p in self.dir.iterdir():
            e = self._parse(p)
            if e is not None:
                self._entries[p.name] = e
        self._seq = max((e.seq for e in self._entries.values()), default=0)
        self.dropped_samples: dict[str, int] = {"size": 0, "age": 0, "refused": 0}
        self.dropped_batches: dict[str, int] = {"size": 0, "age": 0, "refused": 0}
        if self._entries:
            log.info(
                "spool %s holds %d batches (%d samples) from before; replaying them first",
                self.dir,
                len(self._entries),
                self.samples,
            )

    @staticmethod
    def _parse(p: Path) -> SpoolEntry | None:
        m = _NAME.match(p.name)
        if not m:
            return None
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return None
        return SpoolEntry(p, m.group(1) == "0", int(m.group(2)), int(m.group(3)), int(m.group(4)), size)

    # ---- state -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    @property
    def samples(self) -> int:
        with self._lock:
            return sum(e.samples for e in self._entries.values())

    def entries(self) -> list[SpoolEntry]:
        """Every batch in replay order: urgent first, then oldest first."""
        with self._lock:
            return [self._entries[k] for k in sorted(self._entries)]

    def collect(self) -> list[Family]:
        """The spool's own metrics (the agent adds ``node``)."""
        out = []
        for name, help_text, value in (
            ("gpufleet_agent_spool_bytes", "Bytes of batches waiting in the on-disk spool.", self.bytes),
            ("gpufleet_agent_spool_batches", "Batches waiting in the on-disk spool.", len(self)),
            ("gpufleet_agent_spool_samples", "Samples waiting in the on-disk spool.", self.samples),
        ):
            f = Family(name, "gauge", help_text)
            f.add({}, value)
            out.append(f)
        dropped = Family(
            "gpufleet_agent_spool_dropped_samples_total",
            "counter",
            "Samples the spool dropped, by reason: size and age limits, or refused by the collector.",
        )
        with self._lock:
            by_reason = sorted(self.dropped_samples.items())
        for reason, n in by_reason:
            dropped.add({"reason": reason}, n)
        out.append(dropped)
        return out

    # ---- changes -----------------------------------------------------------------------------------
    def put(self, body: builtins.bytes, samples: int, urgent: bool = False) -> SpoolEntry:
        """Write one batch durably; then trim to the size limit (oldest normal batches go first)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        now_ms = int(self._clock() * 1000)
        name = f"{0 if urgent else 1}-{seq:020d}-{now_ms}-{samples}.batch"
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if self._fsync:
            self._sync_dir()
        entry = SpoolEntry(final, urgent, seq, now_ms, samples, len(body))
        with self._lock:
            self._entries[name] = entry
        self._trim_size()
        return entry

    def remove(self, entry: SpoolEntry, *, refused: bool = False) -> None:
        """Forget a batch: the collector acknowledged it, or (``refused``) will never take it."""
        with self._lock:
            self._entries.pop(entry.path.name, None)
        entry.path.unlink(missing_ok=True)
        if refused:
            self._count_drop("refused", entry)

    def expire(self) -> int:
        """Drop batches older than the age limit; returns how many samples went."""
        cutoff = (self._clock() - self.max_age_s) * 1000
        with self._lock:
            old = [e for e in self._entries.values() if e.created_ms < cutoff]
        for e in old:
            self._drop(e, "age")
        if old:
            log.error(
                "spool %s: dropped %d batches (%d samples) older than %gs (--spool-max-age); the collector "
                "was unreachable longer than the spool keeps data",
                self.dir,
                len(old),
                sum(e.samples for e in old),
                self.max_age_s,
            )
        return sum(e.samples for e in old)

    def _trim_size(self) -> None:
        dropped: list[SpoolEntry] = []
        with self._lock:
            total = sum(e.size for e in self._entries.values())
            if total <= self.max_bytes:
                return
            # Oldest normal batches go first; urgent ones only when nothing else is left.
            order = sorted(self._entries.values(), key=lambda e: (e.urgent, e.seq))
            for e in order:
                if total <= self.max_bytes or len(self._entries) - len(dropped) <= 1:
                    break
                dropped.append(e)
                total -= e.size
        for e in dropped:
            self._drop(e, "size")
        if dropped:
            log.error(
                "spool %s is over its %d-byte limit (--spool-max-bytes): dropped the %d oldest batches "
                "(%d samples)",
                self.dir,
                self.max_bytes,
                len(dropped),
                sum(e.samples for e in dropped),
            )

    def _drop(self, e: SpoolEntry, reason: str) -> None:
        with self._lock:
            if self._entries.pop(e.path.name, None) is None:
                return
        e.path.unlink(missing_ok=True)
        self._count_drop(reason, e)

    def _count_drop(self, reason: str, e: SpoolEntry) -> None:
        with self._lock:
            self.dropped_samples[reason] += e.samples
            self.dropped_batches[reason] += 1

    def _sync_dir(self) -> None:
        try:
            fd = os.open(self.dir, os.O_RDONLY)
        except OSError:  # some file systems (and Windows) cannot open a folder; the rename is still atomic
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def parse_size(value: str | int) -> int:
    """``512MiB``, ``1GiB``, ``200MB`` or plain bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"{value!r} is not a size (use bytes, or 512MiB, 2GiB, 100MB)")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    mult = {
        "B": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 1 << 10,
        "MI": 1 << 20,
        "GI": 1 << 30,
        "TI": 1 << 40,
    }[unit]
    return int(float(m.group(1)) * mult)


def parse_age(value: str | float) -> float:
    """``24h``, ``90m``, ``30s``, ``2d`` or plain seconds."""
    return parse_duration(value)


# Spool.collect()'s series (the agent adds ``node``); they exist when pushing with a spool directory.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_agent_spool_bytes",
        "gauge",
        "bytes",
        "Bytes of batches waiting in the on-disk spool.",
        ("node",),
        "opt-in: --spool-dir",
    ),
    MetricSpec(
        "gpufleet_agent_spool_batches",
        "gauge",
        "",
        "Batches waiting in the on-disk spool.",
        ("node",),
        "opt-in: --spool-dir",
    ),
    MetricSpec(
        "gpufleet_agent_spool_samples",
        "gauge",
        "",
        "Samples waiting in the on-disk spool.",
        ("node",),
        "opt-in: --spool-dir",
    ),
    MetricSpec(
        "gpufleet_agent_spool_dropped_samples_total",
        "counter",
        "",
        "Samples the spool dropped, by reason: size and age limits, or refused by the collector.",
        ("node", "reason"),
        "after an event: a drop",
    ),
)


__all__ = [
    "DEFAULT_MAX_AGE_S",
    "DEFAULT_MAX_BYTES",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "parse_age",
    "parse_size",
]
