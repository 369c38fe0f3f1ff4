"""Writing remote-write series: one transaction per batch, shared between concurrent writers (group
commit), on either raw layout (SQLite rows, PostgreSQL chunks written with COPY; see ``chunks.py``).

A batch arrives column by column (``SeriesBatch``: label sets, timestamps, values). The path a live
fleet takes, series already known and samples in time order, does per series a few lookups and list
operations and no per-sample Python; whatever is irregular (NaN, unsorted or repeated timestamps, the
same series twice, samples already stored) is found by a cheap test and handled on its own."""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from gpufleet.collector.store import chunks, schema
from gpufleet.collector.store.engine import (
    DB_ERRORS,
    LATE_MS,
    WRITE_ERRORS,
    BatchRefused,
    Database,
    StoreUnavailable,
    connection_error,
    data_problem,
    driver_cursor,
    one_line,
)
from gpufleet.collector.store.partitions import Partitions
from gpufleet.collector.store.series_limit import ActiveSeries, NewSeries, SeriesLimits
from gpufleet.core.labels import fingerprint
from gpufleet.core.remote_write import LabelKey, LabelSet, Series, SeriesBatch

log = logging.getLogger(__name__)

NO_TS = -(2**63)
STALE_NAN = struct.pack(
    ">d", struct.unpack(">d", bytes.fromhex("7ff0000000000002"))[0]
)  # Prometheus's marker

# Largest shared transaction of concurrent writes (samples); a batch larger than this goes alone.
GROUP_MAX_SAMPLES = 200_000
WRITE_LANES = 4  # shared transactions in flight at once on PostgreSQL
# Series ids kept in memory; past that the cache starts over (series churn: pods and jobs come and go).
MAX_CACHED_SERIES = 1_000_000

# The newest sample of each series whose batch is newer than anything stored for it, which is what a live
# fleet sends; the others are returned (a retry or a late replay may repeat stored samples; or the series
# has no row yet) and go the slow way: locked in id order, checked sample by sample. PostgreSQL checks
# ``first_ts > l.ts`` again on the newest version of a row that a concurrent writer changed.
_ADVANCE_NEW = """
    WITH advanced AS (
        UPDATE latest l SET ts = b.ts, value = b.value
        FROM unnest(%(sids)s::int4[], %(firsts)s::int8[], %(ts)s::int8[], %(values)s::float8[])
             AS b(series_id, first_ts, ts, value)
        WHERE l.series_id = b.series_id AND l.series_id = ANY(%(sids)s::int4[]) AND b.first_ts > l.ts
        RETURNING l.series_id)
    SELECT s FROM unnest(%(sids)s::int4[]) AS s EXCEPT SELECT series_id FROM advanced"""
_LOCK_LATEST = "SELECT series_id, ts FROM latest WHERE series_id = ANY(%s) ORDER BY series_id FOR UPDATE"
_UPSERT_LATEST = """
    INSERT INTO latest (series_id, ts, value)
    SELECT * FROM unnest(%(sids)s::int4[], %(ts)s::int8[], %(values)s::float8[])
    ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, value = excluded.value
    WHERE excluded.ts > latest.ts"""
# Two transactions that advance the same series may lock their rows in different orders (the UPDATE's
# plan decides): PostgreSQL then aborts one, which is written again.
DEADLOCK_RETRIES = 3


class _Points:
    """One batch, ready to store: per series its label set and its time-sorted, duplicate-free timestamps
    and values (NaN and staleness markers taken out); the hours they fall in and the oldest of them."""

    __slots__ = ("sets", "times", "values", "hours", "oldest", "samples")

    def __init__(self) -> None:
        self.sets: list[LabelSet] = []
        self.times: list[list[int]] = []
        self.values: list[Sequence[float]] = []
        self.hours: set[int] = set()  # Unix ms // HOUR_MS
        self.oldest = 0
        self.samples = 0


