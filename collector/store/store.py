"""Store: write remote-write series, read ranges, latest values, GPUs, alert state.

The same interface runs on SQLite (WAL; one row per sample) and PostgreSQL (compressed chunks in
day partitions, written with COPY; see ``chunks.py`` and docs/storage.md). A batch is stored in one
transaction: whole or not at all, and a retried batch stores nothing twice. ``maintain()`` (an
APScheduler job in the collector) compacts closed hours, keeps the 1-minute and 1-hour rollups current
and enforces retention: by dropping whole partitions on PostgreSQL, by DELETE on SQLite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.collector.store import chunks, migrate, schema
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from gpufleet.addresses import DATABASE_EXAMPLE, database_url
from gpufleet.remote_write import Series

log = logging.getLogger(__name__)

LOOKBACK_MS = 5 * 60 * 1000  # a sample counts as "current" for 5 minutes, as in Prometheus
LATE_MS = 2 * 60 * 1000  # maintenance leaves the newest 2 minutes alone; older samples are "late"
RAW_RANGE_MS = 6 * 3600 * 1000  # range queries up to 6 hours read raw samples; longer ones read rollups
NO_TS = -(2 ** 63)
STALE_NAN = struct.pack(">d", struct.unpack(">d", bytes.fromhex("7ff0000000000002"))[0])  # Prometheus's marker
RAW_LAYOUTS = ("chunks", "rows")


try:  # the PostgreSQL fast path talks to psycopg directly (COPY), so its errors arrive unwrapped
    import psycopg

    _DB_ERRORS: tuple[type[Exception], ...] = (OperationalError, DBAPIError, psycopg.Error)
except ImportError:  # pragma: no cover - SQLite-only installs
    _DB_ERRORS = (OperationalError, DBAPIError)


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or refused the transaction; the caller should retry later.
    ``connection``: the connection failed (rather than the database refusing what was sent)."""

    def __init__(self, message: str, *, connection: bool = True) -> None:
        super().__init__(message)
        self.connection = connection


def _one_line(exc: BaseException | None) -> str:
    """A driver's message on one line (psycopg's span several, with a hint on the last)."""
    return " ".join(str(exc).split())


def _connection_error(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    if getattr(exc, "connection_invalidated", False):
        return True
    try:
        return isinstance(orig, psycopg.OperationalError) and not isinstance(
            orig, (psycopg.errors.TransactionRollback, psycopg.errors.LockNotAvailable))
    except NameError:  # pragma: no cover - SQLite-only installs
        return isinstance(exc, OperationalError)


# Largest shared transaction of concurrent writes (samples); a batch larger than this goes alone.
GROUP_MAX_SAMPLES = 200_000


class _Pending:
    """A batch waiting for a shared transaction: its points, and once written, done and any error."""

    __slots__ = ("pts", "now_ms", "samples", "done", "error")

    def __init__(self, pts: dict, now_ms: int, samples: int) -> None:
        self.pts = pts
        self.now_ms = now_ms
        self.samples = samples
        self.done = False
        self.error: StoreUnavailable | None = None


def fingerprint(labels: Mapping[str, str]) -> int:
    """64-bit signed hash of a label set (``__name__`` included), stable across processes."""
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True, slots=True)
class Point:
    labels: dict[str, str]  # __name__ included
    ts: int
    value: float


@dataclass(frozen=True)
class Retention:
    """How long each resolution is kept; ``None`` keeps it forever."""

    raw_ms: int | None = 15 * 86_400_000
    rollup_1m_ms: int | None = 90 * 86_400_000
    rollup_1h_ms: int | None = 2 * 365 * 86_400_000


