"""Runbook links that never 404: the collector serves the runbooks the rule pack ships, and every link it
sends or shows (Slack, the fleet page, the exported Prometheus rules) points at BASE/NAME, BASE being the
collector's own /runbooks unless the operator points it at a wiki."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpufleet.cli import main
from gpufleet.collector.rules.model import default_rules_path, load_pack, with_runbook_base
from gpufleet.collector.runbooks import Runbooks
from gpufleet.collector.service import Collector, CollectorSettings, own_runbook_base_url
from tests.conftest import free_port, wait_until
from tests.doubles.slack_api import SlackDouble
from tests.wiring import start_up

RUNBOOKS_DIR = default_rules_path() / "runbooks"


def fetch(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def raw_get(port: int, path: str) -> tuple[int, str]:
    """GET exactly this path: http.client neither normalises dot segments nor decodes %2F."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def runbook_buttons(message) -> dict[str, str]:
    return {
        e["text"]["text"]: e["url"]
        for a in message.attachments
        for b in a["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e["text"]["text"].startswith("Runbook: ")
    }


# ---- the on-call engineer's path: Slack message -> runbook button -> page -------------------------------
def test_the_runbook_button_of_a_slack_alert_opens_the_runbook_on_the_collector(tmp_path):
    """`gpufleet up` with Slack, an XID on a simulated GPU: the message's runbook button opens the
    runbook of that rule, served by the same collector, with no setting beyond the Slack ones."""
    with SlackDouble() as slack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        env.update(
            PYTHONUNBUFFERED="1",
            GPUFLEET_SLACK_TOKEN="xoxb-test-token",
            GPUFLEET_SLACK_CHANNEL="C0ONCALL",
            GPUFLEET_SLACK_BASE_URL=slack.base_url,
        )
        proc, url, agent_url, log = start_up(tmp_path, 2, env)
        try:

            def gpus() -> int:
                try:
                    return len(json.loads(fetch(url + "/api/v1/gpus")[2])["gpus"])
                except OSError:
                    return 0

            wait_until(lambda: gpus() == 2, timeout=30)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gpufleet.cli",
                    "simulate",
                    "inject",
                    "--agent",
                    agent_url,
                    "--gpu",
                    "1",
                    "xid",
                    "--xid",
                    "48",
                ],
                check=True,
                capture_output=True,
                timeout=30,
                env=env,
            )
            (message,) = wait_until(lambda: slack.channel_messages("C0ONCALL"), timeout=20)
            link = runbook_buttons(message)["Runbook: GpuXidCritical"]
            status, headers, page = fetch(link)
            own_metrics = fetch(url + "/metrics")[2]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        assert slack.problems == []
    assert "gpufleet_collector_notifications_failed 0.0" in own_metrics.splitlines()
    assert f"runbooks        {url}/runbooks/" in log.read_text()
    assert link == f"{url}/runbooks/xid-critical"
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<title>GpuXidCritical · gpufleet runbook</title>" in page and "<h1>GpuXidCritical</h1>" in page
    assert "<h2>What to do</h2>" in page


# ---- the pages ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    port = free_port()
    db = tmp_path_factory.mktemp("runbooks") / "t.db"
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{db}")).start()
    yield c, port
    c.close()


def test_every_rule_of_the_pack_links_a_runbook_the_collector_serves(collector):
    c, port = collector
    assert c.rules, "no rules loaded"
    for rule in c.rules:
        link = rule.annotations["runbook_url"]
        assert link.startswith(f"http://127.0.0.1:{port}/runbooks/"), (rule.name, link)
        status, headers, page = fetch(link)
        assert status == 200, (rule.name, link)
        assert rule.name in page, (rule.name, link)
        # self-contained: no scripts or outside resources, and the policy forbids any that slipped in
        assert "<script" not in page and "<link" not in page and " src=" not in page
        assert headers["content-security-policy"].startswith("default-src 'none'")


