"""Writing remote-write series: one transaction per batch, shared between concurrent writers (group
commit), on either raw layout (SQLite rows, PostgreSQL chunks written with COPY; see ``chunks.py``)."""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from gpufleet.collector.store import chunks, schema
from gpufleet.collector.store.engine import (
    DB_ERRORS,
    LATE_MS,
    Database,
    StoreUnavailable,
    connection_error,
    driver_cursor,
)
from gpufleet.collector.store.partitions import Partitions
from gpufleet.core.labels import fingerprint
from gpufleet.core.remote_write import Series

log = logging.getLogger(__name__)

NO_TS = -(2**63)
STALE_NAN = struct.pack(
    ">d", struct.unpack(">d", bytes.fromhex("7ff0000000000002"))[0]
)  # Prometheus's marker

# Largest shared transaction of concurrent writes (samples); a batch larger than this goes alone.
GROUP_MAX_SAMPLES = 200_000

LabelKey = tuple[tuple[str, str], ...]  # a series' labels in the order they arrived
Samples = list[tuple[int, float]]  # (Unix ms, value), time-sorted, one per timestamp
BatchPoints = dict[LabelKey, tuple[Series, Samples]]


class _Pending:
    """A batch waiting for a shared transaction: its points, and once written, done and any error."""

    __slots__ = ("pts", "now_ms", "samples", "done", "error")

    def __init__(self, pts: BatchPoints, now_ms: int, samples: int) -> None:
        self.pts = pts
        self.now_ms = now_ms
        self.samples = samples
        self.done = False
        self.error: StoreUnavailable | None = None