class _Pending:
    """A batch waiting for a shared transaction: its points, and once written, done and any error.
    ``turn`` wakes its thread: its batch is written, or it is first in the queue and a lane is free."""

    __slots__ = ("pts", "now_ms", "turn", "done", "error")

    def __init__(self, pts: _Points, now_ms: int, turn: threading.Condition) -> None:
        self.pts = pts
        self.now_ms = now_ms
        self.turn = turn
        self.done = False
        self.error: StoreUnavailable | BatchRefused | None = None


class Ingest:
    def __init__(
        self, db: Database, partitions: Partitions, series_limits: SeriesLimits | None = None
    ) -> None:
        self._db = db
        # None: no limit on series (tests and tools that write a store directly)
        self.active_series = ActiveSeries(series_limits) if series_limits is not None else None
        self._partitions = partitions
        # Series ids by label key. Read without the lock (one dict lookup is atomic); changed under it.
        self._ids: dict[LabelKey, int] = {}
        self._has_latest: set[int] = set()
        self._ids_lock = threading.Lock()
        self._queue: deque[_Pending] = deque()  # batches waiting for a shared transaction
        # Transactions written at once: on PostgreSQL's chunks, several, so Python builds one while the
        # database works on the others (a group that loses a deadlock is written again). SQLite has one
        # writer; the naive rows layout keeps one too.
        self._free_lanes = WRITE_LANES if db.chunked else 1
        self._lock = threading.Lock()  # guards the queue and the lanes
        self.dropped: dict[str, int] = {}  # samples that could not be stored, by reason

    def write(self, series: Sequence[Series], *, now_ms: int | None = None) -> int:
        """Store every sample of every series in one transaction: the whole batch or nothing.

        Samples already stored (a retried batch, an overlapping replay) are skipped, so a retry stores
        nothing twice. NaN values cannot be stored and are counted in ``dropped``; Prometheus staleness
        markers end a series and are counted there too. Returns the number of samples offered.

        Concurrent calls share transactions (group commit): the batches that arrive while every write
        lane (``WRITE_LANES`` transactions at once on PostgreSQL) is busy go into the next free lane's
        transaction together, and each call returns only after the commit of the transaction that holds
        its batch. See ``write_many`` for what a shared transaction that fails does."""
        return self.write_batch(SeriesBatch.of(series), now_ms=now_ms)

    def write_batch(self, batch: SeriesBatch, *, now_ms: int | None = None) -> int:
        """``write`` for a batch as a receiver decodes it (``remote_write.decode_batch``). With series limits,
        a batch that would create series past one is refused whole, before anything of it is stored:
        ``SeriesLimitExceeded`` (see series_limit.py)."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        pts, offered = self._points(batch)
        if pts is None:
            return offered
        active = self.active_series
        reserved = self._admit(active, pts, now_ms) if active is not None else None
        if active is None or reserved is None:
            return self._write_queued(pts, now_ms, offered)
        stored = False
        try:
            n = self._write_queued(pts, now_ms, offered)
            stored = True
            return n
        finally:
            active.settle(reserved, stored=stored)

    def _write_queued(self, pts: _Points, now_ms: int, offered: int) -> int:
        item = _Pending(pts, now_ms, threading.Condition(self._lock))
        group: list[_Pending] = []
        with self._lock:  # the thread of the first queued batch writes it and the batches behind it
            self._queue.append(item)
            while not item.done and not (self._free_lanes and self._queue and self._queue[0] is item):
                item.turn.wait()
            if not item.done:
                self._free_lanes -= 1
                samples = 0
                while self._queue and (
                    not group or samples + self._queue[0].pts.samples <= GROUP_MAX_SAMPLES
                ):
                    group.append(self._queue.popleft())
                    samples += group[-1].pts.samples
                if self._free_lanes and self._queue:
                    self._queue[0].turn.notify()
        if group:
            try:
                self._write_group(group)
            finally:
                with self._lock:
                    self._free_lanes += 1
                    for done in group:
                        done.turn.notify()
                    if self._queue:
                        self._queue[0].turn.notify()
        if item.error is not None:
            raise item.error
        return offered

    def count_active_series(self, now_ms: int | None = None) -> None:
        """Take the active series counts from the database (at start, then at every maintenance pass)."""
        if self.active_series is None:
            return
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        try:
            with self._db.engine.connect() as conn:
                self.active_series.recount(conn, now_ms)
        except DB_ERRORS as exc:
            log.warning("cannot count the active series: %s", one_line(getattr(exc, "orig", exc)))
            raise StoreUnavailable(
                "the database did not answer the count of active series", connection=connection_error(exc)
            ) from None

    def _admit(self, active: ActiveSeries, pts: _Points, now_ms: int) -> NewSeries | None:
        """Room for the series of ``pts`` the store does not hold yet, or SeriesLimitExceeded. Series in the
        cache of known ids cost one dict lookup each; the others are looked up in the database, where a
        restart, another replica or a cache that started over may have left them (their ids are kept)."""
        ids = self._ids
        unknown = [ls for ls in pts.sets if ls.key not in ids]
        if not unknown:
            return None
        if not active.counted:
            self.count_active_series(now_ms)
        by_fp = {fingerprint(ls.labels): ls for ls in unknown}
        stored: dict[LabelKey, int] = {}
        fps = list(by_fp)
        try:
            with self._db.engine.connect() as conn:
                for lo in range(0, len(fps), 5000):
                    for fp, sid in conn.execute(
                        select(schema.series.c.fingerprint, schema.series.c.id).where(
                            schema.series.c.fingerprint.in_(fps[lo : lo + 5000])
                        )
                    ):
                        stored[by_fp.pop(fp).key] = sid
        except DB_ERRORS as exc:
            log.warning("cannot look up a write's new series: %s", one_line(getattr(exc, "orig", exc)))
            raise StoreUnavailable(
                "the database did not answer a lookup of series", connection=connection_error(exc)
            ) from None
        if stored:  # committed rows: their ids stay valid
            with self._ids_lock:
                self._ids.update(stored)
        if not by_fp:
            return None
        new: dict[str | None, int] = {}
        for ls in by_fp.values():
            cluster = ls.labels.get("cluster")
            new[cluster] = new.get(cluster, 0) + 1
        return active.reserve(new)

    def write_many(
        self, batches: Sequence[Sequence[Series]], *, now_ms: int | None = None
    ) -> list[int | StoreUnavailable | BatchRefused]:
        """Store several batches in one shared transaction (what concurrent ``write`` calls do).

        Per batch: the number of samples offered, or the error it failed with: ``BatchRefused`` when the
        database refused that batch's data (retrying it cannot help), ``StoreUnavailable`` otherwise. When
        the shared transaction fails on a database error that is not about the connection (a batch the
        database refuses, a deadlock), each batch is retried in a transaction of its own, so one bad
        batch does not fail the others; when the database cannot be reached, every batch fails. Either
        way a batch is stored whole or not at all."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        items: list[_Pending | None] = []
        out: list[int] = []
        for series in batches:
            pts, offered = self._points(SeriesBatch.of(series))
            out.append(offered)
            items.append(_Pending(pts, now_ms, threading.Condition(self._lock)) if pts is not None else None)
        self._write_group([i for i in items if i is not None])
        return [
            i.error if i is not None and i.error is not None else n for i, n in zip(items, out, strict=True)
        ]

    def _write_group(self, group: list[_Pending]) -> None:
        try:
            self._write_points(group)
        except (StoreUnavailable, BatchRefused) as exc:
            if len(group) > 1 and not (isinstance(exc, StoreUnavailable) and exc.connection):
                log.warning(
                    "a shared transaction of %d batches failed (%s); writing each on its own", len(group), exc
                )
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
            if self._db.chunked:  # before the batch's transaction: its DDL must not wait on its locks
                self._partitions.ensure(
                    "sample_head", {h * chunks.HOUR_MS for item in group for h in item.pts.hours}
                )
            for attempt in range(DEADLOCK_RETRIES + 1):
                try:
                    self._transaction(group)
                    return
                except DB_ERRORS as exc:
                    if attempt == DEADLOCK_RETRIES or not _deadlock(exc):
                        raise
                    log.info("a write was chosen as a deadlock victim; writing it again")
        except WRITE_ERRORS as exc:
            with self._ids_lock:  # ids learned in a rolled-back transaction may not exist
                self._ids = {}
                self._has_latest = set()
            self._partitions.forget_all()
            # The driver's words go to the operator's log only: they may quote SQL and the batch's values.
            problem = data_problem(exc)
            if problem is not None:
                log.warning("the database refused a batch's data: %s", one_line(getattr(exc, "orig", exc)))
                raise BatchRefused(problem) from None
            log.warning("database write failed: %s", one_line(getattr(exc, "orig", exc)))
            connection = connection_error(exc)
            raise StoreUnavailable(
                "the database cannot be reached" if connection else "the database did not complete the write",
                connection=connection,
            ) from None

    def _transaction(self, group: Sequence[_Pending]) -> None:
        learned: dict[LabelKey, int] = {}  # ids of new series: cached once committed, not before
        with self._db.engine.begin() as conn:
            sids: list[int] = []
            times: list[list[int]] = []
            values: list[Sequence[float]] = []
            late = None
            for item in group:
                sids += self._series_ids(conn, item.pts, item.now_ms, learned)
                times += item.pts.times
                values += item.pts.values
                if item.pts.oldest < item.now_ms - LATE_MS:
                    late = item.pts.oldest if late is None else min(late, item.pts.oldest)
            if len(set(sids)) != len(sids):  # one series twice (labels in another order, two batches)
                sids, times, values = _merge_repeats(sids, times, values)
            if late is not None:
                self._mark_late(conn, late)
            if self._db.chunked:
                self._write_chunks(conn, sids, times, values)
            else:
                self._write_rows(conn, sids, times, values)
        # Committed: another lane may use these ids and skip these series' first `latest` rows now.
        with self._ids_lock:
            if len(self._ids) + len(learned) > MAX_CACHED_SERIES:
                self._ids = {}
                self._has_latest = set()
            self._ids.update(learned)
            if self._db.chunked:
                self._has_latest.update(sids)

    def _points(self, batch: SeriesBatch) -> tuple[_Points | None, int]:
        """Per label set: time-sorted, duplicate-free samples, NaN and staleness markers taken out.

        Series of one request are sampled at the same instants, so what depends on timestamps alone
        (in order? which hours? the oldest?) is worked out once per distinct run of timestamps."""
        pts = _Points()
        at: dict[LabelKey, int] = {}
        offered = nan = stale = 0
        last: list[int] = []
        in_order = True
        oldest = None
        for ls, ts, vs in zip(batch.label_sets, batch.timestamps, batch.values, strict=True):
            if not ts:
                continue
            offered += len(ts)
            total = sum(vs)
            if total != total:  # a NaN among them (or inf and -inf): take them out one by one
                kept = [(t, v) for t, v in zip(ts, vs, strict=True) if v == v]
                for v in vs:
                    if v != v:
                        if struct.pack(">d", v) == STALE_NAN:
                            stale += 1
                        else:
                            nan += 1
                if not kept:
                    continue
                ts, vs = [t for t, _ in kept], [v for _, v in kept]
            if ts != last:
                last = ts
                in_order = all(a < b for a, b in zip(ts, ts[1:], strict=False))
                pts.hours.update({t // chunks.HOUR_MS for t in ts})
                first = min(ts)
                oldest = first if oldest is None else min(oldest, first)
            if not in_order:
                merged = sorted(dict(zip(ts, vs, strict=True)).items())  # a repeated timestamp: the last wins
                ts, vs = [t for t, _ in merged], [v for _, v in merged]
            i = at.get(ls.key)
            if i is not None:  # the same labels twice in one batch: the later one wins a timestamp
                merged_d = dict(zip(pts.times[i], pts.values[i], strict=True))
                merged_d.update(zip(ts, vs, strict=True))
                merged = sorted(merged_d.items())
                pts.samples += len(merged) - len(pts.times[i])
                pts.times[i], pts.values[i] = [t for t, _ in merged], [v for _, v in merged]
                continue
            at[ls.key] = len(pts.sets)
            pts.sets.append(ls)
            pts.times.append(ts)
            pts.values.append(vs)
            pts.samples += len(ts)
        if nan:
            self._count_drop("nan_value", nan)
            log.warning("%d NaN samples were not stored: the store keeps numbers only", nan)
        if stale:
            self._count_drop("staleness_marker", stale)
        if not pts.sets or oldest is None:
            return None, offered
        pts.oldest = oldest
        return pts, offered

    def _count_drop(self, what: str, n: int) -> None:
        with self._ids_lock:
            self.dropped[what] = self.dropped.get(what, 0) + n

    def _series_ids(
        self, conn: Connection, pts: _Points, now_ms: int, learned: dict[LabelKey, int]
    ) -> list[int]:
        """The series id of each of ``pts.sets``, in that order; series never seen are created, and their
        ids go to ``learned`` (ids of earlier batches of the same transaction are taken from there)."""
        get = self._ids.get
        ids = [get(ls.key, 0) for ls in pts.sets]
        if 0 not in ids:
            return ids
        for i, sid in enumerate(ids):
            if not sid:
                ids[i] = learned.get(pts.sets[i].key, 0)
        missing = [i for i, sid in enumerate(ids) if not sid]
        if not missing:
            return ids
        by_fp: dict[int, list[int]] = {}
        rows: dict[int, dict[str, object]] = {}
        for i in missing:
            ls = pts.sets[i]
            fp = fingerprint(ls.labels)
            if fp not in by_fp:
                labels = {a: b for a, b in ls.labels.items() if a != "__name__"}
                rows[fp] = {
                    "fingerprint": fp,
                    "metric": ls.name,
                    "labels": json.dumps(labels, sort_keys=True),
                    "node": labels.get("node"),
                    "uuid": labels.get("uuid"),
                    "created_ms": now_ms,
                }
            by_fp.setdefault(fp, []).append(i)
        conn.execute(  # in fingerprint order, the one order of every writer: no deadlock between two
            self._db.insert(schema.series).on_conflict_do_nothing(index_elements=["fingerprint"]),
            [rows[fp] for fp in sorted(rows)],
        )
        fp_list = list(by_fp)
        for lo in range(0, len(fp_list), 5000):
            for fp, sid in conn.execute(
                select(schema.series.c.fingerprint, schema.series.c.id).where(
                    schema.series.c.fingerprint.in_(fp_list[lo : lo + 5000])
                )
            ):
                for i in by_fp[fp]:
                    ids[i] = sid
        learned.update({pts.sets[i].key: ids[i] for i in missing})
        return ids

    def _mark_late(self, conn: Connection, oldest: int) -> None:
        """A sample behind the maintenance watermarks: make the next run redo rollups (and compaction)
        from there. Live data never comes here: it is newer than ``now - LATE_MS``."""
        marks = {k: v for k, v in conn.execute(select(schema.store_state.c.key, schema.store_state.c.value))}
        for done, dirty in (("rollup_until", "rollup_dirty_from"), ("compact_until", "compact_dirty_from")):
            if done in marks and oldest < marks[done]:
                ins = self._db.insert(schema.store_state)
                least = func.least if self._db.dialect == "postgresql" else func.min
                conn.execute(
                    ins.values(key=dirty, value=oldest).on_conflict_do_update(
                        index_elements=["key"],
                        set_={"value": least(schema.store_state.c.value, ins.excluded.value)},
                    )
                )

    def _write_rows(
        self, conn: Connection, sids: list[int], times: list[list[int]], values: list[Sequence[float]]
    ) -> None:
        # One row per sample; the (series_id, ts) key turns a retried sample into a no-op.
        rows = [
            {"series_id": sid, "ts": t, "value": v}
            for sid, ts, vs in zip(sids, times, values, strict=True)
            for t, v in zip(ts, vs, strict=True)
        ]
        conn.execute(self._db.insert(schema.samples).on_conflict_do_nothing(), rows)
        newest = [
            {"series_id": sid, "ts": ts[-1], "value": vs[-1]}
            for sid, ts, vs in zip(sids, times, values, strict=True)
        ]
        ins = self._db.insert(schema.latest)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["series_id"],
                set_={"ts": ins.excluded.ts, "value": ins.excluded.value},
                where=ins.excluded.ts >= schema.latest.c.ts,
            ),
            newest,
        )

    def _write_chunks(
        self, conn: Connection, sids: list[int], times: list[list[int]], values: list[Sequence[float]]
    ) -> None:
        cur: Any = driver_cursor(conn)  # psycopg's: COPY is not in the DB-API
        has_latest = self._has_latest
        new = sorted(sid for sid in sids if sid not in has_latest)  # in id order: no deadlock here
        if new:  # a row for series never seen, so concurrent first writes serialise too
            cur.execute(
                "INSERT INTO latest (series_id, ts, value) SELECT unnest(%s::int4[]), %s, 'NaN' "
                "ON CONFLICT DO NOTHING",
                (chunks.Int4Array.of(new), NO_TS),
            )
        cur.execute(
            _ADVANCE_NEW,
            {
                "sids": chunks.Int4Array.of(sids),
                "firsts": chunks.Int8Array.of([ts[0] for ts in times]),
                "ts": chunks.Int8Array.of([ts[-1] for ts in times]),
                "values": chunks.Float8Array.of([vs[-1] for vs in values]),
            },
        )
        behind = {sid for (sid,) in cur.fetchall()}
        if behind:
            _write_behind(cur, behind, sids, times, values)
        chunks.copy_chunks(cur, sids, times, values)


