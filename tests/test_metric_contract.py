"""Every series a rule, dashboard, report or exported rule reads is one an agent or collector writes.

The catalogue is built from the producers (the field table, and the ``METRICS`` each other producer
declares next to its code); the first tests run each producer and hold it to its declaration, the rest
hold every reader to the catalogue, and the last ones seed a misspelling into a copy of each kind of reader
and show the check names the file and the place.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from gpufleet.agent import attribution, core, nvml, sinks, spool
from gpufleet.agent.catalogue import AGENT_METRICS, SECTIONS
from gpufleet.agent.core import Agent
from gpufleet.agent.dcgm_names import to_dcgm
from gpufleet.agent.families import Family
from gpufleet.agent.fields import XID
from gpufleet.agent.inference.config import Endpoint, InferenceSettings, Slo
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.push import Pusher
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sinks import PushMetrics
from gpufleet.agent.sources import host, inference
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.agent.sources.host import HostSource
from gpufleet.agent.sources.inference import InferenceSource
from gpufleet.agent.spool import Spool
from gpufleet.cli import main
from gpufleet.cli.catalogue import Reference, catalogue, problems, rule_catalogue, rule_references
from gpufleet.collector.app import OWN_METRICS
from gpufleet.collector.rules.model import default_rules_path, load_pack
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core.metricspec import MetricSpec
from gpufleet.core.promql import reads
from tests.conftest import free_port, wait_until
from tests.inference_servers import MetricsServer, TritonMetrics, VllmMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"
REPORT = ROOT / "collector" / "report.py"
PROMETHEUS_RULE = ROOT / "helm" / "gpufleet" / "files" / "prometheusrule.yaml"


# ---- the producers emit what they declare ---------------------------------------------------------------
def assert_emits_as_declared(
    fams: Iterable[Family], declared: Iterable[MetricSpec], *, exactly: bool
) -> None:
    specs = {m.name: m for m in declared}
    seen: set[str] = set()
    for f in fams:
        assert f.name in specs, f"{f.name} is emitted but not in the catalogue"
        assert f.kind == specs[f.name].kind, f.name
        for labels, _ in f.samples:
            extra = set(labels) - set(specs[f.name].labels)
            assert not extra, f"{f.name} carries labels {sorted(extra)} its catalogue entry does not list"
        seen.add(f.name)
    if exactly:
        assert seen == set(specs), f"declared but not emitted: {sorted(set(specs) - seen)}"


def simulated_gpu_families(mig: bool) -> list[Family]:
    clock = SimpleNamespace(t=1000.0)
    sim = SimulatedNVML(
        2, clock=lambda: clock.t, seed=3, workload="busy", mig={1: ["3g.40gb"]} if mig else None
    )
    src = GpuSource(
        Nvml(sim),
        "node-a",
        cluster="c1",
        background=False,
        clock=lambda: clock.t,
        process_metrics=True,
    )
    src.start()
    try:
        src.collect()
        clock.t += 60
        sim.inject(0, "xid", xid=13)  # the event thread counts it: the XID family has a series from then on

        def with_xid() -> list[Family] | None:
            clock.t += 1  # GPM rates need time between two samples
            fams = src.collect()
            return fams if any(f.name == XID[0] and f.samples for f in fams) else None

        return wait_until(with_xid, timeout=10)
    finally:
        src.close()


def test_a_simulated_gpu_node_emits_only_catalogued_series_with_catalogued_labels():
    fams = simulated_gpu_families(mig=True)
    assert_emits_as_declared(fams, SECTIONS["GPU source"], exactly=False)
    names = {f.name for f in fams}
    assert {"gpufleet_gpu_up", "gpufleet_gpu_xid_errors_total", "gpufleet_mig_info"} <= names


def test_in_dcgm_mode_every_gpu_series_the_agent_writes_is_in_the_dcgm_catalogue():
    known = catalogue("dcgm")
    for f in to_dcgm(simulated_gpu_families(mig=True)):
        assert f.name in known, f"dcgm mode writes {f.name}, which the catalogue does not know"
    for m in SECTIONS["GPU source"]:
        for twin in m.dcgm:
            assert twin in known, twin


def test_the_host_source_emits_exactly_its_declaration():
    assert_emits_as_declared(HostSource("node-a", cluster="c1").collect(), host.METRICS, exactly=True)


def test_vllm_and_triton_servers_read_twice_with_an_slo_yield_exactly_the_declared_reader_series():
    vllm, triton = VllmMetrics("llama"), TritonMetrics("resnet")
    servers = [MetricsServer(vllm.render), MetricsServer(triton.render)]
    clock = SimpleNamespace(now=1000.0)
    endpoints = [Endpoint("llama", servers[0].url), Endpoint("resnet", servers[1].url)]
    src = InferenceSource(
        InferenceSettings(endpoints=endpoints, interval=10.0, slo=Slo(1.0, 0.99)),
        "node-a",
        cluster="c1",
        clock=lambda: clock.now,
    )
    src.start()
    try:
        for gauge, value in ((vllm.running, 3), (vllm.waiting, 1), (vllm.kv, 0.4)):
            gauge.labels(model_name="llama", engine="0").set(value)
        vllm.request(0.5, ttft=0.05, itl=[0.02] * 4, queue=0.01, prompt_tokens=20)
        triton.request(0.02, 0.001, 0.015, 0.01, batch=4)
        src.collect()
        clock.now += 10
        for i in range(50):
            vllm.request(0.5 + i / 100, ttft=0.05, itl=[0.02] * 4, queue=0.01, prompt_tokens=20)
            triton.request(0.02, 0.001, 0.015, 0.01, batch=4)
        fams = src.collect()
    finally:
        for s in servers:
            s.close()
        src.close()
    # what probes, the client receiver, pod discovery, GPU lookup and a formed baseline add is not read here
    reader_series = [
        m
        for m in inference.METRICS
        if not m.when.startswith(
            ("opt-in: probes", "opt-in: streaming", "opt-in: the client", "after an event")
        )
        and "Kubernetes" not in m.when
        and m.name not in ("gpufleet_inference_gpu_info", "gpufleet_inference_latency_baseline_ratio")
    ]
    assert_emits_as_declared(fams, reader_series, exactly=True)


def test_the_agents_own_metrics_are_what_each_component_declares(tmp_path):
    sp = Spool(tmp_path / "spool")
    sp.put(b"x", 3)
    sp.dropped_samples["age"] = 1
    assert_emits_as_declared(sp.collect(), spool.METRICS, exactly=True)
    pusher = Pusher("http://127.0.0.1:9/api/v1/write")
    assert_emits_as_declared(PushMetrics(pusher).collect(), sinks.METRICS, exactly=True)
    pods = attribution.PodAttribution("/nonexistent.sock", list_pods=lambda: None)
    assert_emits_as_declared(pods.collect(), attribution.METRICS, exactly=True)
    gateway = Nvml(SimulatedNVML(1))
    assert_emits_as_declared(gateway.collect(), nvml.METRICS, exactly=True)
    agent = Agent([HostSource("node-a")], node="node-a")
    snapshot = agent.sample()
    own = [f for f in snapshot.families if f.name.startswith("gpufleet_agent_source_")]
    assert_emits_as_declared(own, core.METRICS, exactly=True)


def test_a_running_collector_exports_exactly_its_declared_own_metrics(tmp_path):
    port = free_port()
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path / 't.db'}")).start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        c.close()
    typed = dict(re.findall(r"^# TYPE (gpufleet_\S+) (\S+)$", text, re.M))
    # prometheus_client adds a _created gauge beside every counter and histogram: a timestamp, not a metric
    exported = {n: k for n, k in typed.items() if not n.endswith("_created")}
    assert exported == {m.name: m.kind for m in OWN_METRICS}


def test_docs_metrics_md_lists_the_catalogue_as_it_is():
    from gpufleet.agent.metrics_doc import render_catalogue
    from gpufleet.cli.catalogue import sections

    doc = (ROOT / "docs" / "metrics.md").read_text()
    assert render_catalogue(sections()) in doc, (
        "docs/metrics.md is stale: run python -m gpufleet.cli.catalogue"
    )


# ---- the readers --------------------------------------------------------------------------------------
def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def promql_references(where: str, expr: str) -> list[Reference]:
    r = reads(expr)
    out = [Reference(where, s.name, tuple(s.labels)) for s in r.selectors]
    grouping = set(r.grouping) - set(r.made)
    carried = {
        label for s in r.selectors for label in (catalogue().get(s.name) or MetricSpec("", "", "", "")).labels
    }
    for label in sorted(grouping - carried):
        # a grouping label none of the expression's series carries: report it against the first series
        out.append(Reference(where, r.selectors[0].name if r.selectors else "", (label,)))
    return out


def _targets(doc: object, path: str = "") -> Iterable[tuple[str, str, str]]:
    """(key, query, where in the document) of every query in a Grafana dashboard."""
    if isinstance(doc, dict):
        title = doc.get("title", "")
        for k, v in doc.items():
            if k in ("expr", "rawSql") and isinstance(v, str):
                yield k, v, f"{path} {title!r}".strip()
            elif k == "query" and isinstance(v, str | dict) and doc.get("type") == "query":
                q = v.get("query", "") if isinstance(v, dict) else v
                if isinstance(q, str) and q:
                    yield (
                        ("rawSql" if "SELECT" in q.upper() else "expr"),
                        q,
                        f"{path} variable {doc.get('name', '')!r}",
                    )
            else:
                yield from _targets(v, f"{path}/{title}" if title and k == "panels" else path)
    elif isinstance(doc, list):
        for x in doc:
            yield from _targets(x, path)


_SQL_METRIC = re.compile(r"'((?:gpufleet|DCGM)_[A-Za-z0-9_]+)'")
_SQL_LABEL = re.compile(r"labels\s*->>?\s*'([A-Za-z_][A-Za-z0-9_]*)'|json_extract\(labels,\s*'\$\.(\w+)'\)")
_PROMQL_FN = re.compile(r"label_values\(([^)]*)\)")


def sql_references(where: str, sql: str) -> list[Reference]:
    metrics = _SQL_METRIC.findall(sql)
    labels = tuple(a or b for a, b in _SQL_LABEL.findall(sql))
    return [Reference(where, m, labels if len(metrics) == 1 else ()) for m in metrics]


def dashboard_references(path: Path) -> list[Reference]:
    out: list[Reference] = []
    for key, query, where in _targets(json.loads(path.read_text())):
        at = f"{path.name}:{where}"
        if key == "rawSql":
            out += sql_references(at, query)
        else:
            for inner in _PROMQL_FN.findall(query):  # label_values(metric{…}, label)
                sel, _, label = inner.rpartition(",")
                out += promql_references(at, sel) if sel else []
                out += [Reference(at, reads(sel).selectors[0].name, (label.strip(),))] if sel else []
            if not _PROMQL_FN.search(query) and not query.startswith(("label_values", "query_result")):
                out += promql_references(at, query)
    return out


def report_references(path: Path) -> list[Reference]:
    """The report's queries name their series as string literals (SQL and the constants they use)."""
    text = path.read_text()
    out = []
    for m in re.finditer(r"""["']((?:gpufleet|DCGM)_[a-z0-9_]+)["']""", text):
        if m.group(1) not in ("gpufleet_points", "gpufleet_partitions"):
            out.append(Reference(f"{path.name}:{_line(text, m.start())}", m.group(1)))
    return out


