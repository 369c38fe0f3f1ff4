"""Long-range storage, on SQLite and on PostgreSQL: retries and late replays stored once, rollups that
long queries use and that late data corrects, retention by dropping partitions, views for Grafana."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import text

from gpufleet.collector.store import Store
from gpufleet.collector.store.store import Retention
from gpufleet.core.remote_write import Series

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_700_006_400_000  # a midnight (UTC), so day partitions line up with the test's days
METRIC = "gpufleet_gpu_sm_active_ratio"


def sm(uuid: str, samples) -> Series:
    return Series(
        {"__name__": METRIC, "node": "n1", "gpu": "0", "uuid": uuid, "model": "H100", "cluster": "c1"},
        list(samples),
    )


def values(store, uuid="GPU-1", start=T0, end=T0 + HOUR, step=1.0):
    res = store.query_range(METRIC, {"uuid": uuid}, start / 1000, end / 1000, step)
    return [v for _, v in res[0]["values"]] if res else []


def test_an_overlapping_retry_stores_only_what_is_new(store):
    store.write([sm("GPU-1", [(T0 + i * 1000, float(i)) for i in range(5)])])
    # The agent was unsure about the first batch and re-sent it together with newer samples.
    store.write([sm("GPU-1", [(T0 + i * 1000, float(i)) for i in range(3, 9)])])
    store.write([sm("GPU-1", [(T0 + i * 1000, float(i)) for i in range(0, 9)])])
    assert store.counts()["samples"] == 9
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT value FROM metric_samples ORDER BY time")).scalars().all()
    assert rows == [float(i) for i in range(9)]


def test_a_late_replay_between_stored_samples_fills_the_gap_once(store):
    store.write([sm("GPU-1", [(T0, 1.0), (T0 + 4000, 5.0)])])
    store.write([sm("GPU-1", [(T0 + 1000, 2.0), (T0 + 2000, 3.0), (T0 + 4000, 5.0)])])
    store.write([sm("GPU-1", [(T0 + 1000, 2.0), (T0 + 3000, 4.0)])])
    assert store.counts()["samples"] == 5
    assert values(store, start=T0, end=T0 + 4000) == [1.0, 2.0, 3.0, 4.0, 5.0]
    (p,) = store.latest(METRIC)
    assert (p.ts, p.value) == (T0 + 4000, 5.0)


def test_nan_and_staleness_markers_are_counted_not_stored(store):
    import struct

    stale = struct.unpack(">d", bytes.fromhex("7ff0000000000002"))[0]
    store.write(
        [sm("GPU-1", [(T0, 0.1 + 0.2), (T0 + 1000, math.nan), (T0 + 2000, stale), (T0 + 3000, -math.inf)])]
    )
    assert store.counts()["samples"] == 2
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM metric_samples ORDER BY time")).scalars().all() == [
            0.1 + 0.2,
            -math.inf,
        ]  # stored exactly, infinities included
    assert store.dropped == {"nan_value": 1, "staleness_marker": 1}


def _two_hours_every_10s(store, gpus=("GPU-1", "GPU-2")):
    for k, uuid in enumerate(gpus):
        for h in range(2):  # in batches of 5 minutes, as agents push
            for b in range(12):
                base = T0 + h * HOUR + b * 300_000
                store.write(
                    [sm(uuid, [(base + i * 10_000, (k + 1) * 0.1 + (i % 3) * 0.01) for i in range(30)])]
                )


def test_rollups_hold_min_avg_max_count_and_long_queries_use_them(store):
    _two_hours_every_10s(store)
    store.maintain(now_ms=T0 + 3 * HOUR)
    with store.engine.connect() as conn:
        one = conn.execute(
            text(
                "SELECT min, avg, max, count, node, uuid, model, cluster FROM metric_samples_1m "
                "WHERE uuid = 'GPU-1' ORDER BY time LIMIT 1"
            )
        ).one()
        minutes = conn.execute(text("SELECT count(*) FROM metric_samples_1m")).scalar()
        hours = conn.execute(text("SELECT uuid, count, avg FROM metric_samples_1h ORDER BY uuid, time")).all()
    # 6 samples a minute: values 0.10, 0.11, 0.12 twice each.
    assert one[0] == pytest.approx(0.10) and one[1] == pytest.approx(0.11) and one[2] == pytest.approx(0.12)
    assert tuple(one[3:]) == (6, "n1", "GPU-1", "H100", "c1")
    assert minutes == 2 * 120
    assert [(u, c) for u, c, _ in hours] == [("GPU-1", 360), ("GPU-1", 360), ("GPU-2", 360), ("GPU-2", 360)]
    # Twelve hours at 5-minute steps: answered from the 1-minute rollups, averages over each step.
    assert Store.resolution(T0 / 1000, T0 / 1000 + 12 * 3600, 300) == "1m"
    avg = values(store, start=T0 + 300_000, end=T0 + 12 * HOUR, step=300)
    assert len(avg) == 24 and all(v == pytest.approx(0.11) for v in avg)
    assert Store.resolution(T0 / 1000, T0 / 1000 + 7 * 86400, 3600) == "1h"
    hourly = values(store, uuid="GPU-2", start=T0 + HOUR, end=T0 + 7 * DAY, step=3600)
    assert hourly == [pytest.approx(0.21), pytest.approx(0.21)]


def test_late_samples_correct_rollups_already_computed(store):
    _two_hours_every_10s(store, gpus=("GPU-1",))
    store.maintain(now_ms=T0 + 3 * HOUR)
    # An agent back from an outage replays a spooled minute that was missing: here, one more sample.
    store.write([sm("GPU-1", [(T0 + 5_000, 0.5)])], now_ms=T0 + 3 * HOUR)
    store.maintain(now_ms=T0 + 3 * HOUR + 60_000)
    with store.engine.connect() as conn:
        first = conn.execute(text("SELECT count, max FROM metric_samples_1m ORDER BY time LIMIT 1")).one()
        hour = conn.execute(text("SELECT count FROM metric_samples_1h ORDER BY time LIMIT 1")).scalar()
    assert tuple(first) == (7, 0.5)
    assert hour == 361


def test_rollups_include_the_stretch_not_rolled_up_yet(store):
    _two_hours_every_10s(store, gpus=("GPU-1",))
    store.maintain(now_ms=T0 + HOUR)  # rolled up the first hour only (less the newest minutes)
    avg = values(store, start=T0 + 3600_000 * 0 + 600_000, end=T0 + 2 * HOUR + 5 * HOUR, step=600)
    assert len(avg) == 12 and all(v == pytest.approx(0.11) for v in avg)


def test_retention_drops_old_data_and_keeps_the_rest(db_url):
    store = Store.open(db_url, retention=Retention(raw_ms=2 * DAY, rollup_1m_ms=3 * DAY, rollup_1h_ms=None))
    try:
        for day in range(4):
            store.write([sm("GPU-1", [(T0 + day * DAY + i * 60_000, float(day)) for i in range(10)])])
        store.maintain(now_ms=T0 + 4 * DAY)
        with store.engine.connect() as conn:
            raw_days = (
                conn.execute(text("SELECT DISTINCT value FROM metric_samples ORDER BY 1")).scalars().all()
            )
            minute_days = (
                conn.execute(text("SELECT DISTINCT avg FROM metric_samples_1m ORDER BY 1")).scalars().all()
            )
            hour_days = (
                conn.execute(text("SELECT DISTINCT avg FROM metric_samples_1h ORDER BY 1")).scalars().all()
            )
            if store.dialect == "postgresql":
                parts = (
                    conn.execute(
                        text(
                            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'sample_chunks'"
                        )
                    )
                    .scalars()
                    .all()
                )
                assert sorted(parts) == [f"sample_chunks_p{(T0 + d * DAY) // DAY}" for d in (2, 3)]
        assert raw_days == [2.0, 3.0]
        assert minute_days == [1.0, 2.0, 3.0]
        assert hour_days == [0.0, 1.0, 2.0, 3.0]
        assert store.query_range(METRIC, {}, (T0 + 2 * DAY) / 1000, (T0 + 2 * DAY + 600_000) / 1000, 60)
    finally:
        store.close()


def test_compaction_merges_an_hour_of_pushes_into_one_row_per_series(pg_url):
    store = Store.open(pg_url)
    try:
        _two_hours_every_10s(store)
        before = store.counts()
        with store.engine.connect() as conn:
            view_before = conn.execute(
                text("SELECT uuid, time, value FROM metric_samples ORDER BY 1, 2")
            ).all()
        store.maintain(now_ms=T0 + 3 * HOUR)
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM sample_chunks")).scalar()
            view_after = conn.execute(
                text("SELECT uuid, time, value FROM metric_samples ORDER BY 1, 2")
            ).all()
        assert rows == 2 * 2  # two series, two hours
        assert store.counts() == before
        assert view_after == view_before
        # A retry after compaction still stores nothing twice.
        store.write([sm("GPU-1", [(T0 + i * 10_000, 0.1 + (i % 3) * 0.01) for i in range(30)])])
        assert store.counts() == before
    finally:
        store.close()
