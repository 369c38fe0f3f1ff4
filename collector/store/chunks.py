"""PostgreSQL raw-sample layout: one row per series per stretch of time, written with COPY.

A write turns each series of a batch into one chunk row per hour it touches: ``dts`` are int4 deltas
between timestamps (the first is 0, so sample i sits at ``start_ms + sum(dts[1..i])``) and ``vals`` the
float8 values. The hourly compaction merges the chunks of each series in a closed hour into one row,
which TOAST compresses: a regular scrape's ``dts`` is a run of equal numbers that all but disappears.
``gpufleet_points(start_ms, dts, vals)`` (migration 0002) expands a chunk back into (ts, value) rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
ROLLUP_1H_PARTITION_MS = 30 * DAY_MS

# (table, partition width) of every time-partitioned table on PostgreSQL.
PARTITIONED = {
    "sample_head": HOUR_MS,
    "sample_chunks": DAY_MS,
    "rollup_1m": DAY_MS,
    "rollup_1h": ROLLUP_1H_PARTITION_MS,
}
_PARTITION_NAME = re.compile(r"^(sample_head|sample_chunks|rollup_1m|rollup_1h)_p(\d+)$")

POINTS = "CROSS JOIN LATERAL gpufleet_points(c.start_ms, c.dts, c.vals) p"
# Every raw chunk: compacted hours and the hours still being written.
ALL_CHUNKS = "(SELECT * FROM sample_chunks UNION ALL SELECT * FROM sample_head)"


def chunk_rows(
    sid: int, points: Sequence[tuple[int, float]]
) -> Iterator[tuple[int, int, int, list[int], list[float]]]:
    """Rows for ``sample_chunks`` from time-sorted, duplicate-free points, cut at hour boundaries
    (a chunk never spans two hours, so it never spans two day partitions either)."""
    i, n = 0, len(points)
    while i < n:
        hour_end = (points[i][0] // HOUR_MS + 1) * HOUR_MS
        j = i
        while j < n and points[j][0] < hour_end:
            j += 1
        ts = [t for t, _ in points[i:j]]
        dts = [0] + [b - a for a, b in zip(ts, ts[1:], strict=False)]
        yield sid, ts[0], ts[-1], dts, [v for _, v in points[i:j]]
        i = j


def copy_chunks(cur: Any, rows: Iterable[tuple[int, int, int, list[int], list[float]]]) -> None:
    """COPY in text format, one buffer per batch: psycopg's array dumpers run per row in Python and cost
    more than the database's own parsing. ``repr`` of a float round-trips exactly (``inf`` included)."""
    buf = "".join(
        f"{sid}\t{start}\t{end}\t{{{','.join(map(str, dts))}}}\t{{{','.join(map(repr, vals))}}}\n"
        for sid, start, end, dts, vals in rows
    )
    with cur.copy("COPY sample_head (series_id, start_ms, end_ms, dts, vals) FROM STDIN") as cp:
        cp.write(buf)


def partition_name(table: str, start_ms: int) -> str:
    width = PARTITIONED[table]
    return f"{table}_p{start_ms // width}"


def ensure_partitions(cur: Any, table: str, times_ms: Iterable[int], known: set[str]) -> None:
    """Create the partitions that rows at ``times_ms`` need. Serialised by an advisory lock, so two
    collectors creating the same day do not trip over each other."""
    width = PARTITIONED[table]
    have = {int(m.group(2)) for m in map(_PARTITION_NAME.match, known) if m and m.group(1) == table}
    wanted = {t // width for t in times_ms} - have
    if not wanted:
        return
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('gpufleet_partitions'))")
    for k in sorted(wanted):
        name = f"{table}_p{k}"
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
            f"FOR VALUES FROM ({k * width}) TO ({(k + 1) * width})"
        )
        known.add(name)


def partitions(cur: Any, table: str) -> list[tuple[str, int, int]]:
    """(name, lower bound, upper bound) of every partition of ``table``, oldest first."""
    cur.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s",
        (table,),
    )
    width = PARTITIONED[table]
    out = []
    for (name,) in cur.fetchall():
        m = _PARTITION_NAME.match(name)
        if m and m.group(1) == table:
            k = int(m.group(2))
            out.append((name, k * width, (k + 1) * width))
    return sorted(out, key=lambda p: p[1])


def existing_timestamps(cur: Any, sids: list[int], lo: int, hi: int) -> set[tuple[int, int]]:
    """(series, ts) already stored for these series in [lo, hi]: the slow path for late or retried samples."""
    cur.execute(
        f"SELECT c.series_id, p.ts FROM {ALL_CHUNKS} c {POINTS} "
        "WHERE c.series_id = ANY(%s) AND c.start_ms <= %s AND c.start_ms >= %s AND c.end_ms >= %s "
        "AND p.ts BETWEEN %s AND %s",
        (sids, hi, lo - HOUR_MS, lo, lo, hi),
    )
    return set(cur.fetchall())


def compact_hour(cur: Any, hour_ms: int) -> int:
    """Merge one closed hour of ``sample_head`` into one row per series in ``sample_chunks`` (with what a
    previous pass already compacted there, when late samples reopened the hour), then drop the hour's
    partition. Returns the number of series rows written."""
    head = partition_name("sample_head", hour_ms)
    cur.execute(
        f"""
        WITH moved AS (
            DELETE FROM sample_chunks c WHERE c.start_ms >= %(h0)s AND c.start_ms < %(h1)s
              AND c.series_id IN (SELECT series_id FROM {head})
            RETURNING c.series_id, c.start_ms, c.dts, c.vals),
        pts AS (
            SELECT c.series_id, p.ts, p.value FROM (SELECT series_id, start_ms, dts, vals FROM {head}
                                                    UNION ALL SELECT * FROM moved) c {POINTS}),
        ordered AS (
            SELECT series_id, ts, value, (ts - lag(ts, 1, ts) OVER (PARTITION BY series_id ORDER BY ts))::int AS d
            FROM pts)
        INSERT INTO sample_chunks (series_id, start_ms, end_ms, dts, vals)
        SELECT series_id, min(ts), max(ts), array_agg(d ORDER BY ts), array_agg(value ORDER BY ts)
        FROM ordered GROUP BY series_id""",
        {"h0": hour_ms, "h1": hour_ms + HOUR_MS},
    )
    n = cur.rowcount
    cur.execute(f"DROP TABLE {head}")
    return n