def prometheusrule_references(path: Path) -> tuple[list[Reference], set[str]]:
    """References of a PrometheusRule (or rule-file) YAML, and the series its recording rules make."""
    text = path.read_text()
    doc = yaml.safe_load(text)
    groups = doc.get("spec", doc).get("groups", [])
    made = {r["record"] for g in groups for r in g.get("rules", []) if "record" in r}
    out: list[Reference] = []
    for g in groups:
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            pos = text.find(f": {name}\n")
            at = f"{path.name}:{_line(text, max(pos, 0))}: rule {name}"
            out += promql_references(at, str(r["expr"]))
            series = [s.name for s in reads(str(r["expr"])).selectors]
            by = set(reads(str(r["expr"])).grouping)
            for text_ in (r.get("annotations") or {}).values():
                for label in re.findall(r"\$labels\.(\w+)", str(text_)):
                    if label not in (r.get("labels") or {}) and label not in by:
                        out.append(Reference(f"{at} (annotation)", _carrier(series, label), (label,)))
    return out, made


def _carrier(series: list[str], label: str) -> str:
    known = catalogue()
    return next((s for s in series if s in known and label in known[s].labels), series[0] if series else "")


def check_all(refs: list[Reference], produced: Iterable[str] = ()) -> list[str]:
    return problems(refs, catalogue(), produced=produced)