def test_the_index_lists_every_runbook_by_title(collector):
    _, port = collector
    status, _, page = fetch(f"http://127.0.0.1:{port}/runbooks")  # redirected to /runbooks/
    assert status == 200
    for md in sorted(RUNBOOKS_DIR.glob("*.md")):
        title = md.read_text().splitlines()[0].lstrip("# ")
        assert f'<a href="{md.stem}">{title}</a>' in page


def test_an_unknown_runbook_is_a_404_page_that_lists_the_real_ones(collector):
    _, port = collector
    status, headers, page = fetch(f"http://127.0.0.1:{port}/runbooks/xid-critcal")
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert (
        "No runbook &#x27;xid-critcal&#x27;" in page and '<a href="xid-critical">GpuXidCritical</a>' in page
    )


@pytest.mark.parametrize(
    "path",
    [
        "/runbooks/..%2F..%2Fetc%2Fpasswd",
        "/runbooks/../../etc/passwd",
        "/runbooks/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/runbooks/..%2Fgpu.yaml",
        "/runbooks/..%2Fruntime%2F..%2Fgpu",
        "/runbooks/%2Fetc%2Fpasswd",
        "/runbooks/xid-critical%00",
        "/runbooks/..",
        "/runbooks/.%2Fxid-critical",
    ],
)
def test_no_request_reads_a_file_outside_the_runbooks(collector, path):
    _, port = collector
    status, body = raw_get(port, path)
    assert status == 404, (path, status)
    assert "root:" not in body and "groups:" not in body and "xid_sets" not in body


def test_a_name_in_the_404_page_is_escaped(collector):
    _, port = collector
    status, body = raw_get(port, "/runbooks/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert status == 404
    assert "<script>" not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body


def test_markdown_is_rendered_and_html_in_it_escaped(tmp_path):
    (tmp_path / "hostile.md").write_text(
        "# Gpu<b>Bold</b> & more\n\n<script>alert(1)</script>\n\n[click](javascript:alert(1)) "
        "[docs](https://docs.nvidia.com/deploy/xid-errors/)\n\n| a | b |\n| --- | --- |\n| `x` | 1 |\n"
    )
    (tmp_path / "Not-A-Name.md").write_text("# ignored\n")
    books = Runbooks(tmp_path)
    assert books.names() == ["hostile"]
    page = books.page("hostile")
    assert "<title>Gpu&lt;b&gt;Bold&lt;/b&gt; &amp; more · gpufleet runbook</title>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "javascript:" not in page.replace("[click](javascript:alert(1))", "")
    assert '<a href="https://docs.nvidia.com/deploy/xid-errors/">docs</a>' in page
    assert "<td><code>x</code></td>" in page
    assert books.page("Not-A-Name") is None and books.page("../hostile") is None


# ---- where links point ----------------------------------------------------------------------------------
def test_a_collector_links_its_own_runbooks_unless_told_otherwise():
    assert own_runbook_base_url("127.0.0.1:9446", "http", None) == "http://127.0.0.1:9446/runbooks"
    assert own_runbook_base_url("[::1]:9446", "https", None) == "https://[::1]:9446/runbooks"
    assert (
        own_runbook_base_url("0.0.0.0:9446", "http", "https://gpufleet.example.com/")
        == "https://gpufleet.example.com/runbooks"
    )
    assert (
        own_runbook_base_url("0.0.0.0:9446", "http", None) == f"http://{socket.gethostname()}:9446/runbooks"
    )


def test_a_custom_base_url_reaches_the_alerts_annotations(tmp_path):
    own = tmp_path / "site.yaml"
    own.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "site",
                        "rules": [
                            {
                                "alert": "SiteHot",
                                "metric": "gpufleet_gpu_temperature_celsius",
                                "op": ">",
                                "value": 90,
                                "annotations": {
                                    "summary": "hot",
                                    "runbook_url": "https://runbooks.example.org/hot",
                                },
                            }
                        ],
                    }
                ]
            }
        )
    )
    port = free_port()
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{port}",
            db=f"sqlite:///{tmp_path / 't.db'}",
            rules=[default_rules_path(), own],
            eval_interval=60,
            runbook_base_url="https://wiki.example.com/gpu/",
        )
    ).start()
    try:
        from gpufleet.core import remote_write as rw

        now_ms = int(time.time() * 1000)
        series = rw.Series(
            {
                "__name__": "gpufleet_gpu_xid_errors_total",
                "node": "n1",
                "gpu": "0",
                "uuid": "GPU-a",
                "xid": "48",
            },
            [(now_ms, 1.0)],
        )
        hot = rw.Series(
            {"__name__": "gpufleet_gpu_temperature_celsius", "node": "n1", "gpu": "1", "uuid": "GPU-b"},
            [(now_ms, 95.0)],
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/write",
            data=rw.encode([series, hot]),
            headers={"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"},
        )
        assert urllib.request.urlopen(req, timeout=5).status == 204
        c.evaluate()
        alerts = json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/alerts")[2])["alerts"]
        fleet = json.loads(fetch(f"http://127.0.0.1:{port}/api/v1/fleet")[2])
    finally:
        c.close()
    links = {a["rule"]: a["annotations"]["runbook_url"] for a in alerts}
    assert links == {
        "GpuXidCritical": "https://wiki.example.com/gpu/xid-critical",
        "SiteHot": "https://runbooks.example.org/hot",
    }
    assert {a["rule"]: a["runbook_url"] for a in fleet["alerts"]} == links


