"""The store's periodic work: partitions ahead of time, 1-minute and 1-hour rollups, compaction (PostgreSQL
chunks), retention.

Maintenance runs beside ingest on the same database and must never take its capacity for long. So nothing
here holds a lock a write waits on for more than a moment: partitions are created ahead of the hour that
needs them and attached without blocking anyone; a closed hour is compacted in slices of series, each a
short transaction into a stage table no reader sees, and only the last step, which moves the stage into
``sample_chunks`` and drops the hour's partition, locks out writers, for at most ``LOCK_TIMEOUT_MS``
(it gives up and tries again rather than queue behind a long reader with every writer queued behind it).
Run on a schedule (``Pacing``), a pass stops starting slices once its budget is spent, pauses between
slices, and the next pass goes on where it stopped.

Rollups keep a watermark in ``store_state`` (done up to, in Unix ms). A write that brings samples from
behind the watermark lowers ``rollup_dirty_from`` in its own transaction, and a later pass redoes that
stretch, so late data (an agent replaying its spool after an outage) ends up in the rollups too. Passes of
two collectors on one database take turns through advisory locks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, TypedDict

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import Connection

from gpufleet.collector.store import chunks
from gpufleet.collector.store.chunks import DAY_MS, HOUR_MS
from gpufleet.collector.store.engine import LATE_MS, Database, Retention, driver_cursor
from gpufleet.collector.store.partitions import LOCK_TIMEOUT_MS, Partitions

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
ROLLUP_SPAN_MS = HOUR_MS  # the most one rollup transaction recomputes: a catch-up goes an hour at a time
SLICE_SECONDS = 1.0  # a compaction slice is sized to take about this long
FIRST_SLICE_SERIES = 500
SWAP_ATTEMPTS = 3  # tries, a second apart, to take the locks that drop a compacted hour, per pass


@dataclass(frozen=True)
class Pacing:
    """How a scheduled pass shares the database with ingest: it starts no compaction slice or rollup step
    ``budget_s`` after it began (the next pass goes on where it stopped), and compaction works ``share``
    of the time at most, pausing after each slice."""

    budget_s: float
    share: float = 1 / 3


class MaintenanceReport(TypedDict, total=False):
    hours_compacted: int  # PostgreSQL chunks only
    rolled_up_until: int  # Unix ms
    dropped: list[str]  # partitions dropped, and "table: N rows" deleted


class _Changed(Exception):
    """Late samples came into the hour being compacted after their series were staged."""


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(ms / 1000))


def _tune(conn: Connection, *, work_mem: str | None = None) -> None:
    """Settings for the transaction: no parallel workers (they would take the cores ingest needs), no JIT
    (compiling these plans cost more than it saves: 0.6 s of a 1.5 s rollup at 16,000 series)."""
    conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
    conn.execute(text("SET LOCAL jit = off"))
    if work_mem:  # a slice's sort in memory, not in temporary files
        conn.execute(text(f"SET LOCAL work_mem = '{work_mem}'"))


class Maintenance:
    def __init__(self, db: Database, partitions: Partitions, retention: Retention) -> None:
        self.db = db
        self.partitions = partitions
        self.retention = retention
        self._pg = db.dialect == "postgresql"
        self._slice = FIRST_SLICE_SERIES

    def maintain(self, now_ms: int, pacing: Pacing | None = None) -> MaintenanceReport:
        """One pass: partitions ahead, rollups up to date, closed hours compacted, retention. Without
        ``pacing`` it does all there is to do before it returns."""
        deadline = None if pacing is None else time.monotonic() + pacing.budget_s
        report = MaintenanceReport()
        if self.db.chunked:
            self._partitions_ahead(now_ms)
        report["rolled_up_until"] = self._rollups((now_ms - LATE_MS) // MINUTE_MS * MINUTE_MS, deadline)
        if self.db.chunked:
            report["hours_compacted"] = self._compact(
                (now_ms - LATE_MS) // HOUR_MS * HOUR_MS, pacing, deadline
            )
        report["dropped"] = self._retention(now_ms)
        return report

    # ---- partitions ---------------------------------------------------------------------------------
    def _partitions_ahead(self, now_ms: int) -> None:
        """The head partitions of this hour and the next, so that the first write of an hour finds its
        partition there (the other tables are written by maintenance, which creates what it writes)."""
        try:
            self.partitions.ensure("sample_head", [now_ms, now_ms + HOUR_MS])
        except psycopg.errors.LockNotAvailable:
            log.info("the next hour's partition is busy; it is created at the next pass")

    # ---- rollups ------------------------------------------------------------------------------------
    def _rollups(self, target: int, deadline: float | None) -> int:
        """Bring the rollups up to ``target``, at most ``ROLLUP_SPAN_MS`` per transaction; where they
        stand when the pass's budget ran out first."""
        started, steps, first, last = time.monotonic(), 0, None, target
        self._claim_dirty()
        while True:
            lo, hi = self._rollup_step(target)
            if lo is None:
                break
            first, last = (lo if first is None else first), hi
            steps += 1
            if hi >= target:
                break
            if deadline is not None and time.monotonic() > deadline:
                target = hi
                break
        if first is not None:
            log.info(
                "store maintenance: rollups took %.2f s: %s to %s in %d steps",
                time.monotonic() - started,
                _utc(first),
                _utc(last),
                steps,
            )
        return target

    def _claim_dirty(self) -> None:
        """Take the mark late writes leave (``rollup_dirty_from``) over into maintenance's own
        ``rollup_redo_from``, in a transaction of its own: writes marking the rollups dirty then never wait
        on a rollup being computed, and one that marks it while a rollup runs leaves a new mark for the next
        pass. Taking the mark waits for the writes that set it to commit, so the redo sees their samples."""
        with self.db.engine.begin() as conn:
            marked = conn.execute(
                text("SELECT value FROM store_state WHERE key = 'rollup_dirty_from'")
            ).scalar()
            if marked is None:
                return
            marked = conn.execute(
                text("DELETE FROM store_state WHERE key = 'rollup_dirty_from' RETURNING value")
            ).scalar()
            if marked is None or marked == _NONE:
                return
            redo = conn.execute(text("SELECT value FROM store_state WHERE key = 'rollup_redo_from'")).scalar()
            self._put(conn, "rollup_redo_from", marked if redo is None else min(redo, marked))

    def _rollup_step(self, target: int) -> tuple[int | None, int]:
        """Recompute one stretch from where the rollups stand (the oldest of the watermark and the redo
        mark) and move the marks past it. Returns the stretch (None: nothing to do)."""
        with self.db.engine.begin() as conn:
            if self._pg:
                _tune(conn)
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('gpufleet_rollups'))"))
            state = {
                k: v
                for k, v in conn.execute(
                    text(
                        "SELECT key, value FROM store_state WHERE key IN ('rollup_until', 'rollup_redo_from')"
                    )
                )
                if v != _NONE
            }
            until, redo = state.get("rollup_until"), state.get("rollup_redo_from")
            lo: int | None
            if until is None:
                lo = conn.execute(
                    text(
                        f"SELECT min(start_ms) FROM {chunks.ALL_CHUNKS} c"
                        if self.db.chunked
                        else "SELECT min(ts) FROM samples"
                    )
                ).scalar()
            else:
                lo = min(until, redo) if redo is not None else until
            if lo is None or lo >= target:
                if until is None or until < target:
                    self._put(conn, "rollup_until", target)
                return None, target
            lo = lo // MINUTE_MS * MINUTE_MS
            hi = min(target, lo + ROLLUP_SPAN_MS)
            if self._pg:
                self._rollup_partitions(conn, lo, hi)
            self._rollup_minutes(conn, lo, hi)
            self._rollup_hours(conn, lo // HOUR_MS * HOUR_MS, hi)
            done = hi if until is None else max(hi, until)
            self._put(conn, "rollup_until", done)
            if redo is not None:
                conn.execute(text("DELETE FROM store_state WHERE key = 'rollup_redo_from'"))
                if hi < done:
                    self._put(conn, "rollup_redo_from", hi)
            return lo, hi

    @staticmethod
    def _put(conn: Connection, key: str, value: int) -> None:
        conn.execute(text("DELETE FROM store_state WHERE key = :k"), {"k": key})
        conn.execute(text("INSERT INTO store_state (key, value) VALUES (:k, :v)"), {"k": key, "v": value})

    def _rollup_partitions(self, conn: Connection, lo: int, hi: int) -> None:
        cur = driver_cursor(conn)
        if self.db.chunked:
            days = [
                p[1]
                for t in ("sample_chunks", "sample_head")
                for p in chunks.partitions(cur, t)
                if p[2] > lo and p[1] < hi
            ]
        else:
            cur.execute(
                "SELECT DISTINCT ts / %s * %s FROM samples WHERE ts >= %s AND ts < %s",
                (DAY_MS, DAY_MS, lo, hi),
            )
            days = [d for (d,) in cur.fetchall()]
        for table in ("rollup_1m", "rollup_1h"):
            self.partitions.ensure(table, days)

    def _rollup_minutes(self, conn: Connection, lo: int, hi: int) -> None:
        """Recompute every 1-minute bucket in [lo, hi) from the raw samples (a redo replaces, never adds)."""
        if self.db.chunked:
            source = (
                f"SELECT c.series_id, p.ts - mod(p.ts, {MINUTE_MS}) AS b, min(p.value), max(p.value), "
                f"sum(p.value), count(*) FROM {chunks.ALL_CHUNKS} c {chunks.POINTS} "
                f"WHERE c.start_ms >= :lo - {HOUR_MS} AND c.start_ms < :hi AND c.end_ms >= :lo "
                "AND p.ts >= :lo AND p.ts < :hi GROUP BY 1, 2"
            )
        else:
            source = (
                f"SELECT series_id, ts - (ts % {MINUTE_MS}) AS b, min(value), max(value), sum(value), count(*) "
                "FROM samples WHERE ts >= :lo AND ts < :hi GROUP BY 1, 2"
            )
        if self.db.dialect == "sqlite":
            source = f"SELECT * FROM ({source}) WHERE true"
        conn.execute(
            text(f"INSERT INTO rollup_1m (series_id, bucket_ms, vmin, vmax, vsum, n) {source} {_UPSERT}"),
            {"lo": lo, "hi": hi},
        )

    def _rollup_hours(self, conn: Connection, lo: int, hi: int) -> None:
        """Recompute the hours overlapping [lo, hi) from the minutes (the newest hour fills as minutes come)."""
        conn.execute(
            text(
                f"INSERT INTO rollup_1h (series_id, bucket_ms, vmin, vmax, vsum, n) "
                f"SELECT series_id, bucket_ms - (bucket_ms % {HOUR_MS}), min(vmin), max(vmax), sum(vsum), sum(n) "
                f"FROM rollup_1m WHERE bucket_ms >= :lo AND bucket_ms < :hi GROUP BY 1, 2 HAVING true {_UPSERT}"
            ),
            {"lo": lo, "hi": hi},
        )

    # ---- compaction ---------------------------------------------------------------------------------
    def _compact(self, target: int, pacing: Pacing | None, deadline: float | None) -> int:
        """Compact every hour of ``sample_head`` that closed before ``target``, oldest first (late samples
        reopen an old hour as a new head partition; a later pass merges it too). Returns the hours done."""
        with self.db.engine.begin() as conn:
            cur = driver_cursor(conn)
            heads = chunks.partitions(cur, "sample_head")
            names = {name for name, _, _ in heads}
            for stage, hour in chunks.compaction_stages(cur):
                if chunks.partition_name("sample_head", hour) not in names:  # its hour went with retention
                    cur.execute(f"DROP TABLE IF EXISTS {stage}")
        hours = 0
        for _, lower, upper in heads:
            if upper > target:
                break
            if not self._compact_hour(lower, pacing, deadline):
                break
            hours += 1
        return hours

    def _compact_hour(self, hour_ms: int, pacing: Pacing | None, deadline: float | None) -> bool:
        """Stage the hour slice by slice, then swap it in. False: not finished in this pass."""
        started, working, slices, series, rows = time.monotonic(), 0.0, 0, 0, 0

        def progress(outcome: str, swap_s: float = 0.0) -> None:
            log.info(
                "store maintenance: compaction took %.2f s: hour %s %s; this pass staged %d series "
                "(%d chunk rows) in %d slices, working %.1f s%s",
                time.monotonic() - started,
                _utc(hour_ms),
                outcome,
                series,
                rows,
                slices,
                working + swap_s,
                f" (the swap {swap_s:.1f} s)" if swap_s else "",
            )

        while True:
            if deadline is not None and time.monotonic() > deadline:
                if slices:
                    progress("goes on at the next pass")
                return False
            t = time.monotonic()
            staged = self._stage_slice(hour_ms)
            took = time.monotonic() - t
            if staged is None:
                break
            working += took
            slices += 1
            series += staged[0]
            rows += staged[1]
            # Size the next slice to take about SLICE_SECONDS.
            self._slice = max(50, min(50_000, int(self._slice * SLICE_SECONDS / max(took, 0.05))))
            if pacing is not None and pacing.share < 1:
                time.sleep(min(took * (1 / pacing.share - 1), max(0.0, (deadline or 0) - time.monotonic())))
        if deadline is not None and time.monotonic() > deadline:
            if slices:
                progress("is staged and is swapped in at the next pass")
            return False
        t = time.monotonic()
        swapped, outcome = self._swap(hour_ms)
        progress(outcome, time.monotonic() - t)
        return swapped

    def _stage_slice(self, hour_ms: int) -> tuple[int, int] | None:
        """Stage the next slice of the hour's series, or those whose chunks changed since they were staged.
        Returns (series, chunk rows) staged; None when the whole hour is staged."""
        with self.db.engine.begin() as conn:
            _tune(conn, work_mem="64MB")
            cur = driver_cursor(conn)
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('gpufleet_compaction'))")
            head = chunks.partition_name("sample_head", hour_ms)
            if head not in {name for name, _, _ in chunks.partitions(cur, "sample_head")}:
                return None  # another collector compacted it
            first = chunks.next_unstaged(cur, hour_ms)
            changed = [] if first is not None else chunks.unstage_changed(cur, hour_ms)
            if first is None and not changed:
                return None
            # A slice's rows are a few percent of the partition's pages (an agent's series are written
            # together): read them through the primary key, not with a scan of the whole partition.
            cur.execute("SET LOCAL enable_seqscan = off")
            if first is not None:
                return chunks.stage_series(cur, hour_ms, first=first, last=first + self._slice - 1)
            return chunks.stage_series(cur, hour_ms, ids=changed)

    def _swap(self, hour_ms: int) -> tuple[bool, str]:
        """Move the staged hour into ``sample_chunks`` and drop its head partition, in one transaction, so
        readers see either the one or the other. Whether the hour is done, and how it went, for the log."""
        head = chunks.partition_name("sample_head", hour_ms)
        self.partitions.ensure("sample_chunks", [hour_ms])
        try:
            with self.db.engine.begin() as conn:
                _tune(conn)
                cur = driver_cursor(conn)
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('gpufleet_compaction'))")
                if head not in {name for name, _, _ in chunks.partitions(cur, "sample_head")}:
                    return True, "was compacted by another collector"
                cur.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                moved = chunks.move_stage(cur, hour_ms)
                for attempt in range(SWAP_ATTEMPTS):
                    cur.execute("SAVEPOINT retire_head")
                    try:
                        if not chunks.hold_head(cur, hour_ms):
                            raise _Changed
                        cur.execute(f"DROP TABLE {head}")
                        cur.execute(f"DROP TABLE {chunks.compaction_stage(hour_ms)}")
                        break
                    except psycopg.errors.LockNotAvailable:
                        cur.execute("ROLLBACK TO SAVEPOINT retire_head")
                        if attempt + 1 < SWAP_ATTEMPTS:
                            time.sleep(1)
                else:
                    raise psycopg.errors.LockNotAvailable
        except _Changed:
            return False, "got late samples after its series were staged; they are staged at the next pass"
        except psycopg.errors.LockNotAvailable:
            return False, (
                f"is staged, but its partition stayed in use (lock wait over {LOCK_TIMEOUT_MS} ms, "
                f"{SWAP_ATTEMPTS} tries); it is swapped in at the next pass"
            )
        self.partitions.forget(head)
        return True, f"compacted ({moved} series) and its head partition dropped"

    # ---- retention ----------------------------------------------------------------------------------
    def _retention(self, now_ms: int) -> list[str]:
        """Drop what is older than its retention: whole partitions on PostgreSQL, rows on SQLite."""
        started = time.monotonic()
        r = self.retention
        plan = [
            ("sample_head", "samples", "ts", r.raw_ms),
            ("sample_chunks", "samples", "ts", r.raw_ms),
            ("rollup_1m", "rollup_1m", "bucket_ms", r.rollup_1m_ms),
            ("rollup_1h", "rollup_1h", "bucket_ms", r.rollup_1h_ms),
        ]
        dropped: list[str] = []
        busy: list[str] = []
        for partitioned, table, col, keep in plan:
            if keep is None:
                continue
            cutoff = now_ms - keep
            if self._pg:
                with self.db.engine.begin() as conn:
                    old = [p for p in chunks.partitions(driver_cursor(conn), partitioned) if p[2] <= cutoff]
                for name, _, _ in old:
                    if self._drop(name):
                        dropped.append(name)
                    else:
                        busy.append(name)
                if table != "samples":
                    continue
            with self.db.engine.begin() as conn:
                n = conn.execute(
                    text(f"DELETE FROM {table} WHERE {col} < :cutoff"), {"cutoff": cutoff}
                ).rowcount
            if n:
                dropped.append(f"{table}: {n} rows")
        if dropped or busy:
            log.info(
                "store maintenance: retention took %.2f s: dropped %s%s",
                time.monotonic() - started,
                ", ".join(dropped) or "nothing",
                f"; in use, dropped at the next pass: {', '.join(busy)}" if busy else "",
            )
        return dropped

    def _drop(self, name: str) -> bool:
        """Drop one partition, waiting at most ``LOCK_TIMEOUT_MS`` for its parent's lock (which writes to
        the parent queue behind). False: it is in use; the next pass tries again."""
        try:
            with self.db.engine.begin() as conn:
                cur: Any = driver_cursor(conn)
                cur.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                cur.execute(f"DROP TABLE {name}")
        except psycopg.errors.LockNotAvailable:
            return False
        self.partitions.forget(name)
        return True


_NONE = -(2**63)  # "not set", as an earlier version kept placeholder rows to lock

# SQLite needs "WHERE true" before ON CONFLICT in INSERT … SELECT (its parser's ambiguity with joins).
_UPSERT = (
    "ON CONFLICT (series_id, bucket_ms) DO UPDATE SET vmin = excluded.vmin, vmax = excluded.vmax, "
    "vsum = excluded.vsum, n = excluded.n"
)
