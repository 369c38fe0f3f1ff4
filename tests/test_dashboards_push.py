"""`gpufleet dashboards push` against a strict Grafana API double: create, push again (nothing changes),
change a dashboard (exactly one new version); alerts become annotations that turn into regions on resolve."""

from __future__ import annotations

import copy

import pytest
from click.testing import CliRunner
from grafana_client.client import GrafanaBadInputError

import dashboards
from collector.grafana import GrafanaAnnotationNotifier, GrafanaPusher, collector_pusher, connect
from collector.rules.engine import Notification
from gpufleet.cli import main
from tests.doubles.grafana_api import GrafanaDouble

PG = "postgresql+psycopg://grafana_reader:s3cret@db.example:5432/gpufleet"
PROM = "http://prometheus.example:9090"


@pytest.fixture
def grafana():
    with GrafanaDouble() as g:
        yield g


def _push(grafana, *args):
    result = CliRunner().invoke(main, ["dashboards", "push", "--grafana-url", grafana.url, "--grafana-token",
                                       grafana.token, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_first_push_creates_folder_data_sources_and_every_dashboard_of_both_flavours(grafana):
    out = _push(grafana, "--db", PG, "--prometheus-url", PROM)
    assert grafana.problems == []
    assert "13 created, 0 updated, 0 unchanged" in out
    assert list(grafana.folders) == ["gpufleet"]
    by_uid = {d["uid"]: d for d in grafana.datasources.values()}
    pg = by_uid["gpufleet-postgres"]
    assert (pg["type"], pg["url"], pg["user"], pg["database"]) == (
        "grafana-postgresql-datasource", "db.example:5432", "grafana_reader", "gpufleet")
    assert pg["secureJsonData"] == {"password": "s3cret"}
    assert by_uid["gpufleet-prometheus"]["url"] == PROM
    assert set(grafana.dashboards) == {m["uid"] for m in dashboards.build().values()}
    assert all(d["folderUid"] == "gpufleet" and d["dashboard"]["version"] == 1 for d in grafana.dashboards.values())


def test_a_second_push_changes_nothing_and_adds_no_version(grafana):
    _push(grafana, "--db", PG, "--prometheus-url", PROM)
    writes = len(grafana.calls_of("POST")) + len(grafana.calls_of("PUT"))
    out = _push(grafana, "--db", PG, "--prometheus-url", PROM)
    assert "0 created, 0 updated, 13 unchanged" in out
    assert len(grafana.calls_of("POST")) + len(grafana.calls_of("PUT")) == writes
    assert all(len(v) == 1 for v in grafana.versions.values())
    assert grafana.problems == []


def test_a_changed_dashboard_is_saved_as_one_new_version_keeping_the_history(grafana):
    api = connect(grafana.url, grafana.token)
    collector_pusher(api, PG).push()
    models = {n: m for n, m in dashboards.build().items() if n.endswith(".postgres.json")}
    changed = copy.deepcopy(models)
    fleet = changed["fleet-overview.postgres.json"]
    fleet["panels"][1]["title"] = "GPUs answering NVML"
    pusher = GrafanaPusher(api, datasources=[], dashboards=changed)
    report = pusher.push()
    assert report.updated == ["dashboard GPU fleet overview (PostgreSQL store)"]
    history = grafana.versions[fleet["uid"]]
    assert [v["version"] for v in history] == [1, 2]
    assert history[0]["data"]["panels"][1]["title"] == "GPUs up"
    assert history[1]["data"]["panels"][1]["title"] == "GPUs answering NVML"
    assert pusher.push().updated == []  # and pushing the changed one again is a no-op
    assert grafana.problems == []


def test_a_changed_data_source_is_updated_in_place(grafana):
    api = connect(grafana.url, grafana.token)
    collector_pusher(api, PG).push()
    report = collector_pusher(api, PG.replace("db.example", "db2.example")).push()
    assert report.updated == ["data source gpufleet PostgreSQL"]
    assert [d["url"] for d in grafana.datasources.values()] == ["db2.example:5432"]
    assert grafana.problems == []


def test_push_refuses_a_sqlite_store_and_says_what_to_do(grafana):
    result = CliRunner().invoke(main, ["dashboards", "push", "--grafana-url", grafana.url, "--db", "sqlite:///x.db"])
    assert result.exit_code != 0
    assert "PostgreSQL" in result.output and "--prometheus-url" in result.output


def test_the_double_rejects_a_request_the_spec_does_not_allow(grafana):
    api = connect(grafana.url, grafana.token)
    with pytest.raises(GrafanaBadInputError):
        api.client.POST("/dashboards/db", json={"dashboard": {"title": "x"}, "folderUid": 7})
    assert grafana.problems and "folderUid: expected string" in grafana.problems[0]


def _notification(state: str, at_ms: int) -> Notification:
    return Notification("a1", "GpuXidCritical", state, "critical",
                        {"node": "gpu-node-7", "gpu": "1", "xid": "79", "severity": "critical"},
                        {"summary": "XID 79 on gpu-node-7 GPU 1"}, 79.0, 1_700_000_000_000, at_ms)


def test_alert_firing_and_resolve_become_one_annotation_region(grafana):
    notifier = GrafanaAnnotationNotifier(connect(grafana.url, grafana.token))
    where = notifier.send(_notification("firing", 1_700_000_000_000), None)
    assert notifier.send(_notification("resolved", 1_700_000_300_000), where) == where
    [a] = grafana.annotations.values()
    assert a["time"] == 1_700_000_000_000 and a["timeEnd"] == 1_700_000_300_000
    assert {"gpufleet", "GpuXidCritical", "critical", "node=gpu-node-7", "resolved"} <= set(a["tags"])
    assert a["text"].startswith("Resolved: [RESOLVED] GpuXidCritical")
    assert grafana.problems == []


def test_the_collector_pushes_its_dashboards_on_start_when_grafana_is_configured(grafana, pg_url):
    from collector.service import Collector, CollectorSettings
    from tests.conftest import free_port, wait_until

    c = Collector(CollectorSettings(listen=f"127.0.0.1:{free_port()}", db=pg_url, grafana_url=grafana.url,
                                    grafana_token=grafana.token)).start()
    try:
        wait_until(lambda: len(grafana.dashboards) == len(dashboards.DASHBOARDS), timeout=20)
        assert {d["uid"] for d in grafana.datasources.values()} == {"gpufleet-postgres"}
        assert "grafana" in [n.name for n in c.engine.notifiers]
    finally:
        c.close()
    assert grafana.problems == []