def test_a_base_url_that_is_not_http_is_refused_with_the_fix():
    pack = load_pack([default_rules_path()])
    for bad in ("wiki.example.com/gpu", "ftp://wiki.example.com", "https://", "/runbooks"):
        with pytest.raises(ValueError, match="not an http"):
            with_runbook_base(pack, bad)
    result = CliRunner().invoke(main, ["alerts", "export", "--runbook-base-url", "wiki.example.com"])
    assert result.exit_code == 2 and "https://" in result.output


def _exported_links(args: list[str]) -> tuple[dict[str, str], str]:
    result = CliRunner().invoke(main, ["alerts", "export", *args])
    assert result.exit_code == 0, result.output
    groups = yaml.safe_load(result.stdout)["groups"]
    return {r["alert"]: r["annotations"]["runbook_url"] for g in groups for r in g["rules"]}, result.stderr


def test_export_writes_whole_links_under_the_base_url():
    links, _ = _exported_links(["--runbook-base-url", "https://wiki.example.com/gpu/"])
    assert links["GpuXidCritical"] == "https://wiki.example.com/gpu/xid-critical"
    assert all(
        u.startswith("https://wiki.example.com/gpu/") and "/" not in u.rsplit("/gpu/", 1)[1]
        for u in links.values()
    ), links
    links, note = _exported_links([])
    assert links["GpuLost"] == "http://localhost:9446/runbooks/gpu-lost"
    assert "--runbook-base-url" in note
    env_links = (
        CliRunner(env={"GPUFLEET_RUNBOOK_BASE_URL": "https://gpufleet.example.com/runbooks"})
        .invoke(main, ["alerts", "export"])
        .stdout
    )
    assert "runbook_url: https://gpufleet.example.com/runbooks/gpu-lost" in env_links


def test_every_shipped_runbook_file_is_linked_by_a_rule_and_the_gpu_rules_from_the_docs():
    """No orphans: each file in alerts/runbooks/ is some rule's runbook; docs/rules.md links the GPU pack's."""
    rules = load_pack([default_rules_path()]).rules
    assert {p.stem for p in RUNBOOKS_DIR.glob("*.md")} == {r.annotations["runbook_url"] for r in rules}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text()
    for r in rules:
        if Path(r.source.rsplit(":", 1)[0]).name == "gpu.yaml":
            assert (
                f"| {r.name} |" in docs and f"](../alerts/runbooks/{r.annotations['runbook_url']}.md)" in docs
            )