class Ingest:
    def __init__(self, db: Database, partitions: Partitions) -> None:
        self._db = db
        self._partitions = partitions
        self._ids: dict[LabelKey, int] = {}
        self._has_latest: set[int] = set()
        self._ids_lock = threading.Lock()
        self._queue: deque[_Pending] = deque()  # batches waiting for a shared transaction
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()  # held by the one thread writing a shared transaction
        self.dropped: dict[str, int] = {}  # samples that could not be stored, by reason

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
                    group: list[_Pending] = []
                    samples = 0
                    while self._queue and (
                        not group or samples + self._queue[0].samples <= GROUP_MAX_SAMPLES
                    ):
                        group.append(self._queue.popleft())
                        samples += group[-1].samples
                self._write_group(group)
        if item.error is not None:
            raise item.error
        return offered

    def write_many(
        self, batches: Sequence[Sequence[Series]], *, now_ms: int | None = None
    ) -> list[int | StoreUnavailable]:
        """Store several batches in one shared transaction (what concurrent ``write`` calls do).

        Per batch: the number of samples offered, or the ``StoreUnavailable`` it failed with. When the
        shared transaction fails on a database error that is not about the connection (a batch the
        database refuses, a deadlock), each batch is retried in a transaction of its own, so one bad
        batch does not fail the others; when the database cannot be reached, every batch fails. Either
        way a batch is stored whole or not at all."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        items: list[_Pending | None] = []
        out: list[int] = []
        for series in batches:
            pts, offered = self._points(series)
            out.append(offered)
            items.append(_Pending(pts, now_ms, 0) if pts else None)
        self._write_group([i for i in items if i is not None])
        return [
            i.error if i is not None and i.error is not None else n for i, n in zip(items, out, strict=True)
        ]

    def _write_group(self, group: list[_Pending]) -> None:
        try:
            self._write_points(group)
        except StoreUnavailable as exc:
            if len(group) > 1 and not exc.connection:
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
            if (
                self._db.chunked
            ):  # before the batch's transaction: its DDL must not wait on that transaction's locks
                self._partitions.ensure(
                    "sample_head",
                    {
                        t // chunks.HOUR_MS * chunks.HOUR_MS
                        for item in group
                        for _, pl in item.pts.values()
                        for t, _ in pl
                    },
                )
            with self._db.engine.begin() as conn:
                by_sid: dict[int, Samples] = {}
                late = None
                for item in group:
                    ids = self._series_ids(conn, item.pts, item.now_ms)
                    oldest = None
                    for key, (_, samples) in item.pts.items():
                        sid = ids[key]
                        oldest = samples[0][0] if oldest is None else min(oldest, samples[0][0])
                        if sid in by_sid:  # the same label set twice (keys in another order, or two batches)
                            merged = dict(samples)
                            merged.update(
                                by_sid[sid]
                            )  # what came first wins, as if written one after the other
                            by_sid[sid] = sorted(merged.items())
                        else:
                            by_sid[sid] = samples
                    if oldest is not None and oldest < item.now_ms - LATE_MS:
                        late = oldest if late is None else min(late, oldest)
                if late is not None:
                    self._mark_late(conn, late)
                if self._db.chunked:
                    self._write_chunks(conn, by_sid)
                else:
                    self._write_rows(conn, by_sid)
        except DB_ERRORS as exc:
            with self._ids_lock:  # ids learned in a rolled-back transaction may not exist
                self._ids.clear()
                self._has_latest.clear()
            self._partitions.forget_all()
            raise StoreUnavailable(
                f"database write failed: {getattr(exc, 'orig', exc)}", connection=connection_error(exc)
            ) from None

    def _points(self, series: Sequence[Series]) -> tuple[BatchPoints, int]:
        """Per label set: time-sorted, duplicate-free samples, NaN and staleness markers taken out."""
        out: BatchPoints = {}
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

    def _series_ids(self, conn: Connection, pts: BatchPoints, now_ms: int) -> dict[LabelKey, int]:
        with self._ids_lock:
            known = {k: self._ids[k] for k in pts if k in self._ids}
        missing = {k: s for k, (s, _) in pts.items() if k not in known}
        if missing:
            by_fp: dict[int, list[LabelKey]] = {}
            rows = []
            for k, s in missing.items():
                fp = fingerprint(s.labels)
                if fp not in by_fp:
                    labels = {a: b for a, b in s.labels.items() if a != "__name__"}
                    rows.append(
                        {
                            "fingerprint": fp,
                            "metric": s.name,
                            "labels": json.dumps(labels, sort_keys=True),
                            "node": labels.get("node"),
                            "uuid": labels.get("uuid"),
                            "created_ms": now_ms,
                        }
                    )
                by_fp.setdefault(fp, []).append(k)
            conn.execute(
                self._db.insert(schema.series).on_conflict_do_nothing(index_elements=["fingerprint"]), rows
            )
            fp_list = list(by_fp)
            for i in range(0, len(fp_list), 5000):
                chunk = fp_list[i : i + 5000]
                for fp, sid in conn.execute(
                    select(schema.series.c.fingerprint, schema.series.c.id).where(
                        schema.series.c.fingerprint.in_(chunk)
                    )
                ):
                    for k in by_fp[fp]:
                        known[k] = sid
            with self._ids_lock:
                self._ids.update({k: known[k] for k in missing})
        return known

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

    def _write_rows(self, conn: Connection, by_sid: Mapping[int, Samples]) -> None:
        # One row per sample; the (series_id, ts) key turns a retried sample into a no-op.
        rows = [{"series_id": sid, "ts": t, "value": v} for sid, pl in by_sid.items() for t, v in pl]
        conn.execute(self._db.insert(schema.samples).on_conflict_do_nothing(), rows)
        newest = [{"series_id": sid, "ts": pl[-1][0], "value": pl[-1][1]} for sid, pl in by_sid.items()]
        ins = self._db.insert(schema.latest)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["series_id"],
                set_={"ts": ins.excluded.ts, "value": ins.excluded.value},
                where=ins.excluded.ts >= schema.latest.c.ts,
            ),
            newest,
        )

    def _write_chunks(self, conn: Connection, by_sid: dict[int, Samples]) -> None:
        cur: Any = driver_cursor(conn)  # psycopg's: COPY is not in the DB-API
        sids = sorted(by_sid)
        with self._ids_lock:
            new = [sid for sid in sids if sid not in self._has_latest]
        if new:  # a row to lock for series never seen, so concurrent first writes serialise too
            cur.execute(
                "INSERT INTO latest (series_id, ts, value) SELECT unnest(%s::int4[]), %s, 'NaN' "
                "ON CONFLICT DO NOTHING",
                (new, NO_TS),
            )
        # Lock each series' newest timestamp (in id order: no deadlock between two writers). Samples
        # newer than it are new for sure; only the rest (retries, late replays) are checked one by one.
        cur.execute(
            "SELECT series_id, ts FROM latest WHERE series_id = ANY(%s) ORDER BY series_id FOR UPDATE",
            (sids,),
        )
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
        latest_rows = [
            (sid, pl[-1][0], pl[-1][1])
            for sid, pl in by_sid.items()
            if pl and pl[-1][0] > newest.get(sid, NO_TS)
        ]
        if latest_rows:
            a, b, c = zip(*latest_rows, strict=True)
            cur.execute(
                "INSERT INTO latest (series_id, ts, value) "
                "SELECT * FROM unnest(%s::int4[], %s::int8[], %s::float8[]) "
                "ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, value = excluded.value",
                (list(a), list(b), list(c)),
            )
        with self._ids_lock:
            self._has_latest.update(sids)
