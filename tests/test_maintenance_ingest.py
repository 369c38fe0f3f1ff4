"""The store's maintenance never holds ingest up: a long reader on the raw samples (a Grafana query, a
backup) makes compaction wait and try again later instead of queueing a lock every write then queues
behind; the next hour's partition is there before the hour starts, and creating one never waits on readers
or writers. Compaction in slices loses nothing: not late samples that arrive while an hour is being
compacted, nor those that reopen an hour already compacted, nor chunks that interleave in time."""

from __future__ import annotations

import random
import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from gpufleet.collector.store import Store, chunks
from gpufleet.core.remote_write import Series
from tests.conftest import wait_until

pytestmark = pytest.mark.postgres

MINUTE = 60_000
HOUR = 60 * MINUTE
T0 = 1_700_006_400_000  # a midnight (UTC)


def power(uuid: str, samples) -> Series:
    return Series(
        {"__name__": "gpufleet_gpu_power_watts", "node": "n1", "gpu": "0", "uuid": uuid},
        list(samples),
    )


def write_hour(store: Store, uuids=("GPU-a", "GPU-b", "GPU-c"), hour: int = T0) -> None:
    """An hour at one sample every 10 s, pushed in batches of a minute, as agents do."""
    for m in range(60):
        base = hour + m * MINUTE
        store.write(
            [
                power(u, [(base + i * 10_000, float(k * 100 + m + i)) for i in range(6)])
                for k, u in enumerate(uuids)
            ]
        )


def stored(store: Store) -> list[tuple[str, int, float]]:
    with store.engine.connect() as conn:
        return [
            (u, int(t), v)
            for u, t, v in conn.execute(
                text(
                    "SELECT uuid, (extract(epoch FROM time) * 1000)::int8, value FROM metric_samples ORDER BY 1, 2"
                )
            )
        ]


