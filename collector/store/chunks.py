"""PostgreSQL raw-sample layout: one row per series per stretch of time, written with COPY.

A write turns each series of a batch into one chunk row per hour it touches (COPY, binary format):
``dts`` are int4 deltas between timestamps (the first is 0, so sample i sits at
``start_ms + sum(dts[1..i])``) and ``vals`` the float8 values. The hourly compaction merges the chunks
of each series in a closed hour into one row, which TOAST compresses: a regular scrape's ``dts`` is a
run of equal numbers that all but disappears.
``gpufleet_points(start_ms, dts, vals)`` (migration 0002) expands a chunk back into (ts, value) rows.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
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


# COPY's binary format: a signature, flags and header extension length, then per row the field count
# and each field as length + data (arrays: dimensions, null flag, element type, length, lower bound, then
# each element as length + data), then -1 for the end.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_INT4_OID, _FLOAT8_OID = 23, 701
# Chunks of up to this many samples are packed by one cached ``struct`` each; longer ones (a backfill)
# are built in parts, so no format grows with what a client sends.
_PACKED_SAMPLES = 64
_ROW_FORMATS: dict[int, struct.Struct] = {}


def _row_format(n: int) -> struct.Struct:
    """series_id, start_ms, end_ms, dts (given as its encoded field), vals: a chunk row of ``n`` samples."""
    fmt = _ROW_FORMATS.get(n)
    if fmt is None:
        fmt = _ROW_FORMATS[n] = struct.Struct(f">hiiiqiq{24 + 8 * n}s6i" + "id" * n)
    return fmt


def binary_array(element_oid: int, code: str, items: Sequence[float]) -> bytes:
    """A one-dimensional array in PostgreSQL's binary format: the values are packed in one call and put
    behind their lengths a byte position at a time, so the work in Python does not grow with the array."""
    n = len(items)
    if not n:
        return struct.pack(">3i", 0, 0, element_oid)
    size = struct.calcsize(code)
    stride = 4 + size
    body = bytearray(n * stride)
    body[3::stride] = bytes([size]) * n  # each element's length, big-endian: 0 0 0 size
    packed = struct.pack(f">{n}{code}", *items)
    for k in range(size):
        body[4 + k :: stride] = packed[k::size]
    return struct.pack(">5i", 1, 0, element_oid, n, 1) + bytes(body)


def _field(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def _deltas(ts: Sequence[int]) -> list[int]:
    return [0, *(b - a for a, b in zip(ts, ts[1:], strict=False))]


def _row(sid: int, ts: Sequence[int], vs: Sequence[float]) -> bytes:
    """A chunk row of any length."""
    return (
        struct.pack(">hiiiqiq", 5, 4, sid, 8, ts[0], 8, ts[-1])
        + _field(binary_array(_INT4_OID, "i", _deltas(ts)))
        + _field(binary_array(_FLOAT8_OID, "d", vs))
    )


def copy_chunks(
    cur: Any, sids: Sequence[int], times: Sequence[list[int]], values: Sequence[Sequence[float]]
) -> None:
    """COPY one chunk row per series and hour into ``sample_head``, in binary: each row is one
    ``struct.pack`` (text COPY cost a ``repr`` per value here and a float parse per value in the
    database). ``times[i]``: series ``sids[i]``'s time-sorted, duplicate-free timestamps (empty: nothing
    to write); a chunk never spans two hours, so it never spans two day partitions either. Series
    sampled at the same instants share the encoding of their ``dts``."""
    parts = [_COPY_HEADER]
    add = parts.append
    last: list[int] = []
    packed = False
    fmt = _row_format(0)
    dts = b""
    n = 0
    for sid, ts, vs in zip(sids, times, values, strict=True):
        if not ts:
            continue
        if ts != last:
            last = ts
            n = len(ts)
            packed = n <= _PACKED_SAMPLES and ts[0] // HOUR_MS == ts[-1] // HOUR_MS
            if packed:
                fmt, dts = _row_format(n), _field(binary_array(_INT4_OID, "i", _deltas(ts)))
        if packed:
            elems: list[float] = [8] * (2 * n)
            elems[1::2] = vs
            add(fmt.pack(5, 4, sid, 8, ts[0], 8, ts[-1], dts, 20 + 12 * n, 1, 0, _FLOAT8_OID, n, 1, *elems))
            continue
        i = 0
        while i < len(ts):  # cut at hour boundaries
            hour_end = (ts[i] // HOUR_MS + 1) * HOUR_MS
            j = i
            while j < len(ts) and ts[j] < hour_end:
                j += 1
            add(_row(sid, ts[i:j], vs[i:j]))
            i = j
    if len(parts) == 1:
        return
    add(_COPY_TRAILER)
    with cur.copy(
        "COPY sample_head (series_id, start_ms, end_ms, dts, vals) FROM STDIN (FORMAT BINARY)"
    ) as cp:
        cp.write(b"".join(parts))


class _BinaryArray(bytes):
    """A one-dimensional array parameter already in PostgreSQL's binary format: psycopg's own list
    dumpers look at every element in Python (text format: a regular expression each)."""

    oid = 0
    element_oid = 0
    element = ""  # struct code

    @classmethod
    def of(cls, items: Sequence[float]) -> _BinaryArray:
        return cls(binary_array(cls.element_oid, cls.element, items))


class Int4Array(_BinaryArray):
    oid, element_oid, element = 1007, _INT4_OID, "i"


class Int8Array(_BinaryArray):
    oid, element_oid, element = 1016, 20, "q"


class Float8Array(_BinaryArray):
    oid, element_oid, element = 1022, _FLOAT8_OID, "d"


def _register_array_dumpers() -> None:
    """Teach psycopg to send the arrays above as they are, for every connection made from here on (the
    store's engines are made after this module is imported)."""
    try:
        import psycopg
        from psycopg.adapt import Dumper
        from psycopg.pq import Format
    except ImportError:  # pragma: no cover - SQLite-only installs
        return

    class BinaryArrayDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            return bytes(obj)

    for cls in (Int4Array, Int8Array, Float8Array):
        psycopg.adapters.register_dumper(
            cls, type(f"{cls.__name__}Dumper", (BinaryArrayDumper,), {"oid": cls.oid})
        )


_register_array_dumpers()


def partition_name(table: str, start_ms: int) -> str:
    width = PARTITIONED[table]
    return f"{table}_p{start_ms // width}"


def ensure_partitions(cur: Any, table: str, times_ms: Iterable[int], known: set[str]) -> list[str]:
    """Create the partitions that rows at ``times_ms`` need; the names created. Each is made as a table of
    its own and then attached: ATTACH PARTITION locks the parent in SHARE UPDATE EXCLUSIVE mode, which
    lets every read and write go on, where CREATE TABLE … PARTITION OF takes ACCESS EXCLUSIVE (it waits
    for every transaction on the table, and every new one waits behind it). Serialised by an advisory
    lock, so two collectors creating the same hour do not trip over each other."""
    width = PARTITIONED[table]
    have = {int(m.group(2)) for m in map(_PARTITION_NAME.match, known) if m and m.group(1) == table}
    wanted = {t // width for t in times_ms} - have
    if not wanted:
        return []
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('gpufleet_partitions'))")
    attached = {name for name, _, _ in partitions(cur, table)}
    created = []
    for k in sorted(wanted):
        name = f"{table}_p{k}"
        if name not in attached:
            cur.execute(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
            cur.execute(
                f"ALTER TABLE {table} ATTACH PARTITION {name} "
                f"FOR VALUES FROM ({k * width}) TO ({(k + 1) * width})"
            )
            created.append(name)
        known.add(name)
    return created


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


# Compaction of a closed hour of sample_head, in slices of series, each its own short transaction: a slice
# merges its series' chunks into one row each in the hour's stage table, which no reader sees; once every
# series is staged, one transaction moves the stage into sample_chunks and drops the hour's partition.
_STAGE_COLUMNS = "series_id, start_ms, end_ms, dts, vals, head_rows"


def compaction_stage(hour_ms: int) -> str:
    return f"sample_compact_p{hour_ms // HOUR_MS}"


def compaction_stages(cur: Any) -> list[tuple[str, int]]:
    """(name, hour) of every stage table, e.g. one a compaction left when its hour was dropped."""
    cur.execute(
        "SELECT relname FROM pg_class WHERE relname LIKE %s AND relkind = 'r'", ("sample\\_compact\\_p%",)
    )
    return sorted((name, int(name.rsplit("_p", 1)[1]) * HOUR_MS) for (name,) in cur.fetchall())


def next_unstaged(cur: Any, hour_ms: int) -> int | None:
    """The lowest series id of the hour not staged yet (slices go up in id order), None once all are."""
    head, stage = partition_name("sample_head", hour_ms), compaction_stage(hour_ms)
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {stage} (series_id integer PRIMARY KEY, start_ms bigint NOT NULL, "
        "end_ms bigint NOT NULL, dts integer[] NOT NULL, vals double precision[] NOT NULL, "
        "head_rows integer NOT NULL)"
    )
    cur.execute(
        f"SELECT min(series_id) FROM {head} "
        f"WHERE series_id > (SELECT coalesce(max(series_id), -1) FROM {stage})"
    )
    row = cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def stage_series(
    cur: Any, hour_ms: int, *, first: int = 0, last: int = 0, ids: Sequence[int] | None = None
) -> tuple[int, int]:
    """Merge the chunks each series (ids ``first``..``last``, or ``ids``) has in one closed hour of
    ``sample_head`` into one row in the hour's stage table, with the rows an earlier compaction left for
    the hour in ``sample_chunks`` when late samples reopened it. Returns (series, chunk rows) staged.

    A series whose chunks follow one another in time (as every series written as it was sampled) is merged
    by joining its chunks end to end: the first delta of each chunk becomes its distance from the previous
    chunk; nothing is sorted sample by sample. The others (chunks that interleave, a reopened hour) have
    their samples expanded, sorted and encoded again."""
    head, stage = partition_name("sample_head", hour_ms), compaction_stage(hour_ms)
    args: dict[str, Any]
    if ids is None:
        which, args = "series_id BETWEEN %(first)s AND %(last)s", {"first": first, "last": last}
    else:
        which, args = "series_id = ANY(%(ids)s)", {"ids": Int4Array.of(ids)}
    args |= {"h0": hour_ms, "h1": hour_ms + HOUR_MS}
    cur.execute(
        f"""
        SELECT series_id FROM (
            SELECT series_id, start_ms - lag(end_ms) OVER (PARTITION BY series_id ORDER BY start_ms) AS gap
            FROM {head} WHERE {which}) g
        WHERE gap <= 0
        UNION
        SELECT c.series_id FROM sample_chunks c WHERE c.{which} AND c.start_ms >= %(h0)s
          AND c.start_ms < %(h1)s AND EXISTS (SELECT 1 FROM {head} h WHERE h.series_id = c.series_id)""",
        args,
    )
    irregular = sorted(sid for (sid,) in cur.fetchall())
    # The aggregates take each series' rows in the order the subquery sorts them (a group or hash
    # aggregate adds rows to a group in input order), which is what joins the chunks in time order.
    cur.execute(
        f"""
        INSERT INTO {stage} ({_STAGE_COLUMNS})
        SELECT c.series_id, min(c.start_ms), max(c.end_ms),
               array_agg(CASE WHEN u.i = 1 THEN coalesce(c.gap, 0)::int ELSE u.d END), array_agg(u.v),
               count(*) FILTER (WHERE u.i = 1)
        FROM (SELECT series_id, start_ms, end_ms, dts, vals,
                     start_ms - lag(end_ms) OVER (PARTITION BY series_id ORDER BY start_ms) AS gap
              FROM {head} WHERE {which} AND series_id <> ALL(%(irregular)s)
              ORDER BY series_id, start_ms) c
        CROSS JOIN LATERAL unnest(c.dts, c.vals) WITH ORDINALITY AS u(d, v, i)
        GROUP BY c.series_id
        RETURNING head_rows""",
        {**args, "irregular": Int4Array.of(irregular)},
    )
    rows = [n for (n,) in cur.fetchall()]
    if irregular:
        cur.execute(
            f"""
            INSERT INTO {stage} ({_STAGE_COLUMNS})
            WITH src AS (
                SELECT series_id, start_ms, dts, vals, true AS head FROM {head} WHERE series_id = ANY(%(ids)s)
                UNION ALL
                SELECT series_id, start_ms, dts, vals, false FROM sample_chunks
                WHERE series_id = ANY(%(ids)s) AND start_ms >= %(h0)s AND start_ms < %(h1)s),
            ordered AS (
                SELECT c.series_id, p.ts, p.value,
                       (p.ts - lag(p.ts, 1, p.ts) OVER (PARTITION BY c.series_id ORDER BY p.ts))::int AS d
                FROM src c {POINTS})
            SELECT o.series_id, min(o.ts), max(o.ts), array_agg(o.d ORDER BY o.ts),
                   array_agg(o.value ORDER BY o.ts),
                   (SELECT count(*) FROM src s WHERE s.series_id = o.series_id AND s.head)
            FROM ordered o GROUP BY o.series_id
            RETURNING head_rows""",
            {**args, "ids": Int4Array.of(irregular)},
        )
        rows += [n for (n,) in cur.fetchall()]
    return len(rows), sum(rows)


def unstage_changed(cur: Any, hour_ms: int) -> list[int]:
    """Series whose chunks in the hour are not all staged (late samples came after their slice): their
    stage rows are removed, to be staged again. Returns their ids."""
    head, stage = partition_name("sample_head", hour_ms), compaction_stage(hour_ms)
    cur.execute(
        f"""
        DELETE FROM {stage} s USING (
            SELECT h.series_id FROM (SELECT series_id, count(*) AS n FROM {head} GROUP BY series_id) h
            LEFT JOIN {stage} st ON st.series_id = h.series_id
            WHERE st.head_rows IS DISTINCT FROM h.n) changed
        WHERE s.series_id = changed.series_id"""
    )
    cur.execute(
        f"SELECT h.series_id FROM (SELECT DISTINCT series_id FROM {head}) h "
        f"WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.series_id = h.series_id)"
    )
    return sorted(sid for (sid,) in cur.fetchall())


def move_stage(cur: Any, hour_ms: int) -> int:
    """Put the hour's staged rows in ``sample_chunks``, in place of the rows an earlier compaction left for
    these series in the hour. Returns the rows moved."""
    stage = compaction_stage(hour_ms)
    cur.execute(
        f"DELETE FROM sample_chunks c USING {stage} s WHERE c.series_id = s.series_id "
        "AND c.start_ms >= %s AND c.start_ms < %s",
        (hour_ms, hour_ms + HOUR_MS),
    )
    cur.execute(
        "INSERT INTO sample_chunks (series_id, start_ms, end_ms, dts, vals) "
        f"SELECT series_id, start_ms, end_ms, dts, vals FROM {stage}"
    )
    return int(cur.rowcount)


def hold_head(cur: Any, hour_ms: int) -> bool:
    """Stop writes to the hour's head partition until the transaction ends (late samples for the hour wait;
    reads and every other hour go on) and check that the stage holds every chunk row it has."""
    head, stage = partition_name("sample_head", hour_ms), compaction_stage(hour_ms)
    cur.execute(f"LOCK TABLE {head} IN SHARE MODE")
    cur.execute(f"SELECT (SELECT count(*) FROM {head}) = (SELECT coalesce(sum(head_rows), 0) FROM {stage})")
    row = cur.fetchone()
    return bool(row and row[0])
