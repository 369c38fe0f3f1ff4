"""Range queries (``/api/v1/query_range``, ``Store.query_range``) with bounded work: what one may cost
(``QueryLimits``), the budget that keeps it there as it reads, and the reading itself.

The costs are known before any sample is read: the matching series are counted in the database, and series
x steps gives the points of the answer; past either limit the query is refused (QueryRefused) having read
nothing else. Samples then stream in ordered by series, a fetch at a time, so the collector holds one
series' samples at once. Every fetch counts the samples read and looks at the time left; PostgreSQL gets
that time as ``statement_timeout`` before each statement and each fetch, and SQLite looks at it through a
progress handler, so the database stops too (QueryTimedOut). ``QueryCancel`` stops a query from another
thread, the statement at work in the database included (QueryCancelled)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import re
import sqlite3
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from math import isfinite
from operator import itemgetter
from typing import Any, NamedTuple, Protocol

import psycopg
from sqlalchemy import cast as sql_cast
from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import ColumnElement, Executable

from gpufleet.collector.store import chunks, schema
from gpufleet.collector.store.engine import (
    DB_ERRORS,
    LOOKBACK_MS,
    Database,
    StoreUnavailable,
    connection_error,
    one_line,
)

log = logging.getLogger(__name__)

RAW_RANGE_MS = 6 * 3600 * 1000  # range queries up to 6 hours read raw samples; longer ones read rollups
FETCH_ROWS = 10_000  # rows of samples or rollups a range query takes from the database at a time
# Chunk rows hold from one sample (a write) to an hour of them (compacted): each fetch asks for as many rows as
# should hold about this many samples, going by the rows fetched before.
FETCH_SAMPLES = 100_000
SQLITE_PROGRESS_STEPS = 10_000  # SQLite virtual-machine steps between two looks at a query's budget
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Bucket = tuple[int, float, float, float, int]  # (bucket_ms, min, max, sum, count)
Emit = Callable[[dict[str, str], list[list[float]]], None]


@dataclass(frozen=True)
class QueryLimits:
    """What one range query may cost (``gpufleet collector --query-…``; docs/security.md says why these).

    ``max_series``: series it may match, counted before any sample is read. ``max_samples``: points it may
    answer (series x steps, worked out before reading) and samples or rollup rows it may read (counted as
    they stream in). ``timeout_s``: its time budget, kept by the database as well. ``max_concurrent``: range
    queries the API runs at once."""

    max_series: int = 20_000
    max_samples: int = 20_000_000
    timeout_s: float = 30.0
    max_concurrent: int = 4


class QueryRefused(ValueError):
    """The query would cost more than its limits allow: the message names the count, the limit and the fix."""


class QueryTimedOut(RuntimeError):
    """The query ran past its time budget and was stopped (by the database, if it was at work there)."""


class QueryCancelled(RuntimeError):
    """The query was stopped from outside (its client went away)."""


class QueryCancel:
    """Stops a range query running in another thread: the query is flagged (it stops at its next fetch or
    series) and the database is told to stop the statement at work (PostgreSQL: a cancel request; SQLite: the
    progress handler sees the flag)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._driver: psycopg.Connection[Any] | None = None
        self.cancelled = False

    def attach(self, driver: psycopg.Connection[Any] | None) -> None:
        with self._lock:
            self._driver = driver

    def detach(self) -> None:
        with self._lock:
            self._driver = None

    def cancel(self) -> None:
        """Blocks while PostgreSQL takes the cancel request (on a connection of its own): call it off the
        event loop. Holds the lock meanwhile, so the query's connection is not given back to the pool (and
        to another request) while a cancel request is on its way to it."""
        with self._lock:
            self.cancelled = True
            if self._driver is not None:
                try:
                    self._driver.cancel_safe(timeout=5)
                except psycopg.Error as exc:
                    log.info(
                        "a range query could not be cancelled in the database (%s); its budget stops it", exc
                    )


