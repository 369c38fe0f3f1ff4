"""A range query costs what its limits allow, on SQLite and on PostgreSQL: refused before reading when the
series or the points are too many, stopped when the samples it reads or its time run out, cancelled from
another thread; and within its limits it answers what it always did."""

from __future__ import annotations

import json
import threading

import pytest

from gpufleet.collector.store.ranges import (
    QueryCancel,
    QueryCancelled,
    QueryLimits,
    QueryRefused,
    QueryTimedOut,
)
from gpufleet.core.remote_write import Series

METRIC = "gpufleet_gpu_power_watts"
GPUS = 40  # five nodes of eight
SAMPLES = 120  # two minutes of 1-second samples each, from t = 1 s


def fleet(store, clusters: tuple[str | None, ...] = ("east", None)) -> None:
    """GPUS GPUs with SAMPLES samples each, cluster by cluster (None: no cluster label)."""
    series = []
    for c, cluster in enumerate(clusters):
        for i in range(GPUS // len(clusters)):
            labels = {"__name__": METRIC, "node": f"n{i // 8}-{c}", "gpu": str(i % 8), "uuid": f"GPU-{c}-{i}"}
            if cluster is not None:
                labels["cluster"] = cluster
            series.append(Series(labels, [(1000 * (k + 1), float(k)) for k in range(SAMPLES)]))
    store.write(series)


def test_a_query_over_its_series_or_points_is_refused_before_reading_naming_count_limit_and_fix(store):
    fleet(store)
    with pytest.raises(QueryRefused) as refused:
        store.query_range(METRIC, {}, 1, 120, 1, QueryLimits(max_series=GPUS - 1))
    assert f"matches {GPUS} series, over the limit of {GPUS - 1} (--query-max-series)" in str(refused.value)
    assert "narrow the matchers" in str(refused.value)
    # the matchers are counted in the database: one cluster's GPUs fit where the fleet's do not
    east = store.query_range(METRIC, {"cluster": "east"}, 1, 120, 1, QueryLimits(max_series=GPUS // 2))
    assert len(east) == GPUS // 2 and {s["metric"]["cluster"] for s in east} == {"east"}
    nameless = store.query_range(METRIC, {"cluster": ""}, 1, 120, 1, QueryLimits(max_series=GPUS // 2))
    assert len(nameless) == GPUS // 2 and all("cluster" not in s["metric"] for s in nameless)

    # 40 series x 120 steps = 4,800 points: refused before a sample is read
    with pytest.raises(QueryRefused) as refused:
        store.query_range(METRIC, {}, 1, 120, 1, QueryLimits(max_samples=4_799))
    assert "40 series x 120 steps = 4800 points, over the limit of 4799" in str(refused.value)
    assert "raise step" in str(refused.value)


def test_a_query_that_reads_more_samples_than_its_limit_is_stopped_while_reading(store):
    fleet(store)
    # one step a minute answers 80 points, but reads every sample of the two minutes: 4,800 of them
    limits = QueryLimits(max_samples=4_000)
    with pytest.raises(QueryRefused) as refused:
        store.query_range(METRIC, {}, 60, 120, 60, limits)
    assert "reads more than 4000 samples (--query-max-samples)" in str(refused.value)
    assert len(store.query_range(METRIC, {"node": "n0-0"}, 60, 120, 60, limits)) == 8


def test_a_query_past_its_time_budget_or_cancelled_is_stopped_and_the_store_answers_on(store):
    fleet(store)
    with pytest.raises(QueryTimedOut) as timed_out:
        store.query_range(METRIC, {}, 1, 120, 1, QueryLimits(timeout_s=0))
    assert "0 s (--query-timeout)" in str(timed_out.value)

    cancel = QueryCancel()
    threading.Thread(target=cancel.cancel).start()  # as the API does when the client hangs up
    with pytest.raises(QueryCancelled):
        while True:  # until the cancel lands, whether before the query starts or while it reads
            store.query_range(METRIC, {}, 1, 120, 1, cancel=cancel)
    assert len(store.query_range(METRIC, {}, 1, 120, 1)) == GPUS  # the pool's connections still work


def test_the_json_answer_holds_the_same_series_in_the_same_order_with_infinities_as_prometheus_writes_them(
    store,
):
    fleet(store)
    store.write([Series({"__name__": METRIC, "node": "hot", "uuid": "GPU-hot"}, [(1000, float("inf"))])])
    for matchers in ({}, {"node": "n1-1"}, {"gpu": "3"}):
        pieces = store.query_range_json(METRIC, matchers, 1, 120, 10)
        assert [json.loads(p) for p in pieces if b"GPU-hot" not in p] == [
            s for s in store.query_range(METRIC, matchers, 1, 120, 10) if s["metric"]["uuid"] != "GPU-hot"
        ]
    (hot,) = store.query_range_json(METRIC, {"node": "hot"}, 1, 1, 1)
    assert json.loads(hot)["values"] == [[1.0, "+Inf"]]