def head_partitions(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return [
            name
            for name, _, _ in chunks.partitions(conn.connection.driver_connection.cursor(), "sample_head")
        ]


class Reader:
    """Another client in the middle of a long read of the raw samples: it holds its lock on
    ``sample_head`` (and the partitions it read) until it ends."""

    def __init__(self, pg_url: str) -> None:
        self.url = pg_url.replace("postgresql+psycopg://", "postgresql://")
        self.conn = psycopg.connect(self.url)
        self.conn.execute("SELECT count(*) FROM sample_head").fetchone()
        self.pid = self.conn.info.backend_pid

    def holding(self) -> bool:
        with psycopg.connect(self.url) as c:
            return bool(
                c.execute(
                    "SELECT 1 FROM pg_locks l JOIN pg_class r ON r.oid = l.relation "
                    "WHERE l.pid = %s AND r.relname = 'sample_head' AND l.granted",
                    (self.pid,),
                ).fetchone()
            )

    def end(self) -> None:
        self.conn.rollback()
        self.conn.close()


def waiting_for(pg_url: str, table: str, mode: str | None = None) -> bool:
    """Whether some backend waits for a lock (``mode``, or any) on ``table`` right now."""
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as c:
        return bool(
            c.execute(
                "SELECT 1 FROM pg_locks l JOIN pg_class r ON r.oid = l.relation "
                "WHERE r.relname = %s AND NOT l.granted AND l.mode = coalesce(%s, l.mode)",
                (table, mode),
            ).fetchone()
        )


class Background:
    def __init__(self, fn) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # reported by the test
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def test_a_long_reader_makes_compaction_wait_not_the_writers(pg_url):
    store = Store.open(pg_url)
    reader = None
    try:
        write_hour(store)
        store.write([power("GPU-a", [(T0 + HOUR, 1.0)])])  # the next hour has begun
        before = stored(store)
        reader = Reader(pg_url)
        compaction = Background(lambda: store.maintain(now_ms=T0 + HOUR + 3 * MINUTE))
        # Compaction has staged the closed hour and now wants the lock that drops its partition, which the
        # reader holds; a write that comes now must not queue behind that request until the reader ends.
        assert wait_until(
            lambda: waiting_for(pg_url, "sample_head", "AccessExclusiveLock") or compaction.done, 60
        )
        write = Background(lambda: store.write([power("GPU-a", [(T0 + HOUR + 1000, 2.0)])]))
        assert wait_until(lambda: write.done, 60), "a write waited behind compaction's lock on the reader"
        assert write.error is None
        assert reader.holding()
        # Compaction gave the hour up for now rather than wait for the reader: the pass ends, the hour stays.
        assert wait_until(lambda: compaction.done, 60)
        assert compaction.error is None and compaction.result["hours_compacted"] == 0
        assert chunks.partition_name("sample_head", T0) in head_partitions(store)
        assert stored(store) == sorted([*before, ("GPU-a", T0 + HOUR + 1000, 2.0)])
        reader.end()
        reader = None
        # Once the reader is gone the next pass compacts it: one row per series, every sample as it was.
        assert store.maintain(now_ms=T0 + HOUR + 4 * MINUTE)["hours_compacted"] == 1
        assert chunks.partition_name("sample_head", T0) not in head_partitions(store)
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM sample_chunks")).scalar() == 3
        assert stored(store) == sorted([*before, ("GPU-a", T0 + HOUR + 1000, 2.0)])
    finally:
        if reader is not None:
            reader.end()
        store.close()


def test_the_next_hours_partition_is_made_ahead_and_its_first_write_waits_on_no_reader(pg_url):
    store = Store.open(pg_url)
    reader = None
    try:
        store.write([power("GPU-a", [(T0 + 50 * MINUTE, 1.0)])])
        store.maintain(now_ms=T0 + 50 * MINUTE)
        assert chunks.partition_name("sample_head", T0 + HOUR) in head_partitions(store)
        reader = Reader(pg_url)
        write = Background(lambda: store.write([power("GPU-a", [(T0 + HOUR, 2.0)])]))
        assert wait_until(lambda: write.done, 60), "the first write of the hour waited on the reader"
        assert write.error is None
    finally:
        if reader is not None:
            reader.end()
        store.close()


def test_a_write_that_needs_a_new_partition_creates_it_without_waiting_on_readers_or_writers(pg_url):
    store = Store.open(pg_url)
    reader = None
    open_write = None
    try:
        store.write([power("GPU-a", [(T0, 1.0)])])
        reader = Reader(pg_url)
        # Another writer in the middle of its transaction, on the current hour.
        open_write = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"))
        open_write.execute(
            "INSERT INTO sample_head SELECT series_id, %s, %s, '{0}', '{3.0}' FROM latest",
            (T0 + 5000, T0 + 5000),
        )
        # No maintenance pass has run: the write makes the hour's partition itself.
        write = Background(lambda: store.write([power("GPU-a", [(T0 + 5 * HOUR, 2.0)])]))
        assert wait_until(lambda: write.done, 60), "creating a partition waited on a reader or a writer"
        assert write.error is None
        assert chunks.partition_name("sample_head", T0 + 5 * HOUR) in head_partitions(store)
    finally:
        if open_write is not None:
            open_write.rollback()
            open_write.close()
        if reader is not None:
            reader.end()
        store.close()


def test_late_samples_that_arrive_while_an_hour_is_being_compacted_are_kept(pg_url):
    store = Store.open(pg_url)
    try:
        write_hour(store, uuids=("GPU-a", "GPU-b"))
        # A pass staged the hour's series and stopped there (its budget was spent) ...
        with store.engine.begin() as conn:
            cur = conn.connection.driver_connection.cursor()
            first = chunks.next_unstaged(cur, T0)
            assert chunks.stage_series(cur, T0, first=first, last=first + 1000) == (2, 120)
        # ... then an agent replays its spool: samples for that hour, between ones already staged.
        late = [power("GPU-b", [(T0 + 5_000, -1.0), (T0 + 45 * MINUTE + 5_000, -2.0)])]
        store.write(late, now_ms=T0 + HOUR + 5 * MINUTE)
        expected = stored(store)
        assert ("GPU-b", T0 + 5_000, -1.0) in expected
        assert store.maintain(now_ms=T0 + HOUR + 5 * MINUTE)["hours_compacted"] == 1
        assert stored(store) == expected
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM sample_chunks")).scalar() == 2
            assert conn.execute(text("SELECT count(*) FROM sample_head")).scalar() == 0
    finally:
        store.close()


def test_compaction_keeps_every_sample_of_reopened_hours_and_interleaved_chunks(pg_url):
    store = Store.open(pg_url)
    try:
        rng = random.Random(7)
        # GPU-a: jittered intervals, so the joined chunks' deltas differ from chunk to chunk.
        ts, t = [], T0
        while t < T0 + HOUR:
            ts.append(t)
            t += rng.randrange(500, 20_000)
        for i in range(0, len(ts), 7):
            store.write([power("GPU-a", [(x, rng.uniform(0, 700)) for x in ts[i : i + 7]])])
        # GPU-b: two batches whose samples interleave in time (an agent's spool replayed beside live pushes).
        store.write([power("GPU-b", [(T0 + k * 2000, float(k)) for k in range(0, 30, 2)])])
        store.write(
            [power("GPU-b", [(T0 + k * 2000, float(k)) for k in range(1, 30, 2)])], now_ms=T0 + 61_000
        )
        expected = stored(store)
        assert store.maintain(now_ms=T0 + HOUR + 3 * MINUTE)["hours_compacted"] == 1
        assert stored(store) == expected
        # Late samples reopen the compacted hour; the next pass merges them with what it compacted before.
        store.write([power("GPU-b", [(T0 + 61_000, 61.0), (T0 + 30 * MINUTE, 62.0)])], now_ms=T0 + 2 * HOUR)
        store.write([power("GPU-a", [(T0 + HOUR - 1, 63.0)])], now_ms=T0 + 2 * HOUR)
        expected = stored(store)
        assert store.maintain(now_ms=T0 + 2 * HOUR)["hours_compacted"] == 1
        assert stored(store) == expected
        with store.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT count(*), count(DISTINCT series_id) FROM sample_chunks WHERE start_ms < :h"),
                {"h": T0 + HOUR},
            ).one()
        assert tuple(rows) == (2, 2)  # one row per series for the hour
        # A retry of what was compacted stores nothing twice.
        store.write([power("GPU-a", [(x, 0.0) for x in ts[:5]])], now_ms=T0 + 2 * HOUR)
        assert stored(store) == expected
    finally:
        store.close()