def _insert(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _step_latest(pts: list[tuple[int, float]], start_ms: int, end_ms: int, step_ms: int) -> list[list[float]]:
    values = []
    i, last = 0, None
    for t in range(start_ms, end_ms + 1, step_ms):
        while i < len(pts) and pts[i][0] <= t:
            last = pts[i]
            i += 1
        if last is not None and last[0] > t - LOOKBACK_MS:
            values.append([t / 1000.0, last[1]])
    return values


def _step_average(buckets: list[tuple], start_ms: int, end_ms: int, step_ms: int) -> list[list[float]]:
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


class Store:
    def __init__(self, engine: Engine, *, raw_layout: str = "chunks", retention: Retention | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite:///FILE or postgresql+psycopg://…")
        if raw_layout not in RAW_LAYOUTS:
            raise ValueError(f"raw layout {raw_layout!r} is not one of {RAW_LAYOUTS}")
        # SQLite keeps one row per sample; "rows" on PostgreSQL is the naive layout, kept for comparison.
        self.chunked = self.dialect == "postgresql" and raw_layout == "chunks"
        self.retention = retention or Retention()
        self._insert = _insert(self.dialect)
        self._ids: dict[tuple, int] = {}
        self._has_latest: set[int] = set()
        self._partitions: set[str] = set()
        self._ids_lock = threading.Lock()
        self._point_labels: dict[int, dict[str, str]] = {}  # series id -> its labels, __name__ included
        self._queue: deque[_Pending] = deque()  # batches waiting for a shared transaction
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()  # held by the one thread writing a shared transaction
        self.dropped: dict[str, int] = {}  # samples that could not be stored, by reason

    @classmethod
    def open(cls, url: str, *, migrate_schema: bool = True, raw_layout: str = "chunks",
             retention: Retention | None = None, create: bool = True, **engine_kw: Any) -> Store:
        """The store at ``url`` (ValueError for a URL gpufleet cannot use). ``create=False``: a SQLite file
        that does not exist is StoreUnavailable instead of a new, empty store (read-only commands)."""
        url = database_url(url)
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise ValueError(f"the database URL is malformed ({exc}); write {DATABASE_EXAMPLE}") from None
        if url.startswith("sqlite"):
            path = parsed.database
            if not create and path and path != ":memory:" and not os.path.exists(path):
                raise StoreUnavailable(f"there is no store at {path} (the SQLite file does not exist): point --db "
                                       "at the collector's store, or create one with `gpufleet db upgrade --db "
                                       "URL`", connection=False)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **engine_kw)

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, **engine_kw)
        store = cls(engine, raw_layout=raw_layout, retention=retention)
        if migrate_schema:
            store.upgrade_schema()
        return store

    def upgrade_schema(self,
                       progress: Callable[[str], None] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Migrate the schema to this code's (see ``migrate.upgrade``): the revisions before and after."""
        try:
            return migrate.upgrade(self.engine, progress)
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot reach the database at {self.engine.url.render_as_string()}: "
                                   f"{_one_line(exc.orig)}") from None
        except DBAPIError as exc:  # reached, but refused: no rights on the schema, not a gpufleet database
            raise StoreUnavailable(f"the database at {self.engine.url.render_as_string()} refused the schema "
                                   f"upgrade: {_one_line(exc.orig)}", connection=False) from None

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raises if the database cannot answer (cheap: for health checks)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # ---- ingest ----------------------------------------------------------------------------------
    def write(self, series: Sequence[Series], *, now_ms: int | None = None) -> int:
        """Store every sample of every series in one transaction: the whole batch or nothing.

        Samples already stored (a retried batch, an overlapping replay) are skipped, so a retry stores
        nothing twice. NaN values cannot be stored and are counted in ``dropped``; Prometheus staleness
        markers end a series and are counted there too. Returns the number of samples offered.

        Concurrent calls share transactions (group commit): the batches that arrive while one
        transaction is being written go into the next one together, and each call returns only after
        the commit of the transaction that holds its batch. See ``write_many`` for what a shared
        transaction that fails does."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        pts, offered = self._points(series)
        if not pts:
            return offered
        item = _Pending(pts, now_ms, sum(len(pl) for _, pl in pts.values()))
        with self._queue_lock:
            self._queue.append(item)
        while not item.done:
            with self._commit_lock:  # whoever holds it writes every batch queued so far, its own or not
                if item.done:
                    break
                with self._queue_lock:
                    group, samples = [], 0
                    while self._queue and (not group or samples + self._queue[0].samples <= GROUP_MAX_SAMPLES):
                        group.append(self._queue.popleft())
                        samples += group[-1].samples
                self._write_group(group)
        if item.error is not None:
            raise item.error
        return offered

    def write_many(self, batches: Sequence[Sequence[Series]], *, now_ms: int | None = None) -> list[int | Exception]:
        """Store several batches in one shared transaction (what concurrent ``write`` calls do).

        Per batch: the number of samples offered, or the ``StoreUnavailable`` it failed with. When the
        shared transaction fails on a database error that is not about the connection (a batch the
        database refuses, a deadlock), each batch is retried in a transaction of its own, so one bad
        batch does not fail the others; when the database cannot be reached, every batch fails. Either
        way a batch is stored whole or not at all."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        items, out = [], []
        for series in batches:
            pts, offered = self._points(series)
            out.append(offered)
            items.append(_Pending(pts, now_ms, 0) if pts else None)
        self._write_group([i for i in items if i is not None])
        return [i.error if i is not None and i.error is not None else n for i, n in zip(items, out, strict=True)]

    def _write_group(self, group: list[_Pending]) -> None:
        try:
            self._write_points(group)
        except StoreUnavailable as exc:
            if len(group) > 1 and not exc.connection:
                log.warning("a shared transaction of %d batches failed (%s); writing each on its own", len(group), exc)
                for item in group:
                    self._write_group([item])
                return
            for item in group:
                item.error = exc
        finally:
            for item in group:
                item.done = True

    def _write_points(self, group: Sequence[_Pending]) -> None:
        """One transaction for the points of every batch in ``group``."""
        try:
            if self.chunked:  # before the batch's transaction: its DDL must not wait on that transaction's locks
                self._ensure_partitions("sample_head", {t // chunks.HOUR_MS * chunks.HOUR_MS for item in group
                                                        for _, pl in item.pts.values() for t, _ in pl})
            with self.engine.begin() as conn:
                by_sid: dict[int, list[tuple[int, float]]] = {}
                late = None
                for item in group:
                    ids = self._series_ids(conn, item.pts, item.now_ms)
                    oldest = None
                    for key, (_, samples) in item.pts.items():
                        sid = ids[key]
                        oldest = samples[0][0] if oldest is None else min(oldest, samples[0][0])
                        if sid in by_sid:  # the same label set twice (keys in another order, or two batches)
                            merged = dict(samples)
                            merged.update(by_sid[sid])  # what came first wins, as if written one after the other
                            by_sid[sid] = sorted(merged.items())
                        else:
                            by_sid[sid] = samples
                    if oldest is not None and oldest < item.now_ms - LATE_MS:
                        late = oldest if late is None else min(late, oldest)
                if late is not None:
                    self._mark_late(conn, late)
                if self.chunked:
                    self._write_chunks(conn, by_sid)
                else:
                    self._write_rows(conn, by_sid)
        except _DB_ERRORS as exc:
            with self._ids_lock:  # ids learned in a rolled-back transaction may not exist
                self._ids.clear()
                self._has_latest.clear()
                self._partitions.clear()  # another collector's compaction may have dropped one we knew
            raise StoreUnavailable(f"database write failed: {getattr(exc, 'orig', exc)}",
                                   connection=_connection_error(exc)) from None

    def _points(self, series: Sequence[Series]) -> tuple[dict[tuple, tuple[Series, list[tuple[int, float]]]], int]:
        """Per label set: time-sorted, duplicate-free samples, NaN and staleness markers taken out."""
        out: dict[tuple, tuple[Series, list[tuple[int, float]]]] = {}
        offered = 0
        nan = stale = 0
        for s in series:
            samples = s.samples
            offered += len(samples)
            if not samples:
                continue
            clean = [p for p in samples if p[1] == p[1]]  # NaN is the one value unequal to itself
            if len(clean) != len(samples):
                for _, v in samples:
                    if v != v:
                        if struct.pack(">d", v) == STALE_NAN:
                            stale += 1
                        else:
                            nan += 1
                if not clean:
                    continue
            key = tuple(s.labels.items())
            if key in out:
                merged = dict(out[key][1])
                merged.update(clean)
                out[key] = (s, sorted(merged.items()))
                continue
            if any(b[0] <= a[0] for a, b in zip(clean, clean[1:], strict=False)):
                clean = sorted(dict(clean).items())
            out[key] = (s, clean)
        if nan:
            self._count_drop("nan_value", nan)
            log.warning("%d NaN samples were not stored: the store keeps numbers only", nan)
        if stale:
            self._count_drop("staleness_marker", stale)
        return out, offered

    def _count_drop(self, what: str, n: int) -> None:
        with self._ids_lock:
            self.dropped[what] = self.dropped.get(what, 0) + n

    def _series_ids(self, conn: Any, pts: Mapping[tuple, tuple[Series, list]], now_ms: int) -> dict[tuple, int]:
        with self._ids_lock:
            known = {k: self._ids[k] for k in pts if k in self._ids}
        missing = {k: s for k, (s, _) in pts.items() if k not in known}
        if missing:
            by_fp: dict[int, list[tuple]] = {}
            rows = []
            for k, s in missing.items():
                fp = fingerprint(s.labels)
                if fp not in by_fp:
                    labels = {a: b for a, b in s.labels.items() if a != "__name__"}
                    rows.append({"fingerprint": fp, "metric": s.name, "labels": json.dumps(labels, sort_keys=True),
                                 "node": labels.get("node"), "uuid": labels.get("uuid"), "created_ms": now_ms})
                by_fp.setdefault(fp, []).append(k)
            conn.execute(self._insert(schema.series).on_conflict_do_nothing(index_elements=["fingerprint"]), rows)
            fp_list = list(by_fp)
            for i in range(0, len(fp_list), 5000):
                chunk = fp_list[i:i + 5000]
                for fp, sid in conn.execute(select(schema.series.c.fingerprint, schema.series.c.id)
                                            .where(schema.series.c.fingerprint.in_(chunk))):
                    for k in by_fp[fp]:
                        known[k] = sid
            with self._ids_lock:
                self._ids.update({k: known[k] for k in missing})
        return known

    def _mark_late(self, conn: Any, oldest: int) -> None:
        """A sample behind the maintenance watermarks: make the next run redo rollups (and compaction)
        from there. Live data never comes here: it is newer than ``now - LATE_MS``."""
        marks = dict(conn.execute(select(schema.store_state.c.key, schema.store_state.c.value)).all())
        for done, dirty in (("rollup_until", "rollup_dirty_from"), ("compact_until", "compact_dirty_from")):
            if done in marks and oldest < marks[done]:
                ins = self._insert(schema.store_state)
                least = func.least if self.dialect == "postgresql" else func.min
                conn.execute(ins.values(key=dirty, value=oldest).on_conflict_do_update(
                    index_elements=["key"], set_={"value": least(schema.store_state.c.value, ins.excluded.value)}))

    def _write_rows(self, conn: Any, by_sid: Mapping[int, list[tuple[int, float]]]) -> None:
        # One row per sample; the (series_id, ts) key turns a retried sample into a no-op.
        rows = [{"series_id": sid, "ts": t, "value": v} for sid, pl in by_sid.items() for t, v in pl]
        conn.execute(self._insert(schema.samples).on_conflict_do_nothing(), rows)
        newest = [{"series_id": sid, "ts": pl[-1][0], "value": pl[-1][1]} for sid, pl in by_sid.items()]
        ins = self._insert(schema.latest)
        conn.execute(ins.on_conflict_do_update(index_elements=["series_id"],
                                               set_={"ts": ins.excluded.ts, "value": ins.excluded.value},
                                               where=ins.excluded.ts >= schema.latest.c.ts), newest)

    def _write_chunks(self, conn: Any, by_sid: dict[int, list[tuple[int, float]]]) -> None:
        cur = conn.connection.driver_connection.cursor()
        sids = sorted(by_sid)
        with self._ids_lock:
            new = [sid for sid in sids if sid not in self._has_latest]
        if new:  # a row to lock for series never seen, so concurrent first writes serialise too
            cur.execute("INSERT INTO latest (series_id, ts, value) SELECT unnest(%s::int4[]), %s, 'NaN' "
                        "ON CONFLICT DO NOTHING", (new, NO_TS))
        # Lock each series' newest timestamp (in id order: no deadlock between two writers). Samples
        # newer than it are new for sure; only the rest (retries, late replays) are checked one by one.
        cur.execute("SELECT series_id, ts FROM latest WHERE series_id = ANY(%s) ORDER BY series_id FOR UPDATE",
                    (sids,))
        newest = dict(cur.fetchall())
        maybe_stored = {sid: pl for sid, pl in by_sid.items() if pl[0][0] <= newest.get(sid, NO_TS)}
        if maybe_stored:
            lo = min(pl[0][0] for pl in maybe_stored.values())
            hi = max(newest[sid] for sid in maybe_stored)
            stored = chunks.existing_timestamps(cur, list(maybe_stored), lo, hi)
            for sid, pl in maybe_stored.items():
                by_sid[sid] = [p for p in pl if (sid, p[0]) not in stored]
        rows = [r for sid, pl in by_sid.items() if pl for r in chunks.chunk_rows(sid, pl)]
        if rows:
            chunks.copy_chunks(cur, rows)
        latest_rows = [(sid, pl[-1][0], pl[-1][1]) for sid, pl in by_sid.items()
                       if pl and pl[-1][0] > newest.get(sid, NO_TS)]
        if latest_rows:
            a, b, c = zip(*latest_rows, strict=True)
            cur.execute("INSERT INTO latest (series_id, ts, value) "
                        "SELECT * FROM unnest(%s::int4[], %s::int8[], %s::float8[]) "
                        "ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, value = excluded.value",
                        (list(a), list(b), list(c)))
        with self._ids_lock:
            self._has_latest.update(sids)

    def _ensure_partitions(self, table: str, times_ms: Iterable[int], cur: Any = None) -> None:
        """Partitions are created in their own committed transaction, so a batch that fails later does
        not take a new partition down with it and concurrent batches do not wait on the DDL."""
        times_ms = list(times_ms)
        if all(chunks.partition_name(table, t) in self._partitions for t in times_ms):
            return
        if cur is not None:  # inside maintenance's own transaction, which already holds the tables it reads
            chunks.ensure_partitions(cur, table, times_ms, self._partitions)
            return
        with self.engine.begin() as conn:
            chunks.ensure_partitions(conn.connection.driver_connection.cursor(), table, times_ms, self._partitions)

    # ---- reads -----------------------------------------------------------------------------------
    def _matching_series(self, conn: Any, metric: str, matchers: Mapping[str, str]) -> dict[int, dict]:
        out = {}
        for sid, labels_json in conn.execute(select(schema.series.c.id, schema.series.c.labels)
                                             .where(schema.series.c.metric == metric)):
            labels = json.loads(labels_json)
            if all(labels.get(k, "") == v for k, v in matchers.items()):
                out[sid] = {"__name__": metric, **labels}
        return out

    @staticmethod
    def resolution(start: float, end: float, step: float) -> str:
        """Which data answers a range query: ``raw`` for ranges up to 6 hours (and for steps under a
        minute), else the coarsest rollup the step allows: ``1h`` for steps of an hour or more, ``1m``
        for a minute or more. Keep raw retention longer than 6 hours so short ranges find raw data."""
        if (end - start) * 1000 <= RAW_RANGE_MS or step < 60:
            return "raw"
        return "1h" if step >= 3600 else "1m"

    def query_range(self, metric: str, matchers: Mapping[str, str], start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        """Each matching series every ``step`` seconds from ``start`` to ``end``.

        Raw resolution: the newest value at or before each step, no older than 5 minutes (Prometheus's
        instant-vector semantics). Rollup resolution (long ranges, see ``resolution``): the average of
        the samples in the ``step`` seconds before each step."""
        start_ms, end_ms, step_ms = int(start * 1000), int(end * 1000), max(1, int(step * 1000))
        res = self.resolution(start, end, step)
        with self.engine.connect() as conn:
            series = self._matching_series(conn, metric, matchers)
            if not series:
                return []
            if res == "raw":
                by_sid = self._raw_points(conn, list(series), start_ms - LOOKBACK_MS, end_ms)
                result = [{"metric": series[sid], "values": _step_latest(by_sid.get(sid, []), start_ms, end_ms, step_ms)}
                          for sid in series]
            else:
                buckets = self._rollup_buckets(conn, res, list(series), start_ms - step_ms, end_ms)
                result = [{"metric": series[sid], "values": _step_average(buckets.get(sid, []), start_ms, end_ms, step_ms)}
                          for sid in series]
        return sorted((r for r in result if r["values"]), key=lambda r: sorted(r["metric"].items()))

    def _raw_points(self, conn: Any, sids: list[int], lo: int, hi: int) -> dict[int, list[tuple[int, float]]]:
        """Samples of these series with lo < ts <= hi, time-sorted, from every raw layout present."""
        out: dict[int, list[tuple[int, float]]] = {}
        rows = []
        if self.dialect == "postgresql":
            rows += conn.execute(text(
                f"SELECT c.series_id, p.ts, p.value FROM {chunks.ALL_CHUNKS} c {chunks.POINTS} "
                "WHERE c.series_id = ANY(:sids) AND c.start_ms <= :hi AND c.start_ms > :lo - :hour "
                "AND c.end_ms > :lo AND p.ts > :lo AND p.ts <= :hi"),
                {"sids": sids, "lo": lo, "hi": hi, "hour": chunks.HOUR_MS}).all()
        s = schema.samples.c
        for i in range(0, len(sids), 500):
            rows += conn.execute(select(s.series_id, s.ts, s.value).where(
                s.series_id.in_(sids[i:i + 500]), s.ts > lo, s.ts <= hi)).all()
        for sid, t, v in rows:
            out.setdefault(sid, []).append((t, v))
        for pl in out.values():
            pl.sort()
        return out

    def _rollup_buckets(self, conn: Any, res: str, sids: list[int], lo: int, hi: int) -> dict[int, list[tuple]]:
        """(bucket_ms, min, max, sum, count) per series for buckets in [lo, hi): rollup rows up to the
        rollup watermark, the newest stretch (not rolled up yet) computed from raw samples."""
        table = schema.rollup_1h if res == "1h" else schema.rollup_1m
        width = 3_600_000 if res == "1h" else 60_000
        done = conn.execute(select(schema.store_state.c.value)
                            .where(schema.store_state.c.key == "rollup_until")).scalar()
        done = done if done is not None else lo
        if res == "1h":
            done = done // width * width
        out: dict[int, list[tuple]] = {}
        r = table.c
        for i in range(0, len(sids), 500):
            for sid, b, mn, mx, sm, n in conn.execute(
                    select(r.series_id, r.bucket_ms, r.vmin, r.vmax, r.vsum, r.n)
                    .where(r.series_id.in_(sids[i:i + 500]), r.bucket_ms >= lo, r.bucket_ms < min(hi, done))):
                out.setdefault(sid, []).append((b, mn, mx, sm, n))
        if done < hi:
            for sid, pl in self._raw_points(conn, sids, max(lo, done) - 1, hi - 1).items():
                agg: dict[int, list] = {}
                for t, v in pl:
                    a = agg.setdefault(t // width * width, [v, v, 0.0, 0])
                    a[0], a[1], a[2], a[3] = min(a[0], v), max(a[1], v), a[2] + v, a[3] + 1
                out.setdefault(sid, []).extend((b, *a) for b, a in sorted(agg.items()))
        for bl in out.values():
            bl.sort()
        return out

    def latest(self, metric: str | None = None, matchers: Mapping[str, str] | None = None,
               since_ms: int | None = None) -> list[Point]:
        """The newest sample of each series (of ``metric``, if given), newer than ``since_ms`` if given."""
        q = select(schema.series.c.id, schema.series.c.metric, schema.series.c.labels, schema.latest.c.ts,
                   schema.latest.c.value) \
            .join(schema.latest, schema.latest.c.series_id == schema.series.c.id)
        if metric is not None:
            q = q.where(schema.series.c.metric == metric)
        if since_ms is not None:
            q = q.where(schema.latest.c.ts > since_ms)
        out = []
        with self.engine.connect() as conn:
            for sid, name, labels_json, ts, value in conn.execute(q):
                labels = self._series_labels(sid, name, labels_json)
                if matchers and not all(labels.get(k, "") == v for k, v in matchers.items()):
                    continue
                out.append(Point(labels, ts, value))
        return out

    def _series_labels(self, sid: int, metric: str, labels_json: str) -> dict[str, str]:
        """A series' labels, ``__name__`` included, parsed once and then shared (read-only): the rule engine and
        the fleet page read every series every few seconds, and the engine keys its caches on the dict."""
        labels = self._point_labels.get(sid)
        if labels is None:
            labels = self._point_labels[sid] = {"__name__": metric, **json.loads(labels_json)}
        return labels

    def gpus(self, now_ms: int | None = None, stale_after_ms: int = 60_000) -> list[dict[str, Any]]:
        """Every GPU known: identity, last-seen time, and the newest value of each of its series."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        q = select(schema.series.c.id, schema.series.c.metric, schema.series.c.labels, schema.series.c.uuid,
                   schema.latest.c.ts, schema.latest.c.value) \
            .join(schema.latest, schema.latest.c.series_id == schema.series.c.id) \
            .where(schema.series.c.uuid.is_not(None))
        gpus: dict[str, dict[str, Any]] = {}
        identity = ("node", "gpu", "uuid", "model", "cluster", "pod", "namespace", "container")
        with self.engine.connect() as conn:
            for sid, metric, labels_json, uuid, ts, value in conn.execute(q):
                labels = self._series_labels(sid, metric, labels_json)
                g = gpus.setdefault(uuid, {"uuid": uuid, "last_seen": 0, "values": {}})
                if ts >= g["last_seen"]:
                    g["last_seen"] = ts
                    for k in identity:
                        if k in labels:
                            g[k] = labels[k]
                extra = {k: v for k, v in labels.items() if k not in identity and k != "__name__"}
                if metric == "gpufleet_gpu_info":
                    g["info"] = extra
                    continue
                key = metric + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}" if extra else "")
                g["values"][key] = value
        out = []
        for g in gpus.values():
            g["up"] = g["values"].get("gpufleet_gpu_up") == 1.0
            g["stale"] = now_ms - g["last_seen"] > stale_after_ms
            g["last_seen"] = g["last_seen"] / 1000.0
            out.append(g)
        out.sort(key=lambda g: (g.get("cluster", ""), g.get("node", ""), int(g.get("gpu", 0) or 0)))
        return out

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM samples")).scalar_one()
            if self.dialect == "postgresql":
                n += conn.execute(text(f"SELECT coalesce(sum(cardinality(vals)), 0) FROM {chunks.ALL_CHUNKS} c")
                                  ).scalar_one()
            return {"series": conn.execute(text("SELECT count(*) FROM series")).scalar_one(), "samples": int(n)}

    # ---- maintenance -----------------------------------------------------------------------------
    def maintain(self, now_ms: int | None = None) -> dict[str, Any]:
        """One maintenance pass: compact closed hours, bring rollups up to date, enforce retention."""
        from gpufleet.collector.store.maintenance import maintain

        return maintain(self, now_ms if now_ms is not None else int(time.time() * 1000))

    # ---- alert state -----------------------------------------------------------------------------
    def load_alerts(self, states: Iterable[str] = ("pending", "firing")) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(schema.alerts).where(schema.alerts.c.state.in_(list(states)))).mappings().all()
        return [{**r, "labels": json.loads(r["labels"]), "annotations": json.loads(r["annotations"])} for r in rows]

    def save_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        if not alerts:
            return
        rows = [{**a, "labels": json.dumps(a["labels"], sort_keys=True),
                 "annotations": json.dumps(a["annotations"], sort_keys=True)} for a in alerts]
        ins = self._insert(schema.alerts)
        cols = [c.name for c in schema.alerts.columns if c.name != "id"]
        stmt = ins.on_conflict_do_update(index_elements=["id"], set_={c: ins.excluded[c] for c in cols})
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    def load_rule_memory(self) -> dict[tuple[str, int], float]:
        with self.engine.connect() as conn:
            return {(r, fp): v for r, fp, v in conn.execute(
                select(schema.rule_memory.c.rule, schema.rule_memory.c.series_fingerprint, schema.rule_memory.c.value))}

    def save_rule_memory(self, items: Mapping[tuple[str, int], float], now_ms: int) -> None:
        if not items:
            return
        ins = self._insert(schema.rule_memory)
        stmt = ins.on_conflict_do_update(index_elements=["rule", "series_fingerprint"],
                                         set_={"value": ins.excluded.value, "ts": ins.excluded.ts})
        with self.engine.begin() as conn:
            conn.execute(stmt, [{"rule": r, "series_fingerprint": fp, "value": v, "ts": now_ms}
                                for (r, fp), v in items.items()])

    def record_notification(self, **row: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.notifications.insert(), [row])

    def notification_target(self, alert_id: str, notifier: str) -> tuple[str, str] | None:
        """Where the firing message of an alert landed (channel, ts), to edit it on resolve."""
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.notifications.c.channel, schema.notifications.c.message_ts)
                               .where(schema.notifications.c.alert_id == alert_id,
                                      schema.notifications.c.notifier == notifier,
                                      schema.notifications.c.state == "firing",
                                      schema.notifications.c.message_ts.is_not(None))
                               .order_by(schema.notifications.c.id.desc()).limit(1)).first()
        return (row[0], row[1]) if row else None

    def notifications(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(schema.notifications)
                                                  .order_by(schema.notifications.c.id)).mappings()]