def _write_behind(
    cur: Any, behind: set[int], sids: list[int], times: list[list[int]], values: list[Sequence[float]]
) -> None:
    """The slow path, for series whose batch starts at or before their newest stored sample: lock them
    in id order, take out the samples already stored, and advance ``latest`` where the rest is newer."""
    cur.execute(_LOCK_LATEST, (chunks.Int4Array.of(sorted(behind)),))
    newest = dict(cur.fetchall())
    at = [i for i, sid in enumerate(sids) if sid in behind]
    maybe = [i for i in at if times[i][0] <= newest.get(sids[i], NO_TS)]
    if maybe:
        lo = min(times[i][0] for i in maybe)
        hi = max(newest[sids[i]] for i in maybe)
        stored = chunks.existing_timestamps(cur, [sids[i] for i in maybe], lo, hi)
        for i in maybe:
            sid = sids[i]
            kept = [(t, v) for t, v in zip(times[i], values[i], strict=True) if (sid, t) not in stored]
            times[i], values[i] = [t for t, _ in kept], [v for _, v in kept]
    at = [i for i in at if times[i]]
    if at:
        cur.execute(
            _UPSERT_LATEST,
            {
                "sids": chunks.Int4Array.of([sids[i] for i in at]),
                "ts": chunks.Int8Array.of([times[i][-1] for i in at]),
                "values": chunks.Float8Array.of([values[i][-1] for i in at]),
            },
        )


def _deadlock(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", exc), "sqlstate", None) == "40P01"


def _merge_repeats(
    sids: list[int], times: list[list[int]], values: list[Sequence[float]]
) -> tuple[list[int], list[list[int]], list[Sequence[float]]]:
    """One entry per series: the same series twice (its labels in another order, or in two batches of
    one transaction) becomes one, and what came first wins a timestamp, as if written one after the other."""
    at: dict[int, int] = {}
    out_sids: list[int] = []
    out_times: list[list[int]] = []
    out_values: list[Sequence[float]] = []
    for sid, ts, vs in zip(sids, times, values, strict=True):
        j = at.get(sid)
        if j is None:
            at[sid] = len(out_sids)
            out_sids.append(sid)
            out_times.append(ts)
            out_values.append(vs)
            continue
        merged_d = dict(zip(ts, vs, strict=True))
        merged_d.update(zip(out_times[j], out_values[j], strict=True))
        merged = sorted(merged_d.items())
        out_times[j], out_values[j] = [t for t, _ in merged], [v for _, v in merged]
    return out_sids, out_times, out_values