def test_a_late_write_does_not_wait_for_a_rollup_being_computed(pg_url):
    store = Store.open(pg_url)
    blocker = None
    try:
        now = T0 + 30 * MINUTE
        store.write([power("GPU-a", [(T0 + i * 10_000, 100.0) for i in range(60)])], now_ms=T0 + 10 * MINUTE)
        store.maintain(now_ms=now)  # rolled up to now - 2 min
        store.write([power("GPU-a", [(now + i * 10_000, 200.0) for i in range(6)])], now_ms=now + MINUTE)
        # The next pass gets stuck half-way through its rollup: another client holds the hourly rollups.
        blocker = psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"))
        blocker.execute("LOCK TABLE rollup_1h IN ACCESS EXCLUSIVE MODE")
        rollup = Background(lambda: store.maintain(now_ms=now + 4 * MINUTE))
        assert wait_until(lambda: waiting_for(pg_url, "rollup_1h") or rollup.done, 60)
        assert not rollup.done
        # An agent replays its spool meanwhile: samples from behind the rollups' watermark.
        late = Background(
            lambda: store.write([power("GPU-b", [(T0 + 5 * MINUTE, 50.0)])], now_ms=now + 4 * MINUTE)
        )
        assert wait_until(lambda: late.done, 60), "a late write waited for the rollup being computed"
        assert late.error is None
        blocker.rollback()
        assert wait_until(lambda: rollup.done, 60) and rollup.error is None
        # The late sample reaches the rollups at the next pass.
        store.maintain(now_ms=now + 5 * MINUTE)
        with store.engine.connect() as conn:
            got = conn.execute(
                text(
                    "SELECT avg, count FROM metric_samples_1m WHERE uuid = 'GPU-b' AND time = to_timestamp(:t)"
                ),
                {"t": (T0 + 5 * MINUTE) / 1000},
            ).one()
        assert tuple(got) == (50.0, 1)
    finally:
        if blocker is not None:
            blocker.close()
        store.close()
