"""Naming modes that stay coherent: whatever names an agent serves (gpufleet's, dcgm-exporter's or both), the
rules `gpufleet alerts export` writes, the chart's PrometheusRule and the Prometheus dashboards query exactly
those names, and a real Prometheus scraping a real agent in each mode fires on an injected XID and thermal
slowdown. Every exposition is gzipped for a scraper that asks; the push to the collector keeps gpufleet's
names in every mode."""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from click.testing import CliRunner

from gpufleet import dashboards
from gpufleet.agent.dcgm_names import naming, to_dcgm
from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.cli import main
from gpufleet.cli.catalogue import RULE_SERIES, catalogue
from gpufleet.core import remote_write as rw
from gpufleet.core.naming import Untranslatable, translate
from gpufleet.core.promql import reads
from gpufleet.dashboards.macros import expand_promql
from gpufleet.dashboards.render import render as render_dashboard
from tests.conftest import free_port, wait_until
from tests.helm_render import container, env_of, find, objects, render, validate
from tests.test_metric_contract import simulated_gpu_families

MODES = ("gpufleet", "dcgm", "both")
PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Labels a dcgm-named series carries beside gpufleet's (see agent/dcgm_names.py).
DCGM_ONLY_LABELS = {
    "Hostname",
    "UUID",
    "modelName",
    "device",
    "pci_bus_id",
    "DCGM_FI_DRIVER_VERSION",
    "GPU_I_ID",
    "GPU_I_PROFILE",
}


def _agent(mode: str, **settings):
    return start_agent(
        AgentSettings(
            listen=f"127.0.0.1:{free_port()}",
            simulate=2,
            node="gpu-node-1",
            cluster="dc1",
            interval=0.2,
            slow_interval=0.2,
            metric_names=mode,
            seed=7,
            **settings,
        )
    )


