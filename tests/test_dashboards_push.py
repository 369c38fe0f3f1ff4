"""`gpufleet dashboards push` and the collector, through gpufleet's own Grafana client, against a strict
Grafana API double: create, push again (nothing changes), change a dashboard (exactly one new version); a
Grafana that starts late or refuses is retried until it takes the push; each alert group's episode becomes
one annotation region."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time

import pytest
import urllib3
from click.testing import CliRunner

from gpufleet import dashboards
from gpufleet.cli import main
from gpufleet.collector.grafana import (
    GrafanaAnnotationNotifier,
    GrafanaPusher,
    collector_pusher,
    connect,
    push_with_retry,
    retry_delays,
)
from gpufleet.collector.grafana_api import GrafanaError
from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.kinds import Threshold
from gpufleet.collector.rules.memory import MemoryView
from gpufleet.collector.rules.model import Route, Rule
from gpufleet.collector.rules.state import SqlAlertState
from tests.conftest import free_port, wait_until
from tests.doubles.grafana_api import GrafanaDouble

PG = "postgresql+psycopg://grafana_reader:s3cret@db.example:5432/gpufleet"
PROM = "http://prometheus.example:9090"


@pytest.fixture
def grafana():
    with GrafanaDouble() as g:
        yield g


def _push(grafana, *args):
    result = CliRunner().invoke(
        main,
        ["dashboards", "push", "--grafana-url", grafana.url, "--grafana-token", grafana.token, *args],
        catch_exceptions=False,
    )
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
        "grafana-postgresql-datasource",
        "db.example:5432",
        "grafana_reader",
        "gpufleet",
    )
    assert pg["secureJsonData"] == {"password": "s3cret"}
    assert by_uid["gpufleet-prometheus"]["url"] == PROM
    shipped = dashboards.shipped()
    assert {grafana.dashboards[m["uid"]]["dashboard"]["title"] for m in shipped.values()} == {
        m["title"] for m in shipped.values()
    }
    assert len(grafana.dashboards) == len(shipped) == 2 * len(dashboards.DASHBOARDS)
    assert all(
        d["folderUid"] == "gpufleet" and d["dashboard"]["version"] == 1 for d in grafana.dashboards.values()
    )


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
    changed = copy.deepcopy(dashboards.shipped(["postgres"]))
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


def test_a_changed_data_source_and_a_renamed_folder_are_put_back_in_place(grafana):
    api = connect(grafana.url, grafana.token)
    collector_pusher(api, PG).push()
    grafana.folders["gpufleet"]["title"] = "someone renamed it"
    report = collector_pusher(api, PG.replace("db.example", "db2.example")).push()
    assert report.updated == ["folder gpufleet", "data source gpufleet PostgreSQL"]
    assert grafana.folders["gpufleet"]["title"] == "gpufleet"
    assert [d["url"] for d in grafana.datasources.values()] == ["db2.example:5432"]
    assert grafana.problems == []


def test_push_refuses_a_sqlite_store_and_says_what_to_do(grafana):
    result = CliRunner().invoke(
        main, ["dashboards", "push", "--grafana-url", grafana.url, "--db", "sqlite:///x.db"]
    )
    assert result.exit_code != 0
    assert "PostgreSQL" in result.output and "--prometheus-url" in result.output


def test_a_refused_token_says_what_grafana_answered_and_what_to_check_but_never_the_token(grafana):
    wrong = "glsa_wrong_token_do_not_print"
    result = CliRunner().invoke(
        main, ["dashboards", "push", "--grafana-url", grafana.url, "--grafana-token", wrong, "--db", PG]
    )
    assert result.exit_code != 0
    assert "answered 401 to GET /api/folders/gpufleet: Unauthorized" in result.output
    assert "--grafana-token" in result.output and wrong not in result.output
    with pytest.raises(GrafanaError) as err:
        connect(grafana.url, wrong).get_folder("gpufleet")
    assert (err.value.status, err.value.message) == (401, "Unauthorized")
    assert wrong not in str(err.value) and wrong not in repr(err.value.args)


def test_grafana_refusing_a_dashboard_is_an_error_with_its_status_and_message(grafana):
    pusher = GrafanaPusher(
        connect(grafana.url, grafana.token),
        datasources=[],
        dashboards={"untitled.json": {"uid": "untitled", "panels": []}},
    )
    with pytest.raises(GrafanaError) as err:
        pusher.push()
    assert err.value.status == 400 and err.value.method == "POST" and err.value.path == "/api/dashboards/db"
    assert "without a title" in err.value.message


def test_an_unreachable_grafana_is_an_error_without_a_status():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GrafanaError) as err:
        connect(url, "glsa_secret", timeout=2).get_dashboard("x")
    assert err.value.status is None
    assert str(err.value).startswith(f"cannot reach Grafana at {url} (GET /api/dashboards/uid/x: ")
    assert "glsa_secret" not in str(err.value)


def test_the_double_refuses_a_request_gpufleets_api_description_does_not_allow(grafana):
    http = urllib3.PoolManager()
    auth = {"Authorization": f"Bearer {grafana.token}", "Content-Type": "application/json"}
    bad_type = http.request(
        "POST",
        grafana.url + "/api/dashboards/db",
        headers=auth,
        body=json.dumps({"dashboard": {"title": "x"}, "folderUid": 7}),
    )
    unknown_field = http.request(
        "POST",
        grafana.url + "/api/annotations",
        headers=auth,
        body=json.dumps({"text": "x", "dashboardId": 1}),
    )
    undescribed = http.request("GET", grafana.url + "/api/search", headers=auth)
    assert [r.status for r in (bad_type, unknown_field, undescribed)] == [400, 400, 400]
    assert len(grafana.problems) == 3
    assert "folderUid: expected string" in grafana.problems[0]
    assert "field 'dashboardId' is not in the spec" in grafana.problems[1]
    assert "GET /search: no such path" in grafana.problems[2]


def test_retries_wait_twice_as_long_each_time_up_to_five_minutes():
    delays = retry_delays()
    assert [next(delays) for _ in range(11)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_a_grafana_that_answers_only_after_a_while_gets_the_push_with_one_log_line_per_failure(
    grafana, caplog
):
    grafana.answer_next(503, times=4)  # still starting
    pusher = collector_pusher(connect(grafana.url, grafana.token), PG)
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.grafana"):
        report = push_with_retry(pusher, threading.Event(), first_delay=0.01, max_delay=0.02)
    assert report is not None and len(report.created) == 7
    failures = [r.getMessage() for r in caplog.records]
    assert len(failures) == 4 and all("\n" not in m for m in failures)
    assert failures[0].startswith("pushing dashboards to Grafana failed (try 1, next in 0 s): Grafana at ")
    assert "answered 503" in failures[0]
    assert grafana.problems == []


def test_the_start_up_push_never_gives_up_and_stops_when_told(grafana):
    grafana.answer_next(503, times=10_000)
    stop = threading.Event()
    result = []
    pusher = collector_pusher(connect(grafana.url, grafana.token), PG)
    t = threading.Thread(
        target=lambda: result.append(push_with_retry(pusher, stop, first_delay=0.01, max_delay=0.02))
    )
    t.start()
    wait_until(lambda: len(grafana.scripted) < 10_000 - 50, timeout=20)  # many more tries than 20 s' worth
    assert t.is_alive()
    stop.set()
    t.join(timeout=5)
    assert not t.is_alive() and result == [None]


RULES = [
    Rule(
        name="GpuHardwareThermalSlowdown",
        metric="hw_thermal",
        severity="warning",
        spec=Threshold(op="==", value=1),
        annotations={"summary": "GPU {{ $labels.gpu }} on {{ $labels.node }} slows for heat"},
    ),
    Rule(
        name="GpuTemperatureCritical",
        metric="temperature",
        severity="critical",
        spec=Threshold(op=">", value=90),
        annotations={"summary": "GPU {{ $labels.gpu }} at {{ $value }} C"},
    ),
]


def gpu(metric: str, i: int) -> dict[str, str]:
    return {
        "__name__": metric,
        "cluster": "prod",
        "node": "gpu-node-7",
        "gpu": str(i),
        "uuid": f"GPU-{i:04d}",
    }


def test_each_alert_group_becomes_one_annotation_region_from_first_alert_to_resolve(grafana, store):
    view = MemoryView()

    def engine():  # each call a new collector process: where the annotations are comes back from the store
        notifier = GrafanaAnnotationNotifier(connect(grafana.url, grafana.token))
        return Engine(
            RULES,
            view,
            SqlAlertState(store.engine),
            [notifier],
            route=Route(group_wait_s=0, group_interval_s=0),
        )

    t0 = 1_700_000_000_000
    eng = engine()
    view.observe(gpu("hw_thermal", 0), t0, 1)
    view.observe(gpu("hw_thermal", 1), t0, 1)
    assert len(eng.tick(t0)) == 2
    view.observe(gpu("temperature", 0), t0 + 60_000, 95)  # a second, more severe alert joins GPU 0's group
    assert len(eng.tick(t0 + 60_000)) == 1
    eng = engine()
    for i in (0, 1):
        view.observe(gpu("hw_thermal", i), t0 + 300_000, 0)
    view.observe(gpu("temperature", 0), t0 + 300_000, 70)
    assert [g.state for g in eng.tick(t0 + 300_000)] == ["resolved", "resolved"]

    regions = sorted(grafana.annotations.values(), key=lambda a: a["text"])
    assert len(regions) == 2 and eng.send_failures == 0
    assert all((a["time"], a["timeEnd"]) == (t0, t0 + 300_000) for a in regions)
    both, one = regions
    assert both["text"].startswith("[RESOLVED] 2 alerts: GpuHardwareThermalSlowdown, GpuTemperatureCritical")
    assert {
        "gpufleet",
        "GpuHardwareThermalSlowdown",
        "GpuTemperatureCritical",
        "critical",
        "cluster=prod",
        "node=gpu-node-7",
        "gpu=0",
        "resolved",
    } <= set(both["tags"])
    assert one["text"].startswith("[RESOLVED] GpuHardwareThermalSlowdown: GPU 1 on gpu-node-7 slows for heat")
    assert {"gpufleet", "GpuHardwareThermalSlowdown", "warning", "gpu=1", "resolved"} <= set(one["tags"])
    assert not any("firing" in a["tags"] for a in regions)
    assert grafana.calls_of("POST") == ["/annotations", "/annotations"]
    assert grafana.problems == []


def test_an_annotation_deleted_in_grafana_comes_back_as_a_closed_region_on_resolve(grafana, store):
    view = MemoryView()
    notifier = GrafanaAnnotationNotifier(connect(grafana.url, grafana.token))
    eng = Engine(
        RULES[:1],
        view,
        SqlAlertState(store.engine),
        [notifier],
        route=Route(group_wait_s=0, group_interval_s=0),
    )
    view.observe(gpu("hw_thermal", 3), 1000, 1)
    eng.tick(1000)
    grafana.annotations.clear()  # someone tidied up Grafana
    view.observe(gpu("hw_thermal", 3), 61_000, 0)
    eng.tick(61_000)
    [a] = grafana.annotations.values()
    assert (a["time"], a["timeEnd"]) == (1000, 61_000) and "resolved" in a["tags"]
    assert eng.send_failures == 0 and grafana.problems == []


def test_the_collector_pushes_its_dashboards_on_start_when_grafana_is_configured(grafana, pg_url):
    from gpufleet.collector.service import Collector, CollectorSettings

    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{free_port()}", db=pg_url, grafana_url=grafana.url, grafana_token=grafana.token
        )
    ).start()
    try:
        wait_until(lambda: len(grafana.dashboards) == len(dashboards.DASHBOARDS), timeout=20)
        assert {d["uid"] for d in grafana.datasources.values()} == {"gpufleet-postgres"}
        assert "grafana" in [n.name for n in c.engine.notifiers]
    finally:
        c.close()
    assert grafana.problems == []


def test_a_collector_whose_grafana_never_answers_still_stops_at_once(grafana, pg_url):
    from gpufleet.collector.service import Collector, CollectorSettings

    grafana.answer_next(503, times=10_000)
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{free_port()}", db=pg_url, grafana_url=grafana.url, grafana_token=grafana.token
        )
    ).start()
    wait_until(lambda: len(grafana.scripted) < 10_000)  # the first push failed; the next waits 2 s
    started = time.monotonic()
    c.close()
    assert time.monotonic() - started < 5
    assert not any(t.name == "grafana-push" for t in threading.enumerate())