def test_the_rule_pack_reads_only_catalogued_series_and_labels():
    pack = load_pack([default_rules_path()])
    assert check_all(rule_references(pack.rules)) == []


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_every_dashboard_query_reads_catalogued_series_and_labels(path):
    refs = dashboard_references(path)
    assert refs, f"no queries found in {path.name}"
    if path.name.endswith(".prometheus-dcgm.json"):  # what agents in dcgm naming mode serve, and nothing else
        served = catalogue("dcgm")
        known = {name: spec for name, spec in rule_catalogue().items() if name in served}
        assert problems(refs, known) == []
    else:
        assert check_all(refs) == []


def test_the_report_reads_only_catalogued_series():
    refs = report_references(REPORT)
    assert refs
    assert check_all(refs) == []


def test_the_shipped_prometheusrule_reads_only_catalogued_series_and_labels():
    refs, made = prometheusrule_references(PROMETHEUS_RULE)
    assert refs
    assert check_all(refs, made) == []


def test_gpufleet_alerts_export_reads_only_catalogued_series_and_labels(tmp_path):
    result = CliRunner().invoke(main, ["alerts", "export", "--format", "prometheusrule"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "exported.yaml"
    out.write_text(result.stdout)
    refs, made = prometheusrule_references(out)
    assert check_all(refs, made) == []


def test_every_gpu_series_has_a_dcgm_twin_or_keeps_its_name_in_dcgm_mode():
    dcgm = catalogue("dcgm")
    for m in AGENT_METRICS:
        names = m.dcgm or m.wire_names()
        assert all(n in dcgm for n in names), m.name


# ---- a misspelling in each kind of reader is found, with its file and place ---------------------------
def misspelled(src: Path, dst: Path, right: str, wrong: str) -> Path:
    text = src.read_text()
    assert right in text, f"{right} is not in {src.name}"
    dst.write_text(text.replace(right, wrong, 1))
    return dst


def test_a_misspelled_metric_in_a_rule_file_is_named_with_file_line_and_rule(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(default_rules_path(), rules, ignore=shutil.ignore_patterns("tests", "runbooks", "*.py"))
    f = misspelled(
        rules / "gpu.yaml", rules / "gpu.yaml", "metric: gpufleet_gpu_up\n", "metric: gpufleet_gpu_upp\n"
    )
    found = [p for p in check_all(rule_references(load_pack([rules]).rules)) if "gpufleet_gpu_upp" in p]
    line = f.read_text().splitlines().index("        metric: gpufleet_gpu_upp") + 1
    assert found and found[0].startswith(f"{f}:"), found
    assert "rule GpuLost" in found[0] and "no gpufleet producer exports" in found[0]
    assert int(found[0].split(":")[1]) <= line


def test_a_misspelled_label_in_a_rule_annotation_is_named(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(default_rules_path(), rules, ignore=shutil.ignore_patterns("tests", "runbooks", "*.py"))
    misspelled(
        rules / "gpu.yaml",
        rules / "gpu.yaml",
        "stopped answering NVML",
        "stopped answering NVML {{ $labels.uiud }}",
    )
    found = [p for p in check_all(rule_references(load_pack([rules]).rules)) if "'uiud'" in p]
    assert len(found) == 1 and "rule GpuLost (annotation)" in found[0], found


def test_a_misspelled_metric_in_a_prometheus_dashboard_is_named_with_file_and_panel(tmp_path):
    f = misspelled(
        DASHBOARDS / "gpu-health.prometheus.json",
        tmp_path / "gpu-health.prometheus.json",
        "gpufleet_gpu_pcie_replays_total",
        "gpufleet_gpu_pcie_replay_total",
    )
    found = [p for p in check_all(dashboard_references(f)) if "gpufleet_gpu_pcie_replay_total" in p]
    assert found and found[0].startswith("gpu-health.prometheus.json:"), found
    assert "'" in found[0].split(":")[1], "the panel's title names the place"


def test_a_misspelled_label_in_a_promql_matcher_is_named(tmp_path):
    f = misspelled(
        DASHBOARDS / "inference.prometheus.json",
        tmp_path / "inference.prometheus.json",
        'quantile=\\"0.99\\"',
        'quantil=\\"0.99\\"',
    )
    found = [p for p in check_all(dashboard_references(f)) if "'quantil'" in p]
    assert found and found[0].startswith("inference.prometheus.json:"), found


def test_a_misspelled_metric_in_a_postgres_dashboard_is_named_with_file_and_panel(tmp_path):
    f = misspelled(
        DASHBOARDS / "gpu-health.postgres.json",
        tmp_path / "gpu-health.postgres.json",
        "'gpufleet_gpu_pcie_replays_total'",
        "'gpufleet_gpu_pcie_replay_total'",
    )
    found = [p for p in check_all(dashboard_references(f)) if "gpufleet_gpu_pcie_replay_total" in p]
    assert found and found[0].startswith("gpu-health.postgres.json:"), found


def test_a_misspelled_metric_in_the_report_is_named_with_file_and_line(tmp_path):
    f = misspelled(REPORT, tmp_path / "report.py", "'gpufleet_gpu_power_watts'", "'gpufleet_gpu_power_wats'")
    line = next(i for i, s in enumerate(f.read_text().splitlines(), 1) if "gpufleet_gpu_power_wats" in s)
    found = [p for p in check_all(report_references(f)) if "gpufleet_gpu_power_wats" in p]
    assert found == [
        f"report.py:{line}: reads metric gpufleet_gpu_power_wats, which no gpufleet producer exports"
    ]


def test_a_misspelled_metric_in_the_prometheusrule_is_named_with_file_line_and_rule(tmp_path):
    f = misspelled(
        PROMETHEUS_RULE,
        tmp_path / "prometheusrule.yaml",
        "expr: gpufleet_gpu_up == 0",
        "expr: gpufleet_gpu_upp == 0",
    )
    refs, made = prometheusrule_references(f)
    found = [p for p in check_all(refs, made) if "gpufleet_gpu_upp" in p]
    line = next(i for i, s in enumerate(f.read_text().splitlines(), 1) if "alert: GpuLost" in s)
    assert found and found[0].startswith(f"prometheusrule.yaml:{line}: rule GpuLost"), found


def test_a_misspelled_label_in_a_prometheusrule_annotation_is_named(tmp_path):
    f = misspelled(PROMETHEUS_RULE, tmp_path / "prometheusrule.yaml", "$labels.uuid", "$labels.uiid")
    refs, made = prometheusrule_references(f)
    found = [p for p in check_all(refs, made) if "'uiid'" in p]
    assert found and "(annotation)" in found[0], found


# ---- `gpufleet alerts check` warns with the same catalogue ------------------------------------------
def test_alerts_check_warns_about_a_site_rule_reading_a_series_no_producer_writes_but_accepts_it(tmp_path):
    rules = tmp_path / "site.yaml"
    rules.write_text(
        "groups:\n"
        "  - name: site\n"
        "    rules:\n"
        "      - alert: RackTooWarm\n"
        "        kind: threshold\n"
        "        metric: site_rack_inlet_celsius\n"
        "        op: '>'\n"
        "        value: 35\n"
        "        severity: warning\n"
        "        annotations: {summary: 'rack {{ $labels.rack }} is warm'}\n"
        "      - alert: GpuHot\n"
        "        kind: threshold\n"
        "        metric: gpufleet_gpu_temperature_celsius\n"
        "        match: {uuid: 'GPU-.*'}\n"
        "        op: '>'\n"
        "        value: 90\n"
        "        severity: warning\n"
        "        annotations: {summary: 'GPU {{ $labels.gpu }} on {{ $labels.node }} is hot'}\n"
    )
    result = CliRunner().invoke(main, ["alerts", "check", str(rules)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "2 rules OK"
    warnings = result.stderr.strip().splitlines()
    assert warnings == [
        f"warning: {rules}:4: rule RackTooWarm: reads metric site_rack_inlet_celsius, "
        "which no gpufleet producer exports"
    ]
