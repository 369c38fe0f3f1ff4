"""The collector's ingest path at fleet rate: every way a remote-write client lays out a series is read
as the protobuf runtime reads it and stored as sent; label sets are checked once and a refused one stays
refused; retries and replays that race each other store every sample once."""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator

import cramjam
import psycopg
import pytest
import urllib3
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.collector.store import Store
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until

HOUR_MS = 3_600_000
# Two hours ago, 12 minutes into the hour: within the collector's window, and a 6-byte varint as every
# time a live fleet sends.
NOW_MS = (int(time.time() * 1000) // HOUR_MS - 2) * HOUR_MS + 12 * 60_000

label_value = st.text(max_size=300)
value = st.one_of(
    st.just(0.0),  # left out by encoders: a sample of the time alone
    st.just(-0.0),
    st.floats(allow_nan=True, allow_infinity=True),
)
timestamp = st.one_of(
    st.integers(NOW_MS - HOUR_MS, NOW_MS + HOUR_MS),
    st.integers(-(2**62), 2**62),
    st.just(0),
)


@st.composite
def requests(draw):
    """Series as agents send them (many sampled at the same instants) mixed with odd ones."""
    # up to 70 instants: a backfill's long series too
    shared = draw(st.lists(st.integers(NOW_MS, NOW_MS + 600_000), min_size=1, max_size=70, unique=True))
    out = []
    for i in range(draw(st.integers(1, 12))):
        labels = {"__name__": f"m{i % 3}", "uuid": f"GPU-{i}", "long": draw(label_value)}
        times = sorted(shared) if draw(st.booleans()) else draw(st.lists(timestamp, max_size=6))
        out.append(rw.Series(labels, [(t, draw(value)) for t in times]))
    return out


def by_the_protobuf_runtime(body: bytes) -> list[tuple[dict[str, str], list[int], list[bytes]]]:
    msg = rw.WriteRequestMessage()
    msg.ParseFromString(bytes(cramjam.snappy.decompress_raw(body)))
    return [
        (
            {lab.name: lab.value for lab in ts.labels},
            [s.timestamp for s in ts.samples],
            [struct.pack("<d", s.value) for s in ts.samples],  # bits: NaN and -0.0 compare as they are
        )
        for ts in msg.timeseries
    ]


def as_decoded(batch: rw.SeriesBatch) -> list[tuple[dict[str, str], list[int], list[bytes]]]:
    return [
        (ls.labels, list(ts), [struct.pack("<d", v) for v in vs])
        for ls, ts, vs in zip(batch.label_sets, batch.timestamps, batch.values, strict=True)
    ]


@given(requests())
@settings(max_examples=300, deadline=None)
def test_the_receiver_reads_every_layout_as_the_protobuf_runtime_does(series):
    body = rw.encode(series)
    known = rw.KnownLabelSets()
    first = rw.decode_batch(body, known=known)
    assert as_decoded(first) == by_the_protobuf_runtime(body)
    known.admit(first.new)
    again = rw.decode_batch(body, known=known)  # labels known now: looked up, not decoded
    assert again.new == {}
    assert as_decoded(again) == by_the_protobuf_runtime(body)


def raw_request(*series: bytes) -> bytes:
    body = b"".join(b"\x0a" + rw._varint(len(s)) + s for s in series)
    return bytes(cramjam.snappy.compress_raw(body))


def sample(*fields: bytes) -> bytes:
    inner = b"".join(fields)
    return b"\x12" + rw._varint(len(inner)) + inner


def value_field(v: float) -> bytes:
    return b"\x09" + struct.pack("<d", v)


def time_field(t: int) -> bytes:
    return b"\x10" + rw._varint(t)


LABEL = rw.LabelSet.of({"__name__": "m"}).key


def test_a_sample_whose_fields_repeat_is_read_as_protobuf_reads_it():
    # 25 + 7 bytes: as long as two regular samples, but the value field of the first comes twice (the
    # last one counts) and the second has no value (0)
    body = raw_request(
        LABEL
        + sample(value_field(1.0), time_field(NOW_MS), value_field(2.0))
        + sample(time_field(NOW_MS + 1000))
    )
    batch = rw.decode_batch(body)
    assert as_decoded(batch) == by_the_protobuf_runtime(body)
    assert batch.values == [[2.0, 0.0]]


def test_labels_sent_after_the_samples_belong_to_the_series():
    node = rw.LabelSet.of({"node": "n1"}).key
    body = raw_request(LABEL + sample(value_field(1.0), time_field(NOW_MS)) + node)
    batch = rw.decode_batch(body)
    assert batch.label_sets[0].labels == {"__name__": "m", "node": "n1"}
    assert as_decoded(batch) == by_the_protobuf_runtime(body)


@pytest.fixture
def collector(db_url) -> Iterator[tuple[Collector, str]]:
    port = free_port()
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{port}", db=db_url, eval_interval=60)).start()
    yield c, f"http://127.0.0.1:{port}/api/v1/write"
    c.close()


def post(url: str, body: bytes) -> int:
    headers = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"}
    return urllib3.request("POST", url, body=body, headers=headers).status


def points(store: Store, uuid: str, start_ms: int, end_ms: int) -> list[tuple[int, float]]:
    (series,) = store.query_range("m", {"uuid": uuid}, start_ms / 1000, end_ms / 1000, 1)
    return [(round(t * 1000), v) for t, v in series["values"]]


def test_what_an_agent_sends_in_every_layout_is_what_the_store_returns(collector):
    c, url = collector
    hour = (NOW_MS // HOUR_MS + 1) * HOUR_MS
    sent = {
        "regular": [(NOW_MS + i * 1000, 0.5 + i) for i in range(5)],
        "zeros": [(NOW_MS + i * 1000, 0.0) for i in range(5)],
        "mixed": [(NOW_MS + i * 1000, float(i % 2)) for i in range(5)],
        "odd-values": [(NOW_MS, float("inf")), (NOW_MS + 1000, -0.0), (NOW_MS + 2000, -1e300)],
        "across-an-hour": [(hour - 2000, 1.0), (hour - 1000, 2.0), (hour, 3.0), (hour + 1000, 4.0)],
        "backfill": [(hour - 100_000 + i * 1000, i / 7) for i in range(200)],
    }
    series = [rw.Series({"__name__": "m", "uuid": uuid, "pod": "p" * 200}, pts) for uuid, pts in sent.items()]
    assert post(url, rw.encode(series)) == 204
    for uuid, pts in sent.items():
        assert points(c.store, uuid, pts[0][0], pts[-1][0]) == pts, uuid
    newest = {p.labels["uuid"]: (p.ts, p.value) for p in c.store.latest("m")}
    assert newest == {uuid: pts[-1] for uuid, pts in sent.items()}
    # times from 1970 (short varints, parsed as a message) are outside the window the collector takes
    old = [rw.Series({"__name__": "m", "uuid": "old-times"}, [(5000, 1.0), (6000, 2.0)])]
    assert post(url, rw.encode(old)) == 400


def test_a_series_refused_for_its_labels_stays_refused(collector):
    c, url = collector
    bad = [rw.Series({"__name__": "m", "bad-name": "x", "uuid": "GPU-1"}, [(NOW_MS, 1.0)])]
    good = [rw.Series({"__name__": "m", "uuid": "GPU-1"}, [(NOW_MS, 1.0)])]
    assert post(url, rw.encode(bad)) == 400
    assert post(url, rw.encode(bad + good)) == 400  # not admitted by the first refusal's decoding
    assert post(url, rw.encode(good)) == 204
    assert post(url, rw.encode(good + bad)) == 400
    assert c.store.counts()["samples"] == 1


def test_retries_and_replays_through_http_store_each_sample_once(collector):
    c, url = collector
    first = [rw.Series({"__name__": "m", "uuid": "GPU-1"}, [(NOW_MS + i * 1000, float(i)) for i in range(5)])]
    overlap = [
        rw.Series({"__name__": "m", "uuid": "GPU-1"}, [(NOW_MS + i * 1000, 10.0 + i) for i in range(3, 8)])
    ]
    for body in (first, overlap, first, overlap):
        assert post(url, rw.encode(body)) == 204
    # what came first wins a timestamp; the newest is the overlap's last
    assert points(c.store, "GPU-1", NOW_MS, NOW_MS + 7000) == [
        *((NOW_MS + i * 1000, float(i)) for i in range(5)),
        *((NOW_MS + i * 1000, 10.0 + i) for i in range(5, 8)),
    ]
    assert [(p.ts, p.value) for p in c.store.latest("m")] == [(NOW_MS + 7000, 17.0)]


def test_one_batch_retried_by_many_at_once_is_stored_once(pg_url):
    # Concurrent transactions on the same series: each finds the others' samples once they commit.
    store = Store.open(pg_url)
    try:
        batch = [
            rw.Series(
                {"__name__": "m", "uuid": f"GPU-{g}"}, [(NOW_MS + i * 1000, float(g + i)) for i in range(5)]
            )
            for g in range(64)
        ]
        assert store.write(batch) == 320  # the first push; then eight retries of the next one at once
        retried = [rw.Series(s.labels, [(t + 5000, v) for t, v in s.samples]) for s in batch]
        start = threading.Barrier(8)
        results: list[int | BaseException] = []

        def agent() -> None:
            start.wait()
            try:
                results.append(store.write(retried))
            except BaseException as exc:  # noqa: BLE001 - reported below
                results.append(exc)

        threads = [threading.Thread(target=agent) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [320] * 8
        assert store.counts() == {"series": 64, "samples": 640}
        newest = {p.labels["uuid"]: (p.ts, p.value) for p in store.latest("m")}
        assert newest == {f"GPU-{g}": (NOW_MS + 9000, float(g + 4)) for g in range(64)}
    finally:
        store.close()


def waiting_on_a_lock(conn, n: int) -> None:
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            >= n
        ),
        timeout=10,
    )


def test_a_write_that_loses_a_deadlock_is_written_again(pg_url, caplog):
    # Another session holds one series' row and then wants the other, which the write already holds:
    # PostgreSQL aborts one of the two; a write that loses is written again once the session is done.
    caplog.set_level(logging.INFO, logger="gpufleet.collector.store.ingest")
    store = Store.open(pg_url)
    try:
        pair = [rw.Series({"__name__": "m", "uuid": u}, [(NOW_MS, 1.0)]) for u in ("GPU-a", "GPU-b")]
        assert store.write(pair) == 2
        later = [rw.Series(s.labels, [(NOW_MS + 1000, 2.0)]) for s in pair]
        with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as watcher:
            first, second = [r[0] for r in watcher.execute("SELECT id FROM series ORDER BY id").fetchall()]
        with (
            psycopg.connect(pg_url.replace("+psycopg", "")) as other,
            psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as watcher,
        ):
            other.execute("SELECT 1 FROM latest WHERE series_id = %s FOR UPDATE", (second,))
            result: list[int] = []
            writer = threading.Thread(target=lambda: result.append(store.write(later)))
            writer.start()
            waiting_on_a_lock(watcher, 1)
            try:
                other.execute("SELECT 1 FROM latest WHERE series_id = %s FOR UPDATE", (first,))
                other_lost = False
            except psycopg.errors.DeadlockDetected:
                other_lost = True
            other.rollback()
            writer.join(timeout=30)
        assert other_lost or "deadlock victim" in caplog.text
        assert result == [2]
        assert sorted((p.ts, p.value) for p in store.latest("m")) == [(NOW_MS + 1000, 2.0)] * 2
        assert store.counts()["samples"] == 4
    finally:
        store.close()