def _fetch(url: str, accept_encoding: str | None = None) -> tuple[dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": accept_encoding} if accept_encoding else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def _series(text: str) -> list[tuple[str, str]]:
    """(name, labels as written) of every sample line."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?", line)
            assert m, line
            out.append((m.group(1), m.group(2) or ""))
    return out


def _names(text: str) -> set[str]:
    return {name for name, _ in _series(text)}


# ---- the agent's exposition -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_every_naming_mode_is_gzipped_for_a_scraper_that_asks(mode):
    agent = _agent(mode)
    url = f"http://127.0.0.1:{agent.server.port}/metrics"
    try:
        agent.simulator.inject(0, "thermal")
        # GPM (SM activity) needs two samples: wait for it under either name
        wait_until(lambda: re.search(rb"SM_ACTIVE|sm_active_ratio", _fetch(url)[1]), timeout=20)
        headers, plain = _fetch(url)
        zipped_headers, zipped = _fetch(url, "gzip, deflate")
    finally:
        agent.stop()
    assert "content-encoding" not in headers
    assert zipped_headers["content-encoding"] == "gzip"
    assert int(zipped_headers["content-length"]) == len(zipped)
    text = gzip.decompress(zipped).decode()
    # the same exposition, a fraction of the bytes (values move between the two scrapes; sizes barely)
    assert _names(text) == _names(plain.decode())
    assert len(zipped) * 4 < len(plain)
    names = _names(text)
    assert "gpufleet_gpu_up" in names  # no dcgm twin: served under our name in every mode
    has_ours = {"gpufleet_gpu_sm_active_ratio", "gpufleet_gpu_clock_event_active"} <= names
    has_dcgm = {"DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"} <= names
    assert (has_ours, has_dcgm) == {
        "gpufleet": (True, False),
        "dcgm": (False, True),
        "both": (True, True),
    }[mode]
    if mode == "gpufleet":
        assert not [n for n in names if n.startswith("DCGM_")]
    series = _series(text)
    assert len(series) == len(set(series)), "a series is served twice"


def test_both_mode_serves_what_gpufleet_mode_and_dcgm_mode_serve_together():
    agents = {mode: _agent(mode) for mode in MODES}
    try:
        for a in agents.values():
            a.simulator.inject(0, "xid", xid=48)

        def names(mode: str) -> set[str]:
            return _names(_fetch(f"http://127.0.0.1:{agents[mode].server.port}/metrics")[1].decode())

        def union_reached():
            got = {mode: names(mode) for mode in MODES}
            ready = all("gpufleet_gpu_xid_errors_total" in got[m] for m in MODES)
            return got if ready and got["both"] == got["gpufleet"] | got["dcgm"] else None

        got = wait_until(union_reached, timeout=30)
    finally:
        for a in agents.values():
            a.stop()
    assert got["gpufleet"] - got["dcgm"] and got["dcgm"] - got["gpufleet"]


class _RemoteWriteReceiver(BaseHTTPRequestHandler):
    names: set[str] = set()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.names.update(s.name for s in rw.decode(body).series)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return None


@pytest.mark.parametrize("mode", ["dcgm", "both"])
def test_the_push_to_the_collector_keeps_gpufleet_names_in_every_mode(mode):
    handler = type("Receiver", (_RemoteWriteReceiver,), {"names": set()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    agent = _agent(mode, collector=f"http://127.0.0.1:{server.server_port}", push_interval=0.2)
    try:
        wait_until(lambda: "gpufleet_gpu_sm_active_ratio" in handler.names, timeout=20)
        scraped = _names(_fetch(f"http://127.0.0.1:{agent.server.port}/metrics")[1].decode())
    finally:
        agent.stop()
        server.shutdown()
        server.server_close()
    assert "DCGM_FI_PROF_SM_ACTIVE" in scraped
    assert not [n for n in handler.names if n.startswith("DCGM_")]


# ---- rules: `gpufleet alerts export --metric-names` ---------------------------------------------------------
def _export(*args: str) -> dict:
    result = CliRunner().invoke(main, ["alerts", "export", "--format", "prometheusrule", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def _rules(doc: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}


def _renamed_away() -> set[str]:
    """gpufleet names an agent in dcgm mode does not serve (their samples carry dcgm-exporter's names)."""
    ours = simulated_gpu_families(mig=True)
    served = {f.name for f in to_dcgm(ours)}
    return {f.name for f in ours} - served


@pytest.mark.parametrize("mode", MODES)
def test_exported_rules_read_only_names_an_agent_in_that_mode_serves(mode):
    doc = _export("--metric-names", mode)
    assert doc["metadata"]["annotations"]["gpufleet.io/metric-names"] == (
        "dcgm" if mode == "dcgm" else "gpufleet"
    )
    served = set(catalogue("dcgm" if mode == "dcgm" else "gpufleet")) | set(RULE_SERIES)
    away = _renamed_away()
    assert "gpufleet_gpu_clock_event_active" in away and "gpufleet_gpu_sm_active_ratio" in away
    read = {s.name for r in _rules(doc).values() for s in reads(r["expr"]).selectors}
    assert read <= served, sorted(read - served)
    if mode == "dcgm":
        assert not read & away, sorted(read & away)
        assert {"DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_DEV_FB_USED"} <= read
    else:
        assert not [n for n in read if n.startswith("DCGM_")]
    # every rule PromQL can express is exported in every mode: nothing is lost to the renaming
    assert set(_rules(doc)) == set(_rules(_export()))


def test_a_twin_per_label_value_is_scaled_and_values_without_one_keep_gpufleets_name(tmp_path):
    rules = tmp_path / "site.yaml"
    rule = (
        "      - alert: {name}\n        kind: threshold\n"
        "        metric: gpufleet_gpu_clock_event_violation_seconds_total\n"
        "        match: {{reason: {reason}}}\n        rate: 5m\n        op: '>'\n        value: 0.1\n"
        "        annotations: {{summary: x}}\n"
    )
    rules.write_text(
        "groups:\n  - name: site\n    rules:\n"
        + rule.format(name="ThermalViolation", reason="thermal")
        + rule.format(name="HwThermalViolation", reason="hw_thermal")
    )
    result = CliRunner().invoke(main, ["alerts", "export", "--metric-names", "dcgm", str(rules)])
    assert result.exit_code == 0, result.output
    exprs = {r["alert"]: r["expr"] for r in yaml.safe_load(result.stdout)["groups"][0]["rules"]}
    # dcgm-exporter's THERMAL_VIOLATION is in ns: rate() over it, back to seconds, with `reason` set again
    assert exprs["ThermalViolation"].startswith(
        "label_replace(label_replace(label_replace(label_replace((rate(DCGM_FI_DEV_THERMAL_VIOLATION[5m]) "
        '/ 1000000000), "reason", "thermal", "", "")'
    )
    # no dcgm-exporter field for hw_thermal: a dcgm-mode agent serves it under our name, as the rule reads it
    assert exprs["HwThermalViolation"].startswith(
        'rate(gpufleet_gpu_clock_event_violation_seconds_total{reason="hw_thermal"}[5m])'
    )


def test_what_dcgm_names_cannot_say_is_refused_with_the_reason():
    # stdvar scales with the square of the unit: not one factor away
    with pytest.raises(Untranslatable, match="stdvar_over_time"):
        translate("stdvar_over_time(gpufleet_gpu_memory_used_bytes[5m])", naming())
    # the ECC type is part of dcgm-exporter's names: a value known only later cannot pick the name
    with pytest.raises(Untranslatable, match="not a literal"):
        translate('gpufleet_gpu_ecc_errors_total{type=~"$type"}', naming())
    # a site rule hitting such a case is listed as not exported, like an anomaly rule
    from gpufleet.collector.rules.export import expression
    from gpufleet.collector.rules.model import Rule

    rule = Rule("EccByType", "gpufleet_gpu_ecc_errors_total", "warning", matchers={"type": "$type"})
    expr, why = expression(rule, naming())
    assert expr is None and why.startswith("not expressible over dcgm names:")


def test_with_builtin_exports_the_folder_a_collector_loads(tmp_path):
    site = tmp_path / "gpu.yaml"  # named like the built-in file: replaces it
    site.write_text(
        "groups:\n  - name: site\n    rules:\n      - alert: SiteHot\n        kind: threshold\n"
        "        metric: gpufleet_gpu_temperature_celsius\n        op: '>'\n        value: 90\n"
        "        annotations: {summary: hot}\n"
    )
    doc = _export("--with-builtin", "--metric-names", "dcgm", str(site))
    files = json.loads(doc["metadata"]["annotations"]["gpufleet.io/rule-files"])
    assert sorted(files) == ["gpu.yaml", "inference.yaml"]
    assert (
        files["inference.yaml"]
        == json.loads(_export()["metadata"]["annotations"]["gpufleet.io/rule-files"])["inference.yaml"]
    )
    rules = _rules(doc)
    assert "SiteHot" in rules and "GpuXidCritical" not in rules and "InferenceEndpointDown" in rules
    assert "DCGM_FI_DEV_GPU_TEMP" in rules["SiteHot"]["expr"]


# ---- one Prometheus, one agent serving both names: every rule and dashboard query reads the same data ------
def _prometheus(tmp: Path, targets: list[str], rule_files: list[Path] = ()) -> tuple[subprocess.Popen, str]:
    if not Path(PROMETHEUS_BIN).exists():
        pytest.fail(
            f"Prometheus is needed at {PROMETHEUS_BIN} (Debian package prometheus; make test installs it)"
        )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": "gpufleet-agents", "honor_labels": True, "static_configs": [{"targets": targets}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 (open for the life of the process)
    proc = subprocess.Popen(
        [
            PROMETHEUS_BIN,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _ready(url), timeout=30)
    return proc, url


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _query(url: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
    try:
        with urllib.request.urlopen(
            url + "/api/v1/query?" + urllib.parse.urlencode(params), timeout=20
        ) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"Prometheus refused {expr}: {exc.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def both_names(tmp_path_factory):
    """A Prometheus scraping an agent in both mode: each sample under gpufleet's name and its dcgm twin's."""
    agent = _agent("both", simulate_mig={1: ["3g.40gb"]})
    a = agent.simulator
    a.inject(0, "xid", xid=48)
    a.inject(0, "ecc", count=2)
    a.inject(1, "thermal", duration=600)
    a.inject(0, "hw_slowdown", duration=600)
    a.inject(1, "nvlink_error", count=3)
    a.inject(0, "pcie_replay", count=5)
    proc, url = _prometheus(tmp_path_factory.mktemp("prometheus"), [agent.settings.listen])
    try:
        wait_until(lambda: _query(url, "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"), timeout=30)
        time.sleep(6)  # a few scrapes, for rates
        a.inject(0, "ecc", count=1)
        a.inject(1, "nvlink_error", count=2)
        time.sleep(3)
        yield url
    finally:
        _stop(proc)
        agent.stop()


def _same_answer(url: str, ours: str, theirs: str, *, subquery: bool) -> None:
    at = time.time() - 1
    want = _query(url, ours, at)
    got = _query(url, theirs, at)

    def key(s: dict) -> tuple:
        return tuple(
            sorted((k, v) for k, v in s["metric"].items() if k not in DCGM_ONLY_LABELS | {"__name__"})
        )

    want_by, got_by = (
        {key(s): float(s["value"][1]) for s in want},
        {key(s): float(s["value"][1]) for s in got},
    )
    assert set(got_by) == set(want_by), (
        f"{ours}\n  ->\n{theirs}\n  series differ: {set(got_by) ^ set(want_by)}"
    )
    for k, v in want_by.items():
        # a bit of a bitmask is read through a subquery: sampled at the evaluation interval, not every scrape
        close = (
            abs(got_by[k] - v) <= 0.2 if subquery else math.isclose(got_by[k], v, rel_tol=1e-9, abs_tol=1e-9)
        )
        assert close or (math.isnan(v) and math.isnan(got_by[k])), (ours, theirs, k, v, got_by[k])


def test_every_exported_rule_over_dcgm_names_finds_what_it_finds_over_gpufleet_names(both_names):
    ours, theirs = _rules(_export()), _rules(_export("--metric-names", "dcgm"))
    assert set(ours) == set(theirs)
    firing = 0
    for name, rule in ours.items():
        _same_answer(both_names, rule["expr"], theirs[name]["expr"], subquery=False)
        firing += bool(_query(both_names, rule["expr"]))
    assert firing >= 4, "the faults injected should make several rules hold"


DASHBOARD_QUERIES = [
    (d, p, q)
    for d in dashboards.DASHBOARDS
    for p in d.panels()
    for q in p.queries
    if q.promql and translate(q.promql, naming()) != q.promql
]


def test_every_dashboard_query_over_dcgm_names_finds_what_it_finds_over_gpufleet_names(both_names):
    assert len(DASHBOARD_QUERIES) > 30
    dcgm = next(f for f in dashboards.ALL_FLAVOURS if f.naming == "dcgm")
    shipped = {}
    for d in dashboards.DASHBOARDS:
        model = render_dashboard(d, dcgm)
        shipped[d.slug] = [t["expr"] for p in model["panels"] for t in p.get("targets", [])]
    for d, p, q in DASHBOARD_QUERIES:
        theirs = translate(q.promql, naming())
        assert theirs in shipped[d.slug], f"{d.slug} / {p.title}: the dcgm flavour does not query {theirs}"

        variables = {v: ["$__all"] for v in d.variables}
        now = time.time()
        ours_expr, theirs_expr = (
            expand_promql(e, start=now - 60, end=now, interval="2s", scrape_interval=1, variables=variables)
            for e in (q.promql, theirs)
        )
        _same_answer(both_names, ours_expr, theirs_expr, subquery=":]" in theirs)


# ---- the chart: the PrometheusRule of each mode, evaluated by a real Prometheus scraping a real agent ------
def _rule_groups(values: dict) -> dict:
    rule = find(objects(render(values)), "PrometheusRule")
    validate(rule)
    return {"groups": rule["spec"]["groups"]}


def _firing(url: str) -> set[tuple[str, str]]:
    return {
        (s["metric"]["alertname"], s["metric"].get("gpu", ""))
        for s in _query(url, 'ALERTS{alertstate="firing"}')
    }


def _inject(agent_url: str, *args: str) -> None:
    """`gpufleet simulate inject`, as a person drives a simulated agent."""
    cmd = [sys.executable, "-m", "gpufleet.cli", "simulate", "inject", *args, "--agent", agent_url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


WANT = {("GpuXidCritical", "0"), ("GpuHardwareThermalSlowdown", "1")}


@pytest.fixture(scope="module")
def chart_installs(tmp_path_factory):
    """Per naming mode: the chart rendered with agent.metricNames=MODE, a `gpufleet agent --simulate 2` with
    the naming the chart gives it, and a real Prometheus scraping it with the PrometheusRule's groups as its
    rule file. GPU 1 of each agent starts overheating at once (a simulated card heats for a minute or two,
    as a real one does, before it reaches its slowdown point); the modes heat up side by side."""
    installs: dict[str, dict] = {}
    procs: list[subprocess.Popen] = []
    try:
        for mode in MODES:
            tmp = tmp_path_factory.mktemp(f"chart-{mode}")
            values = {"agent": {"metricNames": mode}, "prometheusRule": {"enabled": True}}
            objs = objects(render(values))
            agent_env = {k: e["value"] for k, e in env_of(container(objs, "agent")).items() if "value" in e}
            rules = tmp / "gpufleet-rules.yaml"
            rules.write_text(yaml.safe_dump(_rule_groups(values), allow_unicode=True))
            check = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            port = free_port()
            env = {
                "PATH": "/usr/bin:/bin",
                "GPUFLEET_METRIC_NAMES": agent_env["GPUFLEET_METRIC_NAMES"],
                "GPUFLEET_LISTEN": f"127.0.0.1:{port}",
                "GPUFLEET_SIMULATE": "2",
                "GPUFLEET_NODE": "gpu-node-7",
                "GPUFLEET_INTERVAL": "0.5",
                "GPUFLEET_SPOOL_DIR": "",
            }
            agent = subprocess.Popen(
                [sys.executable, "-m", "gpufleet.cli", "agent"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(agent)
            installs[mode] = {
                "agent_url": f"http://127.0.0.1:{port}",
                "agent": agent,
                "rules": rules,
                "tmp": tmp,
            }
            installs[mode]["names"] = agent_env["GPUFLEET_METRIC_NAMES"]
        for install in installs.values():
            wait_until(lambda i=install: _ready_agent(i["agent_url"], i["agent"]), timeout=30)
            _inject(install["agent_url"], "thermal", "--gpu", "1", "--duration", "900")
            prom, url = _prometheus(
                install["tmp"], [install["agent_url"].removeprefix("http://")], [install["rules"]]
            )
            procs.append(prom)
            install["url"] = url
        for install in installs.values():
            wait_until(lambda i=install: _query(i["url"], "up == 1"), timeout=30)
        time.sleep(3)  # rules evaluated over the fleet before any fault shows: what fires now is the baseline
        for install in installs.values():
            install["baseline"] = _firing(install["url"])
        yield installs
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.mark.parametrize("mode", MODES)
def test_the_charts_rules_fire_on_an_injected_xid_and_thermal_slowdown_in_each_naming_mode(
    chart_installs, mode
):
    install = chart_installs[mode]
    assert install["names"] == mode  # the chart's agent.metricNames reached the agent
    assert not install["baseline"] & WANT, install["baseline"]
    _inject(install["agent_url"], "xid", "--xid", "48", "--gpu", "0")
    url = install["url"]
    wait_until(lambda: _firing(url) >= WANT, timeout=180, interval=1)
    alerts = {s["metric"]["alertname"]: s["metric"] for s in _query(url, 'ALERTS{alertstate="firing"}')}
    xid, hot = alerts["GpuXidCritical"], alerts["GpuHardwareThermalSlowdown"]
    assert (xid["xid"], xid["node"], xid["severity"]) == ("48", "gpu-node-7", "critical")
    # gpufleet's labels on the alert in every mode: annotations and Alertmanager grouping (node, uuid) hold
    assert (hot["node"], hot["reason"], hot["uuid"].startswith("GPU-")) == ("gpu-node-7", "hw_thermal", True)


def _ready_agent(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, f"the agent stopped: {proc.stderr.read() if proc.stderr else ''}"
    try:
        return b"gpufleet_gpu_up{" in _fetch(url + "/metrics")[1]
    except OSError:
        return False


# ---- the chart: what it ships for each mode, and what it refuses --------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_the_chart_ships_the_rules_and_the_one_dashboard_flavour_of_the_agents_naming(mode):
    objs = objects(
        render(
            {
                "agent": {"metricNames": mode},
                "prometheusRule": {"enabled": True},
                "grafana": {"dashboards": {"configMaps": True}},
            }
        )
    )
    rule = find(objs, "PrometheusRule")
    names = "dcgm" if mode == "dcgm" else "gpufleet"
    assert rule["metadata"]["annotations"]["gpufleet.io/metric-names"] == names
    exported = _export(
        "--metric-names",
        mode,
        "--runbook-base-url",
        "http://gf-gpufleet-collector.monitoring.svc:9446/runbooks",
    )
    assert rule["spec"] == exported["spec"]
    shipped = {k for o in objs if o["kind"] == "ConfigMap" for k in o["data"] if k.endswith(".json")}
    flavour = "prometheus-dcgm" if mode == "dcgm" else "prometheus"
    assert shipped == {f"{d.slug}.{flavour}.json" for d in dashboards.DASHBOARDS}
    pg = objects(
        render(
            {
                "agent": {"metricNames": mode},
                "database": {"existingSecret": "gpufleet-db"},
                "grafana": {"dashboards": {"configMaps": True, "flavour": "postgres"}},
            }
        )
    )
    assert {k for o in pg if o["kind"] == "ConfigMap" for k in o["data"] if k.endswith(".json")} == {
        f"{d.slug}.postgres.json" for d in dashboards.DASHBOARDS
    }


SITE_RULES = """\
groups:
  - name: site
    rules:
      - alert: SiteGpuHot
        kind: threshold
        metric: gpufleet_gpu_temperature_celsius
        op: ">"
        value: 85
        for: 2m
        annotations: {summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} is hot"}
"""


def _site_export(tmp_path: Path, mode: str, text: str = SITE_RULES, *extra: str) -> str:
    site = tmp_path / "site.yaml"
    site.write_text(text)
    result = CliRunner().invoke(
        main,
        ["alerts", "export", "--format", "prometheusrule", "--metric-names", mode, *extra, str(site)],
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def test_rule_files_of_your_own_reach_the_prometheus_rule_through_their_export(tmp_path):
    exported = _site_export(tmp_path, "dcgm", SITE_RULES, "--with-builtin")
    values = {
        "agent": {"metricNames": "dcgm"},
        "rules": {"files": {"site.yaml": SITE_RULES}},
        "prometheusRule": {"enabled": True, "exported": exported},
    }
    rules = {r["alert"]: r for g in _rule_groups(values)["groups"] for r in g["rules"]}
    assert "DCGM_FI_DEV_GPU_TEMP" in rules["SiteGpuHot"]["expr"] and "GpuXidCritical" in rules
    own = {
        "rules": {"builtin": False, "files": {"site.yaml": SITE_RULES}},
        "prometheusRule": {"enabled": True, "exported": _site_export(tmp_path, "both")},
        "agent": {"metricNames": "both"},
    }
    assert [r["alert"] for g in _rule_groups(own)["groups"] for r in g["rules"]] == ["SiteGpuHot"]


@pytest.mark.parametrize(
    "case, says",
    [
        ("wrong-names", "prometheusRule.exported queries gpufleet metric names, but agent.metricNames=dcgm"),
        ("edited-since", "was made from another site.yaml than the collector loads"),
        ("without-builtin", "was made without gpu.yaml, which the collector loads"),
        ("not-loaded", "holds rules of gpu.yaml, which the collector does not load"),
    ],
)
def test_a_prometheus_rule_that_would_not_match_what_agents_serve_or_the_collector_runs_fails(
    tmp_path, case, says
):
    values: dict = {
        "agent": {"metricNames": "dcgm"},
        "rules": {"files": {"site.yaml": SITE_RULES}},
        "prometheusRule": {"enabled": True},
    }
    if case == "wrong-names":
        exported = _site_export(tmp_path, "gpufleet", SITE_RULES, "--with-builtin")
    elif case == "edited-since":
        exported = _site_export(tmp_path, "dcgm", SITE_RULES.replace("85", "80"), "--with-builtin")
    elif case == "without-builtin":
        exported = _site_export(tmp_path, "dcgm")
    else:
        exported = _site_export(tmp_path, "dcgm", SITE_RULES, "--with-builtin")
        values["rules"]["builtin"] = False
    values["prometheusRule"]["exported"] = exported
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert says in str(err.value) and "--set-file prometheusRule.exported=" in str(err.value)
