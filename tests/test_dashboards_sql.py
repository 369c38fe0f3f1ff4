"""Every SQL panel query of every dashboard, expanded as Grafana expands it, runs against the PostgreSQL
store of a simulated fleet and returns data of the shape its panel draws."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from numbers import Number

import psycopg
import pytest

from gpufleet import dashboards
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.dashboards.macros import expand_sql
from gpufleet.dashboards.render import render
from tests import dashboard_fleet as fleet
from tests.conftest import PG_ADMIN, _admin_exec, free_port, wait_until

POSTGRES = next(f for f in dashboards.FLAVOURS if f.name == "postgres")
PANELS = [(d, p, q) for d in dashboards.DASHBOARDS for p in d.panels() for q in p.queries if q.sql]


@pytest.fixture(scope="module")
def store_url():
    name = f"gpufleet_test_{uuid.uuid4().hex[:12]}"
    _admin_exec(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    port = free_port()
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{port}", db=url, eval_interval=1.0)).start()
    agents = fleet.start_agents(f"http://127.0.0.1:{port}")
    try:
        wait_until(lambda: len(c.store.gpus()) == 4, timeout=20)
        fleet.run(agents, f"http://127.0.0.1:{port}/api/v1/write")
        time.sleep(1.5)  # the last pushes land
    finally:
        for a in agents:
            a.stop()
        c.close()
    yield url.replace("postgresql+psycopg://", "postgresql://")
    _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def db(store_url):
    with psycopg.connect(store_url, autocommit=True) as conn:
        yield conn


def _window(conn) -> tuple[float, float]:
    newest = conn.execute("SELECT extract(epoch FROM max(time)) FROM metric_samples").fetchone()[0]
    end = float(newest) + 1
    return end - 300, end


def _variables(conn, d, start, end) -> dict[str, list[str]]:
    """Each variable set to All: the values its own query returns (run expanded, like Grafana does)."""
    model = render(d, POSTGRES)
    values: dict[str, list[str]] = {}
    for var in model["templating"]["list"]:
        if var["type"] != "query":
            continue
        sql = expand_sql(var["query"], start=start, end=end, interval=fleet.INTERVAL, variables=values)
        values[var["name"]] = [r[0] for r in conn.execute(sql).fetchall()]
        assert values[var["name"]], f"{d.title}: variable {var['name']} has no values"
    return values


def run_query(conn, d, sql: str):
    start, end = _window(conn)
    expanded = expand_sql(
        sql,
        start=start,
        end=end,
        interval=fleet.INTERVAL,
        variables=_variables(conn, d, start, end),
        scrape_interval=fleet.SCRAPE_INTERVAL,
    )
    cur = conn.execute(expanded)
    return [c.name for c in cur.description], cur.fetchall(), expanded


def test_variables_list_the_fleet(db):
    start, end = _window(db)
    node_dash = next(d for d in dashboards.DASHBOARDS if d.slug == "node-gpu")
    values = _variables(db, node_dash, start, end)
    assert values == {"cluster": [fleet.CLUSTER], "node": list(fleet.NODES), "gpu": ["0", "1"]}


@pytest.mark.parametrize(
    ("d", "panel", "query"), PANELS, ids=[f"{d.slug}:{p.title}:{i}" for i, (d, p, _) in enumerate(PANELS)]
)
def test_every_sql_panel_returns_data_of_its_shape(db, d, panel, query):
    columns, rows, sql = run_query(db, d, query.sql)
    assert rows, f"{d.title} / {panel.title}: the query returned nothing:\n{sql}"
    if panel.kind in ("timeseries", "heatmap"):
        assert columns[0] == "time", columns
        assert "metric" in columns and "value" in columns, columns
        times = [r[0] for r in rows]
        assert times == sorted(times), "time-series rows must come ordered by time"
        assert all(isinstance(t, Number | dt.datetime) for t in times)
        values = [r[columns.index("value")] for r in rows]
        assert any(v is not None for v in values) and all(v is None or isinstance(v, Number) for v in values)
    elif panel.kind in ("stat", "bargauge"):
        numbers = [v for r in rows for v in r if not isinstance(v, str)]
        assert numbers and all(isinstance(v, Number) for v in numbers), rows
    elif panel.kind == "table":
        assert set(panel.columns) <= set(columns), (panel.columns, columns)
        for r in rows:
            assert all(r[columns.index(c)] not in (None, "") for c in panel.columns), r


def test_the_faults_the_fleet_had_show_where_an_operator_looks(db):
    by_title = {(d.slug, p.title): (d, p) for d in dashboards.DASHBOARDS for p in d.panels()}
    d, p = by_title[("fleet-overview", "Top nodes by problems")]
    cols, rows, _ = run_query(db, d, p.queries[0].sql)
    table = {r[0]: dict(zip(cols, r, strict=True)) for r in rows}
    assert rows[0][0] == "gpu-node-a"  # the node with XIDs and ECC errors comes first
    assert table["gpu-node-a"]["XID events"] >= 2 and table["gpu-node-a"]["uncorrected ECC"] >= 2
    assert table["gpu-node-b"]["throttled share"] > 0.5  # hw_slowdown injected for the whole run
    d, p = by_title[("efficiency", "GPUs idle while holding memory")]
    cols, rows, _ = run_query(db, d, p.queries[0].sql)
    assert [(r[0], r[1]) for r in rows][0] == ("gpu-node-b", "0")
    d, p = by_title[("fleet-overview", "GPUs down")]
    assert run_query(db, d, p.queries[0].sql)[1] == [(1,)]  # XID 79: the GPU fell off the bus
    d, p = by_title[("fleet-overview", "GPUs up")]
    assert run_query(db, d, p.queries[0].sql)[1] == [(3,)]
    d, p = by_title[("gpu-health", "XIDs by GPU")]
    cols, rows, _ = run_query(db, d, p.queries[0].sql)
    assert {(r[0], r[1], r[2]) for r in rows} >= {("gpu-node-a", "0", "48"), ("gpu-node-a", "1", "79")}
