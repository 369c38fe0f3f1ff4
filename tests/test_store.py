"""The store, on SQLite and on PostgreSQL: batches whole or not at all, retries stored once, reads right."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from gpufleet.collector.rules.state import SqlAlertState
from gpufleet.collector.store import Store, StoreUnavailable
from gpufleet.collector.store.migrate import SchemaTooNew, head_revisions
from gpufleet.core.remote_write import Series


def gpu_series(
    uuid="GPU-1", node="n1", gpu="0", metric="gpufleet_gpu_temperature_celsius", samples=((1000, 40.0),)
):
    return Series(
        {"__name__": metric, "node": node, "gpu": gpu, "uuid": uuid, "model": "H100"}, list(samples)
    )


def test_a_retried_batch_is_stored_once(store):
    batch = [
        gpu_series(samples=[(1000, 40.0), (2000, 41.0)]),
        gpu_series(uuid="GPU-2", samples=[(1000, 50.0)]),
    ]
    store.write(batch)
    store.write(batch)
    assert store.counts() == {"series": 2, "samples": 3}


def test_query_range_steps_through_time_with_the_newest_value_at_each_step(store):
    store.write([gpu_series(samples=[(10_000, 40.0), (20_000, 42.0), (30_000, 44.0)])])
    store.write([gpu_series(uuid="GPU-2", samples=[(10_000, 60.0)])])
    res = store.query_range("gpufleet_gpu_temperature_celsius", {"uuid": "GPU-1"}, 10, 40, 10)
    assert len(res) == 1
    assert res[0]["metric"]["uuid"] == "GPU-1"
    assert res[0]["values"] == [[10.0, 40.0], [20.0, 42.0], [30.0, 44.0], [40.0, 44.0]]
    both = store.query_range("gpufleet_gpu_temperature_celsius", {}, 10, 10, 10)
    assert sorted(r["metric"]["uuid"] for r in both) == ["GPU-1", "GPU-2"]


def test_query_range_does_not_invent_values_older_than_five_minutes(store):
    store.write([gpu_series(samples=[(0, 40.0)])])
    res = store.query_range("gpufleet_gpu_temperature_celsius", {}, 0, 600, 300)
    assert res[0]["values"] == [[0.0, 40.0]]


def test_gpus_lists_each_gpu_with_identity_last_seen_and_latest_values(store):
    store.write(
        [
            gpu_series(samples=[(1000, 40.0), (5000, 45.0)]),
            gpu_series(metric="gpufleet_gpu_up", samples=[(5000, 1.0)]),
            gpu_series(uuid="GPU-2", gpu="1", metric="gpufleet_gpu_up", samples=[(3000, 0.0)]),
        ]
    )
    gpus = [g.to_api() for g in store.gpus(now_ms=6000)]
    assert [g["uuid"] for g in gpus] == ["GPU-1", "GPU-2"]
    g1 = gpus[0]
    assert (g1["node"], g1["gpu"], g1["model"], g1["last_seen"], g1["up"]) == ("n1", "0", "H100", 5.0, True)
    assert g1["values"]["gpufleet_gpu_temperature_celsius"] == 45.0
    assert gpus[1]["up"] is False


def test_latest_keeps_the_newest_even_when_an_old_batch_arrives_late(store):
    store.write([gpu_series(samples=[(5000, 45.0)])])
    store.write([gpu_series(samples=[(1000, 40.0)])])  # a spooled batch replayed late
    (p,) = store.latest("gpufleet_gpu_temperature_celsius")
    assert (p.ts, p.value) == (5000, 45.0)


def test_a_failed_batch_leaves_nothing_behind(store):
    store.write([gpu_series(samples=[(1000, 40.0)])])
    bad = [gpu_series(uuid="GPU-9", samples=[(1000, 1.0)]), gpu_series(samples=[(2000, float("nan"))])]
    # Make the second statement of the transaction fail: drop the latest table under the store.
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE latest RENAME TO latest_gone"))
    with pytest.raises(StoreUnavailable):
        store.write(bad)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE latest_gone RENAME TO latest"))
    assert store.counts() == {"series": 1, "samples": 1}


def test_schema_migrates_on_open_and_a_newer_schema_is_refused(db_url):
    s = Store.open(db_url)
    with s.engine.begin() as conn:
        assert (
            tuple(sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()))
            == head_revisions()
        )
        conn.execute(text("DELETE FROM alembic_version"))  # every head, replaced by one this code never saw
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('9999_from_the_future')"))
    s.close()
    with pytest.raises(SchemaTooNew, match="newer than this gpufleet knows"):
        Store.open(db_url)


def test_alert_state_and_rule_memory_survive_a_reopen(db_url):
    s = Store.open(db_url)
    SqlAlertState(s.engine).save_alerts(
        [
            {
                "id": "a1",
                "rule": "R",
                "state": "firing",
                "labels": {"node": "n"},
                "annotations": {"summary": "x"},
                "value": 1.0,
                "active_since": 1,
                "last_true": 2,
                "fired_at": 2,
                "resolved_at": None,
                "updated_at": 2,
            }
        ]
    )
    SqlAlertState(s.engine).save_rule_memory({("R", 42): 3.0}, 5)
    s.close()
    s = Store.open(db_url)
    (a,) = SqlAlertState(s.engine).load_alerts()
    assert (a["id"], a["state"], a["labels"]) == ("a1", "firing", {"node": "n"})
    assert SqlAlertState(s.engine).load_rule_memory() == {("R", 42): 3.0}
    s.close()


def test_metric_samples_view_is_the_sql_read_contract(store):
    store.write([gpu_series(samples=[(60_000, 40.0)])])
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT metric, node, gpu, uuid, model, value FROM metric_samples")).one()
    assert tuple(row) == ("gpufleet_gpu_temperature_celsius", "n1", "0", "GPU-1", "H100", 40.0)
