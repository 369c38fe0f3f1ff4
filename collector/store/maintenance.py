"""The store's periodic work: compaction (PostgreSQL chunks), 1-minute and 1-hour rollups, retention.

Each step keeps a watermark in ``store_state`` (done up to, in Unix ms). A write that brings samples
from behind a watermark lowers the matching ``*_dirty_from`` key in its own transaction, and the next
pass redoes that stretch, so late data (an agent replaying its spool after an outage) ends up in the
rollups too. Steps lock their state rows, so two collectors on one database take turns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypedDict

from sqlalchemy import text
from sqlalchemy.engine import Connection

from gpufleet.collector.store import chunks
from gpufleet.collector.store.chunks import DAY_MS, HOUR_MS
from gpufleet.collector.store.engine import LATE_MS, Database, Retention, driver_cursor
from gpufleet.collector.store.partitions import Partitions

log = logging.getLogger(__name__)

MINUTE_MS = 60_000


def _state(conn: Connection, pg: bool, *keys: str) -> dict[str, int]:
    """Read (and on PostgreSQL lock) the state rows of one step."""
    rows: Sequence[tuple[str, int]]
    if pg:
        conn.execute(
            text(
                "INSERT INTO store_state (key, value) SELECT k, :none FROM unnest(CAST(:keys AS text[])) k "
                "ON CONFLICT DO NOTHING"
            ),
            {"keys": list(keys), "none": _NONE},
        )
        rows = conn.execute(
            text("SELECT key, value FROM store_state WHERE key = ANY(:keys) ORDER BY key FOR UPDATE"),
            {"keys": list(keys)},
        ).all()
    else:
        # SQLite serialises writers: the transaction itself is the lock.
        rows = [(k, v) for k, v in conn.execute(text("SELECT key, value FROM store_state")) if k in keys]
    return {k: v for k, v in rows if v != _NONE}


_NONE = -(2**63)  # "not set" on PostgreSQL, where the rows exist to be locked


def _put(conn: Connection, key: str, value: int | None) -> None:
    conn.execute(text("DELETE FROM store_state WHERE key = :k"), {"k": key})
    if value is not None:  # absent means "not set" (a writer's least() must not meet a placeholder)
        conn.execute(text("INSERT INTO store_state (key, value) VALUES (:k, :v)"), {"k": key, "v": value})


def _start(state: dict[str, int], done_key: str, dirty_key: str) -> int | None:
    done, dirty = state.get(done_key), state.get(dirty_key)
    if done is None:
        return None
    return min(done, dirty) if dirty is not None else done


# SQLite needs "WHERE true" before ON CONFLICT in INSERT … SELECT (its parser's ambiguity with joins).
_UPSERT = (
    "ON CONFLICT (series_id, bucket_ms) DO UPDATE SET vmin = excluded.vmin, vmax = excluded.vmax, "
    "vsum = excluded.vsum, n = excluded.n"
)


class MaintenanceReport(TypedDict, total=False):
    hours_compacted: int  # PostgreSQL chunks only
    rolled_up_until: int  # Unix ms
    dropped: list[str]  # partitions dropped, and "table: N rows" deleted


class Maintenance:
    def __init__(self, db: Database, partitions: Partitions, retention: Retention) -> None:
        self.db = db
        self.partitions = partitions
        self.retention = retention

    def maintain(self, now_ms: int) -> MaintenanceReport:
        """One pass: compact closed hours, bring rollups up to date, enforce retention."""
        report = MaintenanceReport()
        if self.db.chunked:
            report["hours_compacted"] = self._compact((now_ms - LATE_MS) // HOUR_MS * HOUR_MS)
        report["rolled_up_until"] = self._rollups((now_ms - LATE_MS) // MINUTE_MS * MINUTE_MS)
        report["dropped"] = self._retention(now_ms)
        return report

    def _compact(self, target: int) -> int:
        """Compact every hour of ``sample_head`` that closed before ``target`` (late samples reopen an old
        hour as a new head partition; the next pass merges it too)."""
        hours = 0
        with self.db.engine.begin() as conn:
            cur = driver_cursor(conn)
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('gpufleet_compaction'))")
            for name, lower, upper in chunks.partitions(cur, "sample_head"):
                if upper > target:
                    continue
                self.partitions.ensure("sample_chunks", [lower], cur)
                chunks.compact_hour(cur, lower)
                self.partitions.forget(name)
                hours += 1
        return hours

    def _rollups(self, target: int) -> int:
        pg = self.db.dialect == "postgresql"
        with self.db.engine.begin() as conn:
            state = _state(conn, pg, "rollup_dirty_from", "rollup_until")
            lo = _start(state, "rollup_until", "rollup_dirty_from")
            if lo is None:
                lo = conn.execute(
                    text(
                        f"SELECT min(start_ms) FROM {chunks.ALL_CHUNKS} c"
                        if self.db.chunked
                        else "SELECT min(ts) FROM samples"
                    )
                ).scalar()
            if lo is not None and lo < target:
                lo = lo // MINUTE_MS * MINUTE_MS
                if pg:
                    self._rollup_partitions(conn, lo, target)
                self._rollup_minutes(conn, lo, target)
                self._rollup_hours(conn, lo // HOUR_MS * HOUR_MS, target)
            _put(conn, "rollup_until", target)
            _put(conn, "rollup_dirty_from", None)
        return target

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
            self.partitions.ensure(table, days, cur)

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

    def _retention(self, now_ms: int) -> list[str]:
        """Drop what is older than its retention: whole partitions on PostgreSQL, rows on SQLite."""
        r = self.retention
        plan = [
            ("sample_head", "samples", "ts", r.raw_ms),
            ("sample_chunks", "samples", "ts", r.raw_ms),
            ("rollup_1m", "rollup_1m", "bucket_ms", r.rollup_1m_ms),
            ("rollup_1h", "rollup_1h", "bucket_ms", r.rollup_1h_ms),
        ]
        dropped: list[str] = []
        with self.db.engine.begin() as conn:
            for partitioned, table, col, keep in plan:
                if keep is None:
                    continue
                cutoff = now_ms - keep
                if self.db.dialect == "postgresql":
                    cur = driver_cursor(conn)
                    for name, _, upper in chunks.partitions(cur, partitioned):
                        if upper <= cutoff:
                            cur.execute(f"DROP TABLE {name}")
                            self.partitions.forget(name)
                            dropped.append(name)
                    if table != "samples":
                        continue
                n = conn.execute(
                    text(f"DELETE FROM {table} WHERE {col} < :cutoff"), {"cutoff": cutoff}
                ).rowcount
                if n:
                    dropped.append(f"{table}: {n} rows")
        if dropped:
            log.info("retention: dropped %s", ", ".join(dropped))
        return dropped
