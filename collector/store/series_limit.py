"""How many series the store holds active, and the limits on them: in total and per cluster.

A series is *active* while it has a sample newer than ``idle_after_ms`` (default: an hour); one that goes
that long without a sample stops counting, and counts again once it gets one. The counts are taken from the
database (``latest``: each series' newest sample) when the collector starts and at every maintenance pass,
and kept up to date in between as writes create series. A write that would create series past a limit is
refused whole (:class:`SeriesLimitExceeded`) before anything of it is stored.

Only series new to the store are checked: the write path looks them up in its cache of known series first,
so a fleet that sends the series it always sends pays nothing here. A cluster's series are those labelled
``cluster="<name>"``; a token scoped to a cluster writes only its cluster's series, so its limit is its
cluster's. Several replicas on one database each see the others' new series at their next count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import cast, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from gpufleet.collector.store import schema
from gpufleet.core.durations import format_duration
from gpufleet.core.loglines import LineLimit

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
# Retry-After of a refused write: room comes back only as series go idle or an operator raises a limit.
RETRY_AFTER_S = 60


@dataclass(frozen=True)
class SeriesLimits:
    """Active series the store takes: ``max_active`` in all, ``max_per_cluster`` per ``cluster`` label."""

    # 10,000 GPUs of about 40 series each is 400,000; the rest is room for job churn (a pod's series are new
    # series) within the idle window and for the host and inference series of the nodes.
    max_active: int = 1_000_000
    max_per_cluster: int = 500_000
    idle_after_ms: int = HOUR_MS

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.max_per_cluster < 1 or self.idle_after_ms < 1:
            raise ValueError("series limits and the idle time must be positive")


class SeriesLimitExceeded(Exception):
    """A write that would create series past a limit; nothing of it was stored. ``flag``: the option that
    sets the limit; ``new``: the series the write would have created; ``cluster``: whose limit (None: the
    total)."""

    def __init__(self, message: str, *, flag: str, new: int, cluster: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.flag = flag
        self.new = new
        self.cluster = cluster


NewSeries = Mapping[str | None, int]  # new series of a write by their cluster label (None: no cluster label)


class ActiveSeries:
    """The active series count, in total and by cluster. ``reserve`` takes room for a write's new series
    under one lock, so concurrent writes (the write lanes) cannot overshoot a limit together; ``settle``
    says whether that write was stored. ``recount`` takes the counts from the database again."""

    def __init__(self, limits: SeriesLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self.total = 0
        self.by_cluster: Counter[str] = Counter()
        # Reserved, not yet committed; and committed since start (to place commits made during a recount).
        self._pending: Counter[str | None] = Counter()
        self._committed: Counter[str | None] = Counter()
        self.counted = False

    def reserve(self, new: NewSeries) -> NewSeries:
        """Count ``new`` in, or raise SeriesLimitExceeded if that would pass a limit (nothing counted)."""
        n = sum(new.values())
        lim = self.limits
        with self._lock:
            for cluster, k in new.items():
                if cluster is not None and self.by_cluster[cluster] + k > lim.max_per_cluster:
                    raise SeriesLimitExceeded(
                        f"over --max-active-series-per-cluster: cluster {cluster!r} holds "
                        f"{self.by_cluster[cluster]} of the {lim.max_per_cluster} active series it may have, "
                        f"and this write would add {k} new ones; nothing was stored. {_fix(lim)}, or raise "
                        "--max-active-series-per-cluster (GPUFLEET_MAX_ACTIVE_SERIES_PER_CLUSTER)",
                        flag="--max-active-series-per-cluster",
                        new=n,
                        cluster=cluster,
                    )
            if self.total + n > lim.max_active:
                raise SeriesLimitExceeded(
                    f"over --max-active-series: the collector holds {self.total} of the {lim.max_active} "
                    f"active series it takes, and this write would add {n} new ones; nothing was stored. "
                    f"{_fix(lim)}, or raise --max-active-series (GPUFLEET_MAX_ACTIVE_SERIES)",
                    flag="--max-active-series",
                    new=n,
                    cluster=None,
                )
            self.total += n
            for cluster, k in new.items():
                if cluster is not None:
                    self.by_cluster[cluster] += k
                self._pending[cluster] += k
        return new

    def settle(self, reserved: NewSeries, *, stored: bool) -> None:
        """The write that reserved ``reserved`` is committed (``stored``) or failed: its room is given back."""
        with self._lock:
            for cluster, k in reserved.items():
                self._pending[cluster] -= k
                if stored:
                    self._committed[cluster] += k
                else:
                    self.total -= k
                    if cluster is not None:
                        self.by_cluster[cluster] -= k

    def recount(self, conn: Connection, now_ms: int) -> None:
        """The counts from the database: series with a sample in the last ``idle_after_ms``. Writes reserved
        but not committed are added, and so are those committed while the count ran (the count may not
        see them); one committed just before it may be counted twice until the next recount."""
        with self._lock:
            committed_before = Counter(self._committed)
        s, latest = schema.series.c, schema.latest.c
        cluster = _cluster_label(conn)
        rows = conn.execute(
            select(cluster, func.count())
            .select_from(schema.latest.join(schema.series, s.id == latest.series_id))
            .where(latest.ts > now_ms - self.limits.idle_after_ms)
            .group_by(cluster)
        ).all()
        with self._lock:
            extra = Counter(self._pending)
            extra.update(self._committed)
            extra.subtract(committed_before)
            by_cluster: Counter[str] = Counter()
            total = 0
            for name, n in rows:
                total += n
                if name is not None:
                    by_cluster[name] += n
            for cluster_name, k in extra.items():
                total += k
                if cluster_name is not None:
                    by_cluster[cluster_name] += k
            self.total = total
            self.by_cluster = +by_cluster  # clusters with no active series are forgotten
            self.counted = True


class RefusalLog:
    """Writes refused for series, logged at once and then a line per writer and limit a minute at most, with
    what was refused since: a client that keeps sending new series does not flood the log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lines = LineLimit(60.0, clock)

    def note(self, writer: str, exc: SeriesLimitExceeded) -> None:
        held = self._lines.take((writer, exc.flag), exc.new)
        if held is None:
            return
        log.warning(
            "refused %d writes of %s (%d new series) since the last line: %s",
            held.lines + 1,
            writer,
            held.amount,
            exc,
        )


def _cluster_label(conn: Connection) -> ColumnElement[str | None]:
    """The ``cluster`` label of a series, from its labels (a JSON object) in SQL."""
    labels = schema.series.c.labels
    if conn.dialect.name == "postgresql":
        return cast(labels, JSONB).op("->>")("cluster")
    return func.json_extract(labels, "$.cluster")


def _fix(limits: SeriesLimits) -> str:
    return (
        f"Series stop counting {format_duration(limits.idle_after_ms / 1000)} after their last sample "
        "(--series-idle-after). If a label takes a new value in every sample (a request id, a timestamp, a "
        "random name), drop it where the samples are made"
    )


__all__ = ["RETRY_AFTER_S", "ActiveSeries", "RefusalLog", "SeriesLimitExceeded", "SeriesLimits"]
