"""`gpufleet alerts check` is strict, as a user runs it (the console script): every mistake that would page
someone with a broken message is an error with file, line, rule and the fix; a metric no gpufleet agent,
inference reader or rule writes is a warning, since sites add exporters of their own. Annotation templates
render for real — in Slack and on the console as Prometheus renders the exported rule."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from slack_sdk import WebClient

from gpufleet.collector.notify.console import ConsoleNotifier
from gpufleet.collector.notify.queue import SendQueue
from gpufleet.collector.notify.slack import SlackNotifier
from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import Route, RuleError, load_pack, render
from tests.doubles.slack_api import SlackDouble

SCRIPT = Path(sys.executable).with_name("gpufleet")
GPUFLEET = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gpufleet.cli"]


def gpufleet(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    return subprocess.run(
        [*GPUFLEET, *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def rule(name: str, summary: str, metric: str = "gpufleet_gpu_temperature_celsius", extra: str = "") -> str:
    """One threshold rule of a rule file, as YAML lines (its `- alert:` line first)."""
    return textwrap.indent(
        f"- alert: {name}\n"
        f"  metric: {metric}\n"
        "  op: '>'\n"
        "  value: 85\n"
        f"{extra}"
        "  annotations:\n"
        f"    summary: {summary}\n",
        "      ",
    )


def rule_file(path: Path, *rules: str) -> Path:
    path.write_text("groups:\n  - name: site\n    rules:\n" + "".join(rules))
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, s in enumerate(path.read_text().splitlines(), 1) if text in s)


def errors(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return r.stderr.strip().splitlines()


# ---- errors: each one line with file:line, the rule and the fix ------------------------------------
def test_a_name_used_twice_across_two_files_is_an_error_naming_both_places(tmp_path):
    a = rule_file(tmp_path / "a.yaml", rule("GpuHot", "'hot'"), rule("GpuWarm", "'warm'"))
    b = rule_file(tmp_path / "b.yaml", rule("GpuHot", "'{{ $labels.node }} is hot'"))
    lines = errors(gpufleet("alerts", "check", str(a), str(b), cwd=tmp_path))
    assert lines == [
        f"{b}:4: rule 'GpuHot' is defined twice (first at {a}:4); rename one: alert names are unique across "
        "all the rule files loaded together"
    ]


def test_a_duplicate_is_found_even_when_the_rule_has_other_mistakes(tmp_path):
    f = rule_file(tmp_path / "a.yaml", rule("GpuHot", "'{{ $value | humanise }}'"), rule("GpuHot", "ok"))
    lines = errors(gpufleet("alerts", "check", str(f), cwd=tmp_path))
    assert len(lines) == 2
    assert lines[0].startswith(f"{f}:{line_of(f, 'humanise')}: rule 'GpuHot': annotation summary: ")
    assert lines[1].startswith(f"{f}:10: rule 'GpuHot' is defined twice (first at {f}:4)")


@pytest.mark.parametrize(
    ("summary", "message"),
    [
        pytest.param(
            "'GPU on {{ $labels.node'",
            "'{{ $labels.node' has no closing }}; end the action with }}, e.g. {{ $labels.node }}",
            id="unterminated",
        ),
        pytest.param(
            "'{{ $labels.node } is hot'",
            "'{{ $labels.node }' closes with a single }; write {{ $labels.node }}",
            id="single-brace",
        ),
        pytest.param(
            "'busy {{ $value | humanizePercentag }}'",
            "{{ $value | humanizePercentag }}: unknown function humanizePercentag; did you mean "
            "humanizePercentage? (docs/rules.md lists the functions)",
            id="unknown-function",
        ),
        pytest.param(
            "'{{ $value | sparkline }}'",
            "{{ $value | sparkline }}: unknown function sparkline; use one of humanize, humanize1024, ",
            id="unknown-function-listed",
        ),
        pytest.param(
            "'{{ $labels.node }} at {{ $valeu }}'",
            "{{ $valeu }}: unknown variable $valeu; did you mean $value? annotations know $labels.NAME and $value",
            id="unknown-variable",
        ),
        pytest.param(
            "'{{ .Lables.node }}'",
            "{{ .Lables.node }}: unknown field .Lables; did you mean .Labels? annotations know $labels.NAME",
            id="unknown-field",
        ),
        pytest.param(
            "'{{ $externalLabels.cluster }}'",
            "$externalLabels: gpufleet has no external labels; the cluster is $labels.cluster",
            id="external-labels",
        ),
        pytest.param(
            """'{{ with query "up" }}{{ . | first | value }}{{ end }}'""",
            '{{ with query "up" }}: {{ with }} is not rendered in gpufleet annotations; use {{ if … }}',
            id="with-block",
        ),
        pytest.param(
            """'{{ query "up" | first | value }}'""",
            "function query runs a PromQL query inside Prometheus, which the gpufleet collector cannot; "
            "print the rule's own value ($value) or link a dashboard",
            id="query",
        ),
        pytest.param(
            "'{{ $value | toUpper }}'",
            'toUpper takes a string as argument 1, not a number; format the number first: printf "%.2f" … | '
            "toUpper",
            id="wrong-type",
        ),
        pytest.param(
            """'{{ printf "%d%%" $value }}'""",
            "printf format '%d%%': %d does not print a number: use %.2f, %g or %e",
            id="printf-verb",
        ),
        pytest.param(
            """'{{ printf "%.1f on %s" $value }}'""",
            "printf format '%.1f on %s' has 2 verb(s) for 1 value(s); give one value per verb",
            id="printf-count",
        ),
        pytest.param(
            "'{{ if gt $value 90 }}very {{ end }}hot'",
            "gt compares a number with an integer, which Go refuses; compare like with like",
            id="compare-types",
        ),
        pytest.param("'{{ if $labels.pod }}in a pod'", "{{ if $labels.pod }} has no {{ end }}", id="no-end"),
        pytest.param(
            "'{{ $labels }}'", "prints the whole label map; print one label: $labels.NAME", id="map"
        ),
    ],
)
def test_a_broken_annotation_template_is_an_error_at_its_own_line(tmp_path, summary, message):
    f = rule_file(
        tmp_path / "site.yaml",
        rule("GpuFine", "'GPU {{ $labels.gpu }} at {{ $value | humanize }} °C'"),
        rule("GpuHot", summary),
    )
    lines = errors(gpufleet("alerts", "check", str(f), cwd=tmp_path))
    assert len(lines) == 1, lines
    where = f"{f}:{line_of(f, 'summary: ' + summary[:12])}: rule 'GpuHot': annotation summary: "
    assert lines[0].startswith(where), lines[0]
    assert message in lines[0], lines[0]


def test_a_template_in_a_label_is_an_error_since_labels_are_not_rendered(tmp_path):
    f = rule_file(
        tmp_path / "a.yaml", rule("GpuHot", "hot", extra="  labels:\n    team: '{{ $labels.namespace }}'\n")
    )
    lines = errors(gpufleet("alerts", "check", str(f), cwd=tmp_path))
    assert lines == [
        f"{f}:{line_of(f, 'team:')}: rule 'GpuHot': label team: '{{{{ $labels.namespace }}}}' is a template, but "
        "labels are not rendered (they name the alert: silences and grouping match them); move it to an annotation"
    ]


@pytest.mark.parametrize("how", ["--rules", "GPUFLEET_RULES"])
@pytest.mark.parametrize("command", ["collector", "up"])
def test_the_collector_refuses_to_start_with_a_template_that_would_reach_slack_broken(tmp_path, command, how):
    f = rule_file(tmp_path / "site.yaml", rule("GpuHot", "'{{ $value | humanizePercentag }}'"))
    where = ["--listen", "127.0.0.1:0"] if command == "collector" else ["--simulate", "1"]
    given = (["--rules", str(f)], None) if how == "--rules" else ([], {"GPUFLEET_RULES": str(f)})
    r = gpufleet(
        command, "--db", f"sqlite:///{tmp_path}/gpufleet.db", *where, *given[0], cwd=tmp_path, env=given[1]
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert f"{f}:{line_of(f, 'summary')}: rule 'GpuHot': annotation summary: " in r.stderr
    assert "did you mean humanizePercentage?" in r.stderr
    assert not (tmp_path / "gpufleet.db").exists(), "the store is not opened for rules that do not load"


# ---- warnings: exit 0, one line per read of an unknown series ----------------------------------------
def test_a_metric_no_agent_writes_is_a_warning_and_a_misspelling_gets_the_name_it_resembles(tmp_path):
    f = rule_file(
        tmp_path / "site.yaml",
        rule("RackWarm", "'rack {{ $labels.rack }} is warm'", metric="site_rack_inlet_celsius"),
        rule("GpuHot", "'GPU {{ $labels.gpu }} is hot'", metric="gpufleet_gpu_temprature_celsius"),
        rule(
            "GpuHotDcgm",
            "'GPU {{ $labels.gpu }} is hot'",
            metric="DCGM_FI_DEV_GPU_TEMP",
            extra="  match: {Hostname: 'node-.*', UUID: 'GPU-.*'}\n",
        ),
    )
    r = gpufleet("alerts", "check", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3 rules OK"
    assert r.stderr.strip().splitlines() == [
        f"warning: {f}:4: rule RackWarm: reads metric site_rack_inlet_celsius, which no gpufleet producer exports",
        f"warning: {f}:10: rule GpuHot: reads metric gpufleet_gpu_temprature_celsius, which no gpufleet producer "
        "exports; did you mean gpufleet_gpu_temperature_celsius?",
    ]


def test_series_of_inference_readers_and_of_the_dcgm_naming_are_known(tmp_path):
    f = rule_file(
        tmp_path / "site.yaml",
        rule("SlowModel", "'{{ $labels.model }} is slow'", metric="gpufleet_inference_requests_waiting"),
        rule("XidDcgm", "'XID {{ $value }} on {{ $labels.Hostname }}'", metric="DCGM_FI_DEV_XID_ERRORS"),
        rule("EccDcgm", "'ECC on {{ $labels.UUID }}'", metric="DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"),
    )
    r = gpufleet("alerts", "check", str(f), cwd=tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "3 rules OK", "")


def test_the_shipped_rule_pack_checks_with_no_error_and_no_warning(tmp_path):
    r = gpufleet("alerts", "check", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip().endswith("rules OK")


# ---- templates render for real --------------------------------------------------------------------
TEMPLATES = {
    "summary": "GPU {{ $labels.gpu }} on {{ $labels.node }} is busy {{ $value | humanizePercentage }}",
    "si": "{{ humanize $value }} | {{ $value | humanize1024 }}B",
    "duration": "for {{ humanizeDuration $value }}",
    "timestamp": "{{ $value | humanizeTimestamp }}",
    "printf": '{{ printf "%.2f" $value }} {{ $value | printf "%6.1f%%" }} {{ printf "%s/%s" $labels.node '
    '$labels.gpu }} {{ printf "%v %g %e" $value $value $value }}',
    "conditions": "{{ if gt $value 0.5 }}high{{ else if lt $value 0.0 }}negative{{ else }}low{{ end }}"
    "{{ if $labels.pod }} in pod {{ $labels.pod }}{{ end }}",
    "strings": '{{ $labels.node | toUpper }} {{ title "job of team a" }} '
    '{{ reReplaceAll "node-(\\\\d+)" "n$1" $labels.node }} {{ or $labels.pod "no pod" }} '
    '{{ index $labels "gpu" }} {{- /* trimmed */ -}} !',
}
VALUES = [0.4213567, 0.0, 1234567.0, 1e-7, -3.5, 266461.5, 1435065584.128, 0.999999, 1048576.0]


def engine_annotations(rules: Path, values: list[float]) -> list[dict[str, str]]:
    """What the gpufleet engine renders for one alert per value."""
    view, state = MemoryView(), MemoryState()
    eng = Engine(load_pack([rules]), view, state, [], route=Route(group_by=("uuid",)))
    for i, v in enumerate(values):
        view.observe(series(i), 60_000, v)
    sent = eng.tick(60_000)
    by_uuid = {a.labels["uuid"]: a.annotations for g in sent for a in g.firing}
    return [by_uuid[series(i)["uuid"]] for i in range(len(values))]


def series(i: int) -> dict[str, str]:
    labels = {"__name__": "gpufleet_gpu_sm_active_ratio", "node": f"node-{i}", "gpu": str(i % 8)}
    return {**labels, "uuid": f"GPU-{i:04d}", **({"pod": f"train-{i}"} if i % 2 else {})}


def test_annotations_render_in_gpufleet_as_prometheus_renders_the_exported_rule(tmp_path):
    promtool = shutil.which("promtool")
    if (
        promtool is None
    ):  # the suite's contract: the real promtool runs here (CI installs Debian's prometheus)
        pytest.fail("promtool is needed for this test: apt-get install prometheus")
    rules = tmp_path / "busy.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "busy",
                        "rules": [
                            {
                                "alert": "GpuBusy",
                                "metric": "gpufleet_gpu_sm_active_ratio",
                                "op": ">",
                                "value": -1e9,
                                "severity": "info",
                                "annotations": TEMPLATES,
                            }
                        ],
                    }
                ]
            },
            width=1000,
        )
    )
    assert gpufleet("alerts", "check", str(rules), cwd=tmp_path).stderr == ""
    exported = tmp_path / "busy.rules.yml"
    r = gpufleet("alerts", "export", str(rules), "-o", str(exported), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(exported.read_text())["groups"][0]["rules"][0]["annotations"] == TEMPLATES

    ours = engine_annotations(rules, VALUES)
    assert ours[0]["summary"] == "GPU 0 on node-0 is busy 42.14%"
    assert "{{" not in str(ours)
    exp_alerts = [
        {
            "exp_labels": {**{k: v for k, v in series(i).items() if k != "__name__"}, "severity": "info"},
            "exp_annotations": ours[i],
        }
        for i in range(len(VALUES))
    ]
    test = {
        "rule_files": [str(exported)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": "gpufleet_gpu_sm_active_ratio{"
                        + ",".join(f'{k}="{v}"' for k, v in series(i).items() if k != "__name__")
                        + "}",
                        "values": repr(v),
                    }
                    for i, v in enumerate(VALUES)
                ],
                "alert_rule_test": [{"eval_time": "1m", "alertname": "GpuBusy", "exp_alerts": exp_alerts}],
            }
        ],
    }
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump(test, width=1000))
    r = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_humanize_percentage_annotation_reaches_the_console_and_slack_rendered(tmp_path):
    rules = rule_file(
        tmp_path / "busy.yaml",
        rule(
            "GpuIdleButAllocated",
            "'GPU {{ $labels.gpu }} on {{ $labels.node }} runs at {{ $value | humanizePercentage }} SM activity'",
            metric="gpufleet_gpu_sm_active_ratio",
            extra="  labels: {team: ml}\n",
        )
        .replace("op: '>'", "op: '<'")
        .replace("value: 85", "value: 0.05"),
    )
    console = io.StringIO()
    with SlackDouble() as slack:
        notifier = SlackNotifier(WebClient(token="xoxb-test-token", base_url=slack.base_url), "C0ONCALL")
        view = MemoryView()
        eng = Engine(
            load_pack([rules]), view, MemoryState(), [ConsoleNotifier(console), notifier], queue=SendQueue()
        )
        view.observe({**series(3), "cluster": "prod"}, 1_700_000_000_000, 0.0123)
        eng.tick(1_700_000_000_000)
        assert eng.queue.join(timeout=60)
        [message] = slack.channel_messages("C0ONCALL")
    want = "GPU 3 on node-3 runs at 1.23% SM activity"
    assert want in console.getvalue() and "{{" not in console.getvalue()
    assert want in message.text and "{{" not in str(message.blocks) + str(message.attachments)
    assert slack.problems == []


# ---- any annotation text: an error naming file, line and rule, or a template that renders ---------------
PIECES = st.sampled_from(
    [
        "{{",
        "}}",
        "{{-",
        "-}}",
        " ",
        "$labels",
        ".node",
        "$value",
        ".Labels",
        ".Value",
        "|",
        "(",
        ")",
        '"',
        '"%.2f"',
        "`x`",
        "humanize",
        "humanizePercentage",
        "printf",
        "if",
        "else",
        "end",
        "gt",
        "or",
        "0.5",
        "1",
        "-",
        "{{/*",
        "*/}}",
        ":=",
        "$",
        ".",
        "range",
        "toUpper",
        "index",
        "'",
        "\\",
        "%",
        "x",
        "\n",
    ]
)


@given(st.lists(PIECES, max_size=14).map("".join), st.floats(allow_nan=True))
@settings(max_examples=500, deadline=None)
def test_any_annotation_loads_with_errors_naming_its_line_or_renders_without_raising(text, value):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "rules.yaml"
        f.write_text(
            yaml.safe_dump(
                {
                    "groups": [
                        {
                            "name": "g",
                            "rules": [
                                {
                                    "alert": "A",
                                    "metric": "m",
                                    "op": ">",
                                    "value": 1,
                                    "annotations": {"summary": text},
                                }
                            ],
                        }
                    ]
                }
            )
        )
        try:
            pack = load_pack([f])
        except RuleError as exc:
            [problem] = exc.problems
            assert problem.startswith(f"{f}:") and ": rule 'A': annotation summary: " in problem
            assert "\n" not in problem
            return
    [a] = [a for a in pack.rules]
    out = render(a.annotations["summary"], {"node": "n1", "gpu": "0"}, value)
    assert isinstance(out, str) and not out.startswith("<error expanding template")
