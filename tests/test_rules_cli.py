"""`gpufleet alerts check / test / backtest / export` and `gpufleet silence`, as a user runs them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpufleet.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_check_names_every_problem_with_file_line_and_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent("""\
        groups:
          - name: g
            rules:
              - alert: NoValue
                metric: gpufleet_gpu_temperature_celsius
                annotations: {summary: x}
              - alert: BadKind
                kind: magic
                metric: m
              - alert: Peer
                kind: peer
                metric: m
                annotations: {summary: x}
              - alert: Fine
                kind: event
                metric: m
                xid_set: nonexistent
                annotations: {summary: x}
        """)
    )
    r = run("alerts", "check", str(bad))
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert any(f"{bad}:4: rule 'NoValue': a threshold rule needs 'value'" in ln for ln in lines)
    assert any(f"{bad}:7: rule 'BadKind': kind 'magic'" in ln for ln in lines)
    assert any(f"{bad}:10: rule 'Peer': a peer rule needs 'by'" in ln for ln in lines)
    assert any(f"{bad}:14: rule 'Fine': xid_set 'nonexistent' is not defined" in ln for ln in lines)


def test_the_default_pack_checks_and_its_rule_tests_pass():
    import re

    from gpufleet.collector.rules.model import default_rules_path

    declared = sum(
        len(re.findall(r"^\s*- alert:", f.read_text(), re.M)) for f in default_rules_path().glob("*.yaml")
    )
    assert declared >= 21
    assert run("alerts", "check").output.strip() == f"{declared} rules OK"
    r = run("alerts", "test")
    assert r.exit_code == 0 and r.output.strip() == "8/8 rule tests passed"


def test_a_rule_test_that_expects_the_wrong_thing_fails(tmp_path):
    test = yaml.safe_load((REPO / "alerts" / "tests" / "gpu_test.yaml").read_text())
    test["rule_files"] = [str(REPO / "alerts" / "gpu.yaml")]
    test["tests"] = [test["tests"][0]]
    test["tests"][0]["alert_rule_test"][1]["exp_alerts"][0]["exp_labels"]["severity"] = "warning"
    f = tmp_path / "wrong_test.yaml"
    f.write_text(yaml.safe_dump(test))
    r = run("alerts", "test", str(f))
    assert r.exit_code == 1
    assert "0/1 rule tests passed" in r.output and "GpuXidCritical at 2s: expected firing" in r.output


def test_backtest_prints_each_notification_as_a_json_line(tmp_path):
    trace = tmp_path / "trace.om"
    gpu = 'node="n1",gpu="3",uuid="GPU-c",model="H100"'
    lines = ["# TYPE gpufleet_gpu_up gauge"]
    lines += [
        f"gpufleet_gpu_up{{{gpu}}} {1 if t < 1_700_000_030 else 0} {t}"
        for t in range(1_700_000_000, 1_700_000_060, 10)
    ]
    lines += [
        "# TYPE gpufleet_gpu_xid_errors counter",
        f'gpufleet_gpu_xid_errors_total{{{gpu},xid="79"}} 1 1700000030',
        "# EOF",
        "",
    ]
    trace.write_text("\n".join(lines))
    r = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "alerts", "backtest", str(trace)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert sorted((x["alert"], x["state"], x["at"]) for x in recs) == [
        ("GpuFellOffBus", "firing", 1_700_000_030),
        ("GpuLost", "firing", 1_700_000_030),
    ]
    for x in recs:
        assert (
            x["labels"]["severity"] == "critical"
            and x["labels"]["uuid"] == "GPU-c"
            and x["labels"]["node"] == "n1"
        )


def test_backtest_refuses_a_trace_without_timestamps(tmp_path):
    trace = tmp_path / "t.om"
    trace.write_text('# TYPE gpufleet_gpu_up gauge\ngpufleet_gpu_up{uuid="x"} 1\n# EOF\n')
    r = run("alerts", "backtest", str(trace))
    assert r.exit_code != 0 and "no timestamp" in r.output


@pytest.fixture
def promtool():
    path = shutil.which("promtool")
    if path is None:  # the suite's contract: the real promtool runs here (CI installs Debian's prometheus)
        pytest.fail(
            "promtool is needed for this test: apt-get install prometheus (make test installs it when run as root)"
        )
    return path


def test_export_writes_rule_files_that_real_promtool_accepts(tmp_path, promtool):
    out = tmp_path / "gpufleet.rules.yml"
    r = run("alerts", "export", "--format", "prometheus", "-o", str(out))
    assert "not exported: GpuPcieReplayRate" in r.output
    check = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    import re

    from gpufleet.collector.rules.model import default_rules_path, load_rules

    not_exported = len(re.findall(r"^not exported: ", r.output, re.M))
    assert f"SUCCESS: {len(load_rules([default_rules_path()])) - not_exported} rules found" in check.stdout
    # the PrometheusRule object carries the same groups; promtool checks them too
    manifest = tmp_path / "prometheusrule.yaml"
    run("alerts", "export", "--format", "prometheusrule", "--namespace", "monitoring", "-o", str(manifest))
    obj = yaml.safe_load(manifest.read_text())
    assert obj["kind"] == "PrometheusRule" and obj["metadata"]["namespace"] == "monitoring"
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(obj["spec"]))
    check = subprocess.run([promtool, "check", "rules", str(spec)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_exported_event_and_threshold_rules_fire_in_promtool_as_in_gpufleet(tmp_path, promtool):
    """The exported PromQL means what the native rule means: promtool's own rule tests run it."""
    rules = tmp_path / "gpufleet.rules.yml"
    run("alerts", "export", "-o", str(rules))
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'gpufleet_gpu_xid_errors_total{node="n1",gpu="0",uuid="GPU-a",xid="48"}',
                        "values": "_ _ 1 1",
                    },
                    {"series": 'gpufleet_gpu_up{node="n1",gpu="1",uuid="GPU-b"}', "values": "1 0 0 0"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "GpuXidCritical",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "node": "n1",
                                    "gpu": "0",
                                    "uuid": "GPU-a",
                                    "xid": "48",
                                    "severity": "critical",
                                },
                                "exp_annotations": {
                                    "summary": "XID 48 on n1 GPU 0",
                                    "description": "The driver reported XID 48 on GPU 0 (GPU-a). Drain the node's jobs "
                                    "from this GPU and check the runbook.",
                                    "runbook_url": "http://localhost:9446/runbooks/xid-critical",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "2m",
                        "alertname": "GpuLost",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "node": "n1",
                                    "gpu": "1",
                                    "uuid": "GPU-b",
                                    "severity": "critical",
                                },
                                "exp_annotations": {
                                    "summary": "GPU 1 on n1 stopped answering NVML",
                                    "description": "GPU GPU-b reads as lost (fell off the bus or needs a reset).",
                                    "runbook_url": "http://localhost:9446/runbooks/gpu-lost",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    f = tmp_path / "test.yml"
    f.write_text(yaml.safe_dump(test))
    r = subprocess.run([promtool, "test", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_rule_in_the_pack_has_a_runbook_that_exists():
    from gpufleet.collector.rules.model import default_rules_path, load_pack

    for r in load_pack([default_rules_path()]).rules:
        name = r.annotations.get("runbook_url", "")
        assert re.fullmatch(r"[a-z0-9-]+", name), (
            r.name,
            name,
        )  # a shipped runbook's name, linked as BASE/NAME
        page = REPO / "alerts" / "runbooks" / f"{name}.md"
        assert page.exists(), (r.name, page)
        text = page.read_text()
        assert r.name in text and "## What to check" in text and "## What to do" in text


def test_rule_tests_take_promtools_expanding_notation(tmp_path):
    """``a+bxn`` and ``a-bxn`` expand as promtool expands them: n+1 values from a, b apart."""
    test = {
        "rule_files": [str(REPO / "alerts" / "gpu.yaml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'gpufleet_gpu_temperature_celsius{cluster="c",node="n1",gpu="0",uuid="GPU-0"}',
                        "values": "60+1x20 80-1x5",
                    }
                ],
                "alert_rule_test": [{"eval_time": "10m", "alertname": "GpuXidCritical", "exp_alerts": []}],
            }
        ],
    }
    f = tmp_path / "expanding_test.yaml"
    f.write_text(yaml.safe_dump(test))
    r = run("alerts", "test", str(f))
    assert r.exit_code == 0, r.output
    from gpufleet.collector.rules.testing import expand_values

    assert expand_values("0+5x3 10-2.5x2") == [0.0, 5.0, 10.0, 15.0, 10.0, 7.5, 5.0]