class Closeable(Protocol):
    def close(self) -> None: ...


class Budget:
    """One range query's allowance as it is spent: samples read against the limit, time against the deadline;
    and the ways the database is made to keep to it."""

    def __init__(self, dialect: str, limits: QueryLimits, cancel: QueryCancel, selector: str) -> None:
        self.dialect = dialect
        self.limits = limits
        self.cancel = cancel
        self.selector = selector
        self.deadline = time.monotonic() + limits.timeout_s
        self.samples = 0
        # What streams rows: closed before the connection goes back to the pool, never later by the garbage
        # collector (a server-side cursor's CLOSE would then go to whoever holds the connection next).
        self._open: list[Closeable] = []

    def over(self) -> bool:
        return self.cancel.cancelled or time.monotonic() >= self.deadline

    def check(self) -> None:
        if self.cancel.cancelled:
            raise QueryCancelled(f"{self.selector}: stopped, its client went away")
        if time.monotonic() >= self.deadline:
            raise QueryTimedOut(self.timed_out())

    def timed_out(self) -> str:
        return (
            f"{self.selector} ran past the time budget of a range query, {self.limits.timeout_s:g} s "
            "(--query-timeout), and was stopped; shorten the range, raise step or narrow the matchers"
        )

    def arm(self, conn: Connection) -> None:
        """Check the budget, then give PostgreSQL's next statement the time left (it stops there itself)."""
        self.check()
        if self.dialect == "postgresql":
            ms = max(1, math.ceil((self.deadline - time.monotonic()) * 1000))
            conn.execute(text("SELECT set_config('statement_timeout', :ms, true)"), {"ms": str(ms)})

    def spend(self, samples: int) -> None:
        self.samples += samples
        if self.samples > self.limits.max_samples:
            raise QueryRefused(
                f"{self.selector} reads more than {self.limits.max_samples} samples (--query-max-samples); "
                "shorten the range (past 6 hours, a step of 60 s or more reads rollups), narrow the matchers "
                "or raise --query-max-samples"
            )

    def rows(self, conn: Connection, statement: Executable) -> Iterator[Sequence[Any]]:
        """The statement's rows, FETCH_ROWS at a time (a server-side cursor on PostgreSQL), each fetch armed
        with the time left and counted as that many samples read."""
        self.arm(conn)
        result = conn.execute(statement, execution_options={"yield_per": FETCH_ROWS})
        self._open.append(result)
        while True:
            self.arm(conn)
            rows = result.fetchmany(FETCH_ROWS)
            if not rows:
                return
            self.spend(len(rows))
            yield from rows

    def chunk_rows(self, conn: Connection, sql: str, params: dict[str, Any]) -> Iterator[Sequence[Any]]:
        """Rows of (series id, start_ms, dts, vals) through psycopg's own server-side cursor in binary: the
        arrays arrive as lists, with no row per sample on the way. Counted by the samples they hold."""
        driver = conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise StoreUnavailable("the database connection was closed under a range query")
        self.arm(conn)
        cursor = driver.cursor(name=f"gpufleet_range_{id(self):x}", binary=True)
        self._open.append(cursor)
        cursor.execute(sql, params)
        size = 10  # an hour's compacted chunk of 500-ms samples holds 7,200
        while True:
            self.arm(conn)
            rows = cursor.fetchmany(size)
            if not rows:
                return
            held = sum(len(r[3]) for r in rows)
            self.spend(held)
            size = max(10, min(FETCH_ROWS, FETCH_SAMPLES * len(rows) // max(1, held)))
            yield from rows

    @contextmanager
    def watching(self, conn: Connection) -> Iterator[None]:
        """While the query runs: SQLite looks at the budget every SQLITE_PROGRESS_STEPS steps of its virtual
        machine, PostgreSQL can be cancelled through ``cancel``; database errors that come of either (or of
        statement_timeout) become QueryCancelled / QueryTimedOut."""
        driver = conn.connection.driver_connection
        lite = driver if isinstance(driver, sqlite3.Connection) else None
        if lite is not None:
            lite.set_progress_handler(self.over, SQLITE_PROGRESS_STEPS)
        self.cancel.attach(driver if isinstance(driver, psycopg.Connection) else None)
        try:
            yield
        except QueryCancelled:
            if lite is None:
                conn.invalidate()  # a cancel request may still be on its way: never hand this one out again
            raise
        except DB_ERRORS as exc:
            orig = getattr(exc, "orig", exc)
            if self.cancel.cancelled:
                if lite is None:
                    conn.invalidate()
                raise QueryCancelled(f"{self.selector}: stopped, its client went away") from None
            if self.over() or isinstance(orig, psycopg.errors.QueryCanceled):
                raise QueryTimedOut(self.timed_out()) from None
            if connection_error(exc):
                raise StoreUnavailable(
                    f"the database stopped answering a range query: {one_line(orig)}"
                ) from None
            raise
        finally:
            for stream in self._open:
                with contextlib.suppress(*DB_ERRORS):
                    stream.close()
            self.cancel.detach()
            if lite is not None:
                lite.set_progress_handler(None, 0)


class _Samples(NamedTuple):
    """A run of one series' samples, time-sorted within the run."""

    sid: int
    times: list[int]
    values: list[float]


class _Buckets(NamedTuple):
    """A run of one series' rollup buckets, time-sorted within the run."""

    sid: int
    buckets: list[Bucket]


Run = _Samples | _Buckets


def resolution(start: float, end: float, step: float) -> str:
    """Which data answers a range query: ``raw`` for ranges up to 6 hours (and for steps under a
    minute), else the coarsest rollup the step allows: ``1h`` for steps of an hour or more, ``1m``
    for a minute or more. Keep raw retention longer than 6 hours so short ranges find raw data."""
    if (end - start) * 1000 <= RAW_RANGE_MS or step < 60:
        return "raw"
    return "1h" if step >= 3600 else "1m"


def step_latest(
    times: Sequence[int], values: Sequence[float], start_ms: int, end_ms: int, step_ms: int
) -> list[list[float]]:
    """At each step t from start to end, the newest sample at or before t, if it is under 5 minutes old, of
    samples given as sorted times and their values: a binary search a step, so a series with many samples a
    step costs no more than one with a sample a step."""
    out = []
    for t in range(start_ms, end_ms + 1, step_ms):
        i = bisect_right(times, t) - 1
        if i >= 0 and times[i] > t - LOOKBACK_MS:
            out.append([t / 1000.0, values[i]])
    return out


def step_average(buckets: list[Bucket], start_ms: int, end_ms: int, step_ms: int) -> list[list[float]]:
    """Average over the buckets in [t - step, t) for each step t (sum of sums over sum of counts)."""
    values = []
    lo = hi = 0
    total, count = 0.0, 0
    for t in range(start_ms, end_ms + 1, step_ms):
        while hi < len(buckets) and buckets[hi][0] < t:
            total += buckets[hi][3]
            count += buckets[hi][4]
            hi += 1
        while lo < hi and buckets[lo][0] < t - step_ms:
            total -= buckets[lo][3]
            count -= buckets[lo][4]
            lo += 1
        if count:
            values.append([t / 1000.0, total / count])
    return values


def read_range(
    db: Database,
    metric: str,
    matchers: Mapping[str, str],
    start: float,
    end: float,
    step: float,
    limits: QueryLimits,
    cancel: QueryCancel,
    emit: Emit,
) -> None:
    """Read ``metric``'s series that match ``matchers`` every ``step`` seconds from ``start`` to ``end``, one
    series at a time in series id order, and ``emit`` each that has values (see the module's description).

    Raw resolution: the newest value at or before each step, no older than 5 minutes (Prometheus's
    instant-vector semantics). Rollup resolution (long ranges, see ``resolution``): the average of the
    samples in the ``step`` seconds before each step."""
    stopped: Exception | None = None
    try:
        _read_range(db, metric, matchers, start, end, step, limits, cancel, emit)
    except (QueryRefused, QueryTimedOut, QueryCancelled) as exc:
        stopped = type(exc)(str(exc))
    except StoreUnavailable as exc:
        stopped = StoreUnavailable(str(exc), connection=exc.connection)
    if stopped is not None:
        # Raised afresh, outside the except: the first one's traceback holds every frame of the read with the
        # samples in them, which would stay in memory until a garbage collection found the reference cycle.
        raise stopped


def _read_range(
    db: Database,
    metric: str,
    matchers: Mapping[str, str],
    start: float,
    end: float,
    step: float,
    limits: QueryLimits,
    cancel: QueryCancel,
    emit: Emit,
) -> None:
    start_ms, end_ms, step_ms = int(start * 1000), int(end * 1000), max(1, int(step * 1000))
    res = resolution(start, end, step)
    selector = _selector(metric, matchers)
    budget = Budget(db.dialect, limits, cancel, selector)
    with db.engine.connect() as conn, budget.watching(conn):
        series = _matching_series(db, conn, metric, matchers, budget)
        if not series:
            return
        steps = (end_ms - start_ms) // step_ms + 1
        if len(series) * steps > limits.max_samples:
            raise QueryRefused(
                f"{selector} from {start:g} to {end:g} every {step:g} s is {len(series)} series x {steps} "
                f"steps = {len(series) * steps} points, over the limit of {limits.max_samples} "
                "(--query-max-samples); raise step, shorten the range or narrow the matchers"
            )
        sids = sorted(series)
        if res == "raw":
            sources = _raw_sources(db, conn, sids, start_ms - LOOKBACK_MS, end_ms, budget)
            for sid, runs in _by_series(sources):
                budget.check()
                times, values = _series_samples(runs)
                stepped = step_latest(times, values, start_ms, end_ms, step_ms)
                if stepped:
                    emit(series[sid], stepped)
            return
        width = 3_600_000 if res == "1h" else 60_000
        sources, raw_from = _rollup_sources(db, conn, res, sids, start_ms - step_ms, end_ms, budget)
        for sid, runs in _by_series(sources):
            budget.check()
            stepped = step_average(_series_buckets(runs, width, raw_from, end_ms), start_ms, end_ms, step_ms)
            if stepped:
                emit(series[sid], stepped)


def _selector(metric: str, matchers: Mapping[str, str]) -> str:
    """The query as a selector, for messages: ``metric{name="value",…}``."""
    if not matchers:
        return metric
    return metric + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in matchers.items()) + "}"


def _matching_series(
    db: Database, conn: Connection, metric: str, matchers: Mapping[str, str], budget: Budget
) -> dict[int, dict[str, str]]:
    """The series that match, with their labels (``__name__`` included); QueryRefused past the limit.
    Counted first, in the database, so a metric of a million series is refused without reading any."""
    where = _series_where(db, metric, matchers)
    if where is None:
        return {}
    budget.arm(conn)
    n = conn.execute(select(func.count()).select_from(schema.series).where(*where)).scalar_one()
    if n > budget.limits.max_series:
        raise QueryRefused(
            f"{budget.selector} matches {n} series, over the limit of {budget.limits.max_series} "
            "(--query-max-series); narrow the matchers (node=, gpu=, uuid=, cluster=…) or raise "
            "--query-max-series"
        )
    budget.arm(conn)
    c = schema.series.c
    return {
        sid: {"__name__": metric, **json.loads(labels_json)}
        for sid, labels_json in conn.execute(select(c.id, c.labels).where(*where))
    }


def _series_where(db: Database, metric: str, matchers: Mapping[str, str]) -> list[ColumnElement[bool]] | None:
    """The SQL that picks ``metric``'s series whose labels equal ``matchers`` (a missing label equals ""),
    or None when no series can match."""
    c = schema.series.c
    where: list[ColumnElement[bool]] = [c.metric == metric]
    for name, value in matchers.items():
        if name == "__name__":
            if value != metric:
                return None
        elif name in ("node", "uuid") and value:  # columns of their own; uuid's indexed
            where.append((c.node if name == "node" else c.uuid) == value)
        elif not _LABEL_NAME.match(name):  # no stored series has a label of that name
            if value:
                return None
        elif db.dialect == "postgresql":
            where.append(func.coalesce(sql_cast(c.labels, postgresql.JSON)[name].astext, "") == value)
        else:
            where.append(func.coalesce(func.json_extract(c.labels, f'$."{name}"'), "") == value)
    return where


def _raw_sources(
    db: Database, conn: Connection, sids: list[int], lo: int, hi: int, budget: Budget
) -> list[Iterator[Run]]:
    """Runs of these series' samples that may hold times in (lo, hi], ordered by series id, from every raw
    layout present (a run may reach outside (lo, hi]: a chunk is read whole)."""
    sources: list[Iterator[Run]] = []
    if db.dialect == "postgresql":
        # Chunks are expanded here, not by gpufleet_points(): their arrays come as lists, and the times are
        # a running sum done in C (itertools.accumulate), a tenth of the database's time for the same rows.
        sources.append(
            _chunk_runs(
                budget.chunk_rows(
                    conn,
                    f"SELECT c.series_id, c.start_ms, c.dts, c.vals FROM {chunks.ALL_CHUNKS} c "
                    "WHERE c.series_id = ANY(%(sids)s) AND c.start_ms <= %(hi)s "
                    "AND c.start_ms > %(lo)s - %(hour)s AND c.end_ms > %(lo)s ORDER BY c.series_id, c.start_ms",
                    {"sids": sids, "lo": lo, "hi": hi, "hour": chunks.HOUR_MS},
                )
            )
        )
    s = schema.samples.c
    sources.append(
        _sample_runs(
            _batched(
                sids,
                lambda batch: budget.rows(
                    conn,
                    select(s.series_id, s.ts, s.value)
                    .where(s.series_id.in_(batch), s.ts > lo, s.ts <= hi)
                    .order_by(s.series_id, s.ts),
                ),
                db.dialect,
            )
        )
    )
    return sources


def _rollup_sources(
    db: Database, conn: Connection, res: str, sids: list[int], lo: int, hi: int, budget: Budget
) -> tuple[list[Iterator[Run]], int]:
    """Runs of rollup buckets in [lo, hi) up to the rollup watermark, and of the raw samples of the newest
    stretch, not rolled up yet; each ordered by series id. And where that stretch starts: raw samples
    before it are in the buckets already."""
    table = schema.rollup_1h if res == "1h" else schema.rollup_1m
    width = 3_600_000 if res == "1h" else 60_000
    budget.arm(conn)
    until = conn.execute(
        select(schema.store_state.c.value).where(schema.store_state.c.key == "rollup_until")
    ).scalar()
    done: int = until if until is not None else lo
    if res == "1h":
        done = done // width * width
    r = table.c
    sources: list[Iterator[Run]] = [
        _bucket_runs(
            _batched(
                sids,
                lambda batch: budget.rows(
                    conn,
                    select(r.series_id, r.bucket_ms, r.vmin, r.vmax, r.vsum, r.n)
                    .where(r.series_id.in_(batch), r.bucket_ms >= lo, r.bucket_ms < min(hi, done))
                    .order_by(r.series_id, r.bucket_ms),
                ),
                db.dialect,
            )
        )
    ]
    raw_from = max(lo, done)
    if raw_from < hi:
        sources += _raw_sources(db, conn, sids, raw_from - 1, hi - 1, budget)
    return sources, raw_from


def _batched(
    sids: list[int], rows_of: Callable[[list[int]], Iterator[Sequence[Any]]], dialect: str
) -> Iterator[Sequence[Any]]:
    """``rows_of`` one batch of series ids after another: still in series order, as ``sids`` is sorted."""
    size = 5000 if dialect == "postgresql" else 500  # SQLite binds at most 32,766 parameters
    for i in range(0, len(sids), size):
        yield from rows_of(sids[i : i + size])


def _chunk_runs(rows: Iterator[Sequence[Any]]) -> Iterator[Run]:
    for sid, start_ms, dts, vals in rows:
        times = list(itertools.accumulate(dts, initial=start_ms))
        del times[0]  # dts[0] is 0: the first sample is at start_ms
        yield _Samples(sid, times, vals)


def _sample_runs(rows: Iterator[Sequence[Any]]) -> Iterator[Run]:
    for sid, group in itertools.groupby(rows, key=itemgetter(0)):
        held = list(group)
        yield _Samples(sid, list(map(itemgetter(1), held)), list(map(itemgetter(2), held)))


def _bucket_runs(rows: Iterator[Sequence[Any]]) -> Iterator[Run]:
    for sid, group in itertools.groupby(rows, key=itemgetter(0)):
        yield _Buckets(sid, [(b, mn, mx, sm, n) for _, b, mn, mx, sm, n in group])


def _by_series(sources: list[Iterator[Run]]) -> Iterator[tuple[int, list[Run]]]:
    """The runs of several sources, each ordered by series id, grouped by series."""
    live = [runs for runs in map(_peeked, sources) if runs is not None]
    if not live:
        return
    runs = live[0] if len(live) == 1 else heapq.merge(*live, key=itemgetter(0))
    for sid, group in itertools.groupby(runs, key=itemgetter(0)):
        yield sid, list(group)


def _peeked(runs: Iterator[Run]) -> Iterator[Run] | None:
    """``runs`` with its first run read (None if it has none): a source that holds nothing costs no merge."""
    first = next(runs, None)
    return None if first is None else itertools.chain((first,), runs)


def _series_samples(runs: list[Run]) -> tuple[list[int], list[float]]:
    """One series' samples from its runs, time-sorted."""
    if len(runs) == 1 and isinstance(runs[0], _Samples):
        times, values = runs[0].times, runs[0].values
    else:
        times, values = [], []
        for run in runs:
            if isinstance(run, _Samples):
                times += run.times
                values += run.values
    if times != sorted(times):  # chunks that overlap in time (late samples), or two layouts
        order = sorted(range(len(times)), key=times.__getitem__)
        times, values = [times[i] for i in order], [values[i] for i in order]
    return times, values


def _series_buckets(runs: list[Run], width: int, raw_from: int, hi: int) -> list[Bucket]:
    """One series' buckets, time-sorted: its rollup buckets, and its raw samples in [raw_from, hi) put in
    buckets of ``width`` ms (chunks are read whole: samples outside that stretch come along)."""
    out: list[Bucket] = []
    agg: dict[int, tuple[float, float, float, int]] = {}
    for run in runs:
        if isinstance(run, _Buckets):
            out += run.buckets
            continue
        for t, v in zip(run.times, run.values, strict=True):
            if not raw_from <= t < hi:
                continue
            b = t // width * width
            mn, mx, sm, n = agg.get(b, (v, v, 0.0, 0))
            agg[b] = (min(mn, v), max(mx, v), sm + v, n + 1)
    out.extend((b, *a) for b, a in sorted(agg.items()))
    out.sort()
    return out


def series_json(labels: dict[str, str], values: list[list[float]]) -> bytes:
    """One series of a range query's answer, as JSON."""
    try:
        return json.dumps(
            {"metric": labels, "values": values}, allow_nan=False, separators=(",", ":")
        ).encode()
    except ValueError:  # ±Inf is stored (NaN is not); JSON has no word for it, Prometheus writes a string
        shown = [[t, v if isfinite(v) else ("+Inf" if v > 0 else "-Inf")] for t, v in values]
        return json.dumps({"metric": labels, "values": shown}, separators=(",", ":")).encode()
