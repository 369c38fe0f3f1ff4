"""Concurrent writes share transactions (group commit) and keep the store's promises: every acknowledged
batch is stored whole, a retried batch is stored once, and one batch the database refuses takes no
other batch down with it."""

from __future__ import annotations

import threading

import pytest

from gpufleet.collector.store import BatchRefused, Store, StoreUnavailable
from gpufleet.core.remote_write import Series


def batch(node: int, t0: int, seconds: int = 5, metric: str = "gpufleet_gpu_power_watts") -> list[Series]:
    return [
        Series(
            {"__name__": metric, "node": f"n{node}", "gpu": str(g), "uuid": f"GPU-{node}-{g}"},
            [(t0 + i * 1000, float(node * 100 + g + i)) for i in range(seconds)],
        )
        for g in range(8)
    ]


def test_concurrent_writers_store_every_batch_once_and_latest_is_the_newest(store):
    # 6 nodes x 4 pushes, every push sent twice (an agent retrying a batch it is unsure about), by 8 threads
    batches = [batch(node, push * 5000) for node in range(6) for push in range(4)] * 2
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        start.wait()
        for b in batches[k::8]:
            try:
                assert store.write(b) == 40
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counts() == {"series": 48, "samples": 6 * 4 * 40}
    newest = {p.labels["uuid"]: (p.ts, p.value) for p in store.latest("gpufleet_gpu_power_watts")}
    assert newest == {f"GPU-{n}-{g}": (19_000, float(n * 100 + g + 4)) for n in range(6) for g in range(8)}
    pts = store.query_range("gpufleet_gpu_power_watts", {"uuid": "GPU-3-5"}, 0, 19, 1)[0]["values"]
    assert pts == [[float(s), float(305 + s % 5)] for s in range(20)]


def test_batches_of_one_shared_transaction_keep_the_first_value_of_a_sample_sent_twice(store):
    first = [Series({"__name__": "m", "uuid": "GPU-1"}, [(1000, 1.0), (2000, 2.0)])]
    second = [Series({"__name__": "m", "uuid": "GPU-1"}, [(2000, 20.0), (3000, 30.0)])]
    assert store.write_many([first, second]) == [2, 2]
    assert store.counts() == {"series": 1, "samples": 3}
    assert store.query_range("m", {}, 1, 3, 1)[0]["values"] == [[1.0, 1.0], [2.0, 2.0], [3.0, 30.0]]
    assert [(p.ts, p.value) for p in store.latest("m")] == [(3000, 30.0)]


def test_a_batch_the_database_refuses_fails_alone_and_is_not_half_stored(pg_url):
    store = Store.open(pg_url)
    try:
        good1, good2 = batch(1, 0), batch(2, 0)
        # series.metric is varchar(200): PostgreSQL refuses the whole batch, after its first series went in
        bad = batch(3, 0) + [Series({"__name__": "x" * 201, "uuid": "GPU-3-9"}, [(0, 1.0)])]
        results = store.write_many([good1, bad, good2])
        assert results[0] == 40 and results[2] == 40
        # refused for what it holds (a 400 for its sender, not "retry later"), in words without SQL
        assert isinstance(results[1], BatchRefused)
        assert str(results[1]) == "a label value is longer than the store's column for it"
        assert store.counts() == {"series": 16, "samples": 80}
        assert {p.labels["node"] for p in store.latest()} == {"n1", "n2"}
        # the refused batch's good part, sent again on its own, is stored whole
        assert store.write(batch(3, 0)) == 40
        assert store.counts() == {"series": 24, "samples": 120}
    finally:
        store.close()


def test_every_batch_of_a_shared_transaction_fails_when_the_database_is_gone(tmp_path):
    store = Store.open(
        "postgresql://postgres@127.0.0.1:1/none", migrate_schema=False, connect_args={"connect_timeout": 2}
    )
    try:
        results = store.write_many([batch(1, 0), batch(2, 0)])
        assert all(isinstance(r, StoreUnavailable) and r.connection for r in results)
        with pytest.raises(StoreUnavailable):
            store.write(batch(1, 0))
    finally:
        store.close()
