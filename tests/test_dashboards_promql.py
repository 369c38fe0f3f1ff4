"""Every PromQL panel query of every dashboard, expanded as Grafana expands it, runs through the HTTP
query API of a real Prometheus (Debian's /usr/bin/prometheus) scraping simulated agents, and returns
data of the shape its panel draws."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from gpufleet import dashboards
from gpufleet.dashboards.macros import expand_promql
from gpufleet.dashboards.render import render
from tests import dashboard_fleet as fleet
from tests.conftest import free_port, wait_until

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
PROM = next(f for f in dashboards.FLAVOURS if f.name == "prometheus")
PANELS = [(d, p, q) for d in dashboards.DASHBOARDS for p in d.panels() for q in p.queries]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    if not shutil.which(PROMETHEUS_BIN):
        pytest.fail(
            f"Prometheus is needed at {PROMETHEUS_BIN} (Debian package prometheus; make test installs it when run as root)"
        )
    agents = fleet.start_agents(None)
    tmp = tmp_path_factory.mktemp("prometheus")
    targets = [a.settings.listen for a in agents]
    (tmp / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {fleet.SCRAPE_INTERVAL:g}s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: gpufleet\n    static_configs:\n      - targets: {json.dumps(targets)}\n"
    )
    port = free_port()
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 (open for the life of the process)
    proc = subprocess.Popen(
        [
            PROMETHEUS_BIN,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-remote-write-receiver",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), timeout=30)
        wait_until(
            lambda: len(_get(url + "/api/v1/query?query=gpufleet_gpu_up")["data"]["result"]) == 4, timeout=20
        )
        fleet.run(agents, url + "/api/v1/write")
        time.sleep(2 * fleet.SCRAPE_INTERVAL)
        yield url
    finally:
        for a in agents:
            a.stop()
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _query(url: str, d, expr: str, kind: str):
    end = time.time()
    start = end - 300
    expanded = expand_promql(
        expr,
        start=start,
        end=end,
        interval=fleet.INTERVAL,
        scrape_interval=fleet.SCRAPE_INTERVAL,
        variables={v: ["$__all"] for v in d.variables},
    )
    if kind in ("timeseries", "heatmap"):
        params = {"query": expanded, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "2"}
        body = _get(url + "/api/v1/query_range?" + urllib.parse.urlencode(params))
    else:
        body = _get(
            url + "/api/v1/query?" + urllib.parse.urlencode({"query": expanded, "time": f"{end:.3f}"})
        )
    assert body["status"] == "success", body
    return body["data"], expanded


def test_variables_list_the_fleet(prometheus):
    d = next(d for d in dashboards.DASHBOARDS if d.slug == "node-gpu")
    values = {}
    for var in render(d, PROM)["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]  # label_values(SELECTOR, LABEL), what Grafana turns into /api/v1/label/LABEL/values
        selector, label = q[len("label_values(") : -1].rsplit(", ", 1)
        selector = expand_promql(
            selector, start=0, end=300, interval="2s", variables={k: ["$__all"] for k in values}
        )
        values[var["name"]] = _get(
            prometheus + f"/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector})
        )["data"]
    assert values == {"cluster": [fleet.CLUSTER], "node": list(fleet.NODES), "gpu": ["0", "1"]}


@pytest.mark.parametrize(
    ("d", "panel", "query"), PANELS, ids=[f"{d.slug}:{p.title}:{i}" for i, (d, p, _) in enumerate(PANELS)]
)
def test_every_promql_panel_returns_data_of_its_shape(prometheus, d, panel, query):
    data, expr = _query(prometheus, d, query.promql, panel.kind)
    assert data["result"], f"{d.title} / {panel.title}: the query returned nothing:\n{expr}"
    if panel.kind in ("timeseries", "heatmap"):
        assert data["resultType"] == "matrix"
        assert all(s["values"] for s in data["result"])
    else:
        assert data["resultType"] == "vector"
        for s in data["result"]:
            float(s["value"][1])
            assert all(c in s["metric"] for c in panel.columns), (panel.columns, s["metric"])


def test_the_faults_the_fleet_had_show_where_an_operator_looks(prometheus):
    by_title = {(d.slug, p.title): (d, p) for d in dashboards.DASHBOARDS for p in d.panels()}
    d, p = by_title[("fleet-overview", "GPUs down")]
    assert float(_query(prometheus, d, p.queries[0].promql, "stat")[0]["result"][0]["value"][1]) == 1
    d, p = by_title[("gpu-health", "XIDs by GPU")]
    rows = {
        (s["metric"]["node"], s["metric"]["gpu"], s["metric"]["xid"])
        for s in _query(prometheus, d, p.queries[0].promql, "table")[0]["result"]
    }
    assert rows >= {("gpu-node-a", "0", "48"), ("gpu-node-a", "1", "79")}
    d, p = by_title[("efficiency", "GPUs idle while holding memory")]
    rows = {
        (s["metric"]["node"], s["metric"]["gpu"])
        for s in _query(prometheus, d, p.queries[0].promql, "table")[0]["result"]
    }
    assert ("gpu-node-b", "0") in rows
