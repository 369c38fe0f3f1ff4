"""Two collectors on one PostgreSQL: one evaluates and notifies; when it is killed the other takes over and
the on-call channel still gets each notification exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import urllib3

from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until
from tests.doubles.slack_api import SlackDouble

RULES = """
route:  # one group per GPU, told at once: this test is about who sends, not about grouping delays
  group_by: [alertname, uuid]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 4h
groups:
  - name: ha
    rules:
      - alert: GpuTooHot
        kind: threshold
        metric: gpufleet_gpu_temperature_celsius
        op: ">"
        value: 90
        for: 0s
        severity: critical
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} is too hot"
"""
EVAL_S = 1.0


def healthz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return None


def start(pg_url: str, port: int, rules, slack: SlackDouble, name: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "collector",
            "--db",
            pg_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--rules",
            str(rules),
            "--eval-interval",
            str(EVAL_S),
            "--name",
            name,
            "--slack-token",
            "xoxb-test-token",
            "--slack-channel",
            "C0ONCALL",
            "--slack-base-url",
            slack.base_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_until(lambda: proc.poll() is not None or healthz(port), timeout=60, interval=0.2)
    assert proc.poll() is None, proc.stdout.read()
    return proc


def push(port: int, temps: dict[int, float]) -> None:
    now = int(time.time() * 1000)
    body = rw.encode(
        [
            rw.Series(
                {
                    "__name__": "gpufleet_gpu_temperature_celsius",
                    "node": "n1",
                    "gpu": str(g),
                    "uuid": f"GPU-{g}",
                },
                [(now, t)],
            )
            for g, t in temps.items()
        ]
    )
    resp = urllib3.request(
        "POST",
        f"http://127.0.0.1:{port}/api/v1/write",
        body=body,
        headers={"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"},
    )
    assert resp.status == 204, resp.data


def own_metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def evaluations(port: int) -> float:
    return own_metric(port, "gpufleet_collector_rule_evaluations")


@pytest.mark.postgres
def _recorded_messages(pg_url: str) -> int:
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute("SELECT count(*) FROM group_messages").fetchone()[0]


def test_the_follower_takes_over_from_a_killed_leader_and_no_slack_message_is_sent_twice(tmp_path, pg_url):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    port_a, port_b = free_port(), free_port()
    with SlackDouble() as slack:
        a = start(pg_url, port_a, rules, slack, "collector-a")
        b = None
        try:
            wait_until(lambda: (healthz(port_a) or {}).get("leader"), timeout=15)
            b = start(pg_url, port_b, rules, slack, "collector-b")
            wait_until(lambda: evaluations(port_a) >= 3, timeout=15)
            assert healthz(port_b)["leader"] is False and evaluations(port_b) == 0

            # the incident starts; the leader (A) pages once
            push(port_b, {0: 95.0, 1: 60.0})  # writes go to either replica
            wait_until(lambda: slack.channel_messages("C0ONCALL"), timeout=15)
            # Killed between Slack's answer and the record of where the message landed, a leader leaves a page
            # its successor cannot know about (at least once, as with Alertmanager); the kill comes once the
            # page is recorded, which is what this test is about.
            wait_until(lambda: _recorded_messages(pg_url) >= 1, timeout=15)
            assert own_metric(port_a, "gpufleet_collector_notifications_failed") == 0

            ticks_before_kill = healthz(port_b)["ticks"]
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            took_over = wait_until(
                lambda: (lambda h: h if h and h["leader"] else None)(healthz(port_b)), timeout=15
            )
            # within two evaluation intervals: at B's first or second evaluation slot after the kill
            assert took_over["leader_since_tick"] - ticks_before_kill <= 2, (took_over, ticks_before_kill)
            # B now evaluates, sees GPU 0 still hot, and does not page for it again
            done = evaluations(port_b)
            wait_until(lambda: evaluations(port_b) >= done + 3, timeout=15)
            assert len(slack.channel_messages("C0ONCALL")) == 1

            # the incident goes on: a second GPU heats up, then the first cools down
            push(port_b, {0: 95.0, 1: 97.0})
            wait_until(lambda: len(slack.channel_messages("C0ONCALL")) == 2, timeout=15)
            push(port_b, {0: 55.0, 1: 97.0})
            wait_until(lambda: slack.channel_messages("C0ONCALL")[0].edits, timeout=15)
            done = evaluations(port_b)
            wait_until(lambda: evaluations(port_b) >= done + 3, timeout=15)
            assert own_metric(port_b, "gpufleet_collector_notifications_failed") == 0
        finally:
            for p in (a, b):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=20)
        out_b = b.stdout.read()

    msgs = slack.channel_messages("C0ONCALL")
    assert [("gpu=0" in m.text, "gpu=1" in m.text) for m in msgs] == [(True, False), (False, True)]
    assert len(msgs[0].edits) == 1 and "RESOLVED" in msgs[0].edits[0]["text"]
    assert msgs[1].edits == []
    replies = [m for m in slack.messages if m.thread_ts is not None]
    assert len(replies) == 1 and replies[0].thread_ts == msgs[0].ts
    assert slack.problems == []
    posts = [c for c, _ in slack.calls if c == "chat.postMessage"]
    assert len(posts) == 3  # two pages and one threaded "resolved" reply: nothing twice
    assert "collector-b: this collector now evaluates rules" in out_b
