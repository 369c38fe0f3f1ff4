"""The collector as `gpufleet collector` builds it from its flags: every notifier it is told about delivers, an
urgent write is evaluated at once, and a busy collector says so instead of queueing without end."""

from __future__ import annotations

import http.client
import json
import threading
import time

import psycopg
import pytest

from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.core import remote_write as rw
from gpufleet.core.retry import Verdict
from tests.conftest import free_port, wait_until
from tests.doubles.grafana_api import GrafanaDouble
from tests.doubles.slack_api import SlackDouble
from tests.wiring import HOT_GPU_RULES, CollectorProcess, remote_write, temperatures


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(HOT_GPU_RULES)
    return path


def test_a_hot_gpu_is_told_on_the_console_in_slack_and_as_a_grafana_annotation(tmp_path, rules):
    with SlackDouble() as slack, GrafanaDouble() as grafana:
        c = CollectorProcess(
            free_port(),
            [
                "--db",
                f"sqlite:///{tmp_path / 'c.db'}",
                "--rules",
                str(rules),
                "--eval-interval",
                "0.5",
                "--console",
                *slack.collector_flags(),
                "--grafana-url",
                grafana.url,
                "--grafana-token",
                grafana.token,
            ],
            tmp_path / "collector.log",
        )
        try:
            assert remote_write(c.url, temperatures({0: 60.0, 1: 95.0})).verdict is Verdict.OK
            wait_until(lambda: c.metric("gpufleet_collector_notifications_sent") >= 3)
            console = [ln for ln in c.output().splitlines() if ln.startswith("ALERT ")]
            assert len(console) == 1 and "GPU 1 on n1 is too hot" in console[0], console
            (message,) = slack.channel_messages("C0ONCALL")
            assert "GPU 1 on n1 is too hot" in message.text
            (annotation,) = grafana.annotations.values()
            assert "GPU 1 on n1 is too hot" in annotation["text"]
            assert slack.problems == [] and grafana.problems == []
            assert c.metric("gpufleet_collector_notifications_failed") == 0
        finally:
            c.stop()


def test_an_xid_pushed_as_urgent_reaches_slack_long_before_the_next_evaluation(tmp_path):
    with SlackDouble() as slack:
        c = CollectorProcess(
            free_port(),
            ["--db", f"sqlite:///{tmp_path / 'c.db'}", "--eval-interval", "10m", *slack.collector_flags()],
            tmp_path / "collector.log",
        )
        agent = None
        try:
            # The first evaluation runs at start; the next one is ten minutes away.
            wait_until(lambda: c.metric("gpufleet_collector_rule_evaluations") >= 1)
            agent = start_agent(
                AgentSettings(
                    listen=f"127.0.0.1:{free_port()}",
                    collector=c.url,
                    simulate=2,
                    node="gpu-node-3",
                    interval=0.2,
                    push_interval=0.5,
                    seed=3,
                )
            )
            wait_until(lambda: c.metric("gpufleet_collector_samples_received_total") > 0, timeout=15)
            agent.simulator.inject(1, "xid", xid=48)
            (message,) = wait_until(lambda: slack.channel_messages("C0ONCALL"), timeout=10)
            assert "XID 48" in message.text and "gpu-node-3" in message.text
            assert slack.problems == []
            assert c.metric("gpufleet_collector_notifications_failed") == 0
        finally:
            if agent is not None:
                agent.stop()
            c.stop()


@pytest.mark.postgres
def test_a_write_that_arrives_while_the_only_write_slot_is_busy_gets_503_with_retry_after(tmp_path, pg_url):
    c = CollectorProcess(
        free_port(), ["--db", pg_url, "--max-inflight-writes", "1"], tmp_path / "collector.log"
    )
    try:
        first: list = []
        with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as admin:
            # A database that is slow to take a write: the first write waits on this lock.
            admin.execute("LOCK TABLE series, samples, latest IN ACCESS EXCLUSIVE MODE")
            writer = threading.Thread(
                target=lambda: first.append(remote_write(c.url, temperatures({0: 50.0}))), daemon=True
            )
            writer.start()
            wait_until(lambda: c.metric("gpufleet_collector_inflight_writes") == 1)
            second = remote_write(c.url, temperatures({1: 51.0}))
            admin.rollback()  # the database answers again
        writer.join(timeout=30)
        assert second.status == 503 and second.verdict is Verdict.RETRY
        assert second.retry_after_s == 1 and "busy" in json.loads(second.detail)["error"]
        assert [r.status for r in first] == [204]
    finally:
        c.stop()


def test_an_agent_connection_idle_past_its_push_interval_is_still_open_for_its_next_push(tmp_path, pg_url):
    """An agent pushes every 5 s on one kept-alive connection: were the collector to close idle connections
    at that same 5 s, a push could go out on a connection being closed under it and fail."""
    c = CollectorProcess(free_port(), ["--db", pg_url], tmp_path / "collector.log")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
        headers = {"Content-Type": rw.CONTENT_TYPE, "Content-Encoding": rw.CONTENT_ENCODING}

        def push(temp: float) -> int:
            conn.request("POST", "/api/v1/write", body=rw.encode(temperatures({0: temp})), headers=headers)
            answer = conn.getresponse()
            answer.read()
            return answer.status

        assert push(50.0) == 204
        sock = conn.sock
        time.sleep(AgentSettings().push_interval + 1.0)
        # http.client opens no new connection on its own: a closed one fails this push (RemoteDisconnected)
        assert push(51.0) == 204 and conn.sock is sock
        conn.close()
    finally:
        c.stop()
