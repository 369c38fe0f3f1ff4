"""Slack through the real slack-sdk client against the strict Slack Web API double: one message per alert
group, edited in place on resolve with a reply in its thread, and nothing lost to 429s or 5xx."""

from __future__ import annotations

import json

import pytest
from slack_sdk import WebClient

from gpufleet.collector.notify.queue import SendQueue
from gpufleet.collector.notify.slack import SlackNotifier
from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.kinds import Event, Threshold
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import Route, Rule
from tests.doubles.slack_api import SlackDouble

RULE = Rule(
    name="GpuHardwareThermalSlowdown",
    metric="hw_thermal",
    severity="warning",
    spec=Threshold(op="==", value=1),
    annotations={
        "summary": "GPU {{ $labels.gpu }} on {{ $labels.node }} slows for heat",
        "description": "Check the fans.",
        "runbook_url": "https://example.org/runbooks/thermal-slowdown.md",
    },
)


def gpu(i: int) -> dict[str, str]:
    return {
        "__name__": "hw_thermal",
        "cluster": "prod",
        "node": f"node-{i // 8}",
        "gpu": str(i % 8),
        "uuid": f"GPU-{i:04d}",
        "pod": f"train-{i}",
    }


@pytest.fixture
def slack():
    with SlackDouble() as double:
        yield double


def make(slack, state=None, grafana=None):
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    state = state or MemoryState()
    notifier = SlackNotifier(client, "C0ONCALL", grafana_url=grafana)
    view = MemoryView()
    eng = Engine(
        [RULE], view, state, [notifier], route=Route(group_wait_s=0, group_interval_s=0), queue=SendQueue()
    )
    return view, eng, notifier


def test_a_burst_of_30_alerts_arrives_complete_and_in_order_through_429s_and_500s(slack):
    view, eng, notifier = make(slack)
    slack.answer_next(429, retry_after=1)
    slack.answer_next(500)
    slack.answer_next(429, retry_after=0, times=4)  # more than slack-sdk retries by itself: the queue goes on
    slack.answer_next(503, times=4)
    for i in range(30):
        view.observe(gpu(i), 1000, 1)
    sent = eng.tick(1000)
    assert len(sent) == 30
    assert eng.queue.join(timeout=60)
    msgs = slack.channel_messages("C0ONCALL")
    assert [m.text for m in msgs] == [g.text for g in sent]
    assert len({m.text for m in msgs}) == 30
    assert eng.queue.retries >= 2 and eng.queue.failed == 0
    assert slack.problems == [] and eng.send_failures == 0


def test_one_message_per_group_with_fields_links_colour_and_fallback(slack):
    view, eng, notifier = make(slack, grafana="https://grafana.example.org/d/gpufleet-gpu/gpu")
    view.observe(gpu(3), 1_700_000_000_000, 1)
    eng.tick(1_700_000_000_000)
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    (att,) = m.attachments
    assert att["color"] == "#ff7f0e" and att["fallback"] == m.text
    assert m.text.startswith("[WARNING] GpuHardwareThermalSlowdown: GPU 3 on node-0 slows for heat")
    fields = [f["text"] for b in att["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    for title, value in (
        ("Cluster", "prod"),
        ("Node", "node-0"),
        ("GPU", "3"),
        ("UUID", "GPU-0003"),
        ("Pod", "train-3"),
        ("Value", "1"),
        ("Since", "2023-11-14 22:13:20 UTC"),
    ):
        assert f"*{title}*\n{value}" in fields
    buttons = {
        e["text"]["text"]: e["url"] for b in att["blocks"] if b["type"] == "actions" for e in b["elements"]
    }
    assert (
        buttons["Runbook: GpuHardwareThermalSlowdown"] == "https://example.org/runbooks/thermal-slowdown.md"
    )
    grafana = buttons["Grafana"]
    assert grafana.startswith(
        "https://grafana.example.org/d/gpufleet-gpu/gpu?from=1699999100000&to=1700000900000"
    )
    assert "var-uuid=GPU-0003" in grafana
    text = json.dumps(att["blocks"])
    assert (
        "gpufleet silence add alertname=GpuHardwareThermalSlowdown cluster=prod node=node-0 uuid=GPU-0003"
        in text
    )
    assert slack.problems == [] and eng.send_failures == 0


def test_resolve_edits_the_original_and_replies_in_its_thread_even_after_a_restart(slack, store):
    from gpufleet.collector.rules.state import SqlAlertState

    view, eng, notifier = make(slack, state=SqlAlertState(store.engine))
    view.observe(gpu(1), 1000, 1)
    eng.tick(1000)
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    eng.close()
    # a new collector process: (channel, ts) comes back from the store
    view2, eng2, notifier2 = make(slack, state=SqlAlertState(store.engine))
    view2.observe(gpu(1), 2000, 0)
    eng2.tick(2000)
    assert eng2.queue.join(timeout=30)
    assert len(slack.channel_messages("C0ONCALL")) == 1
    (edit,) = m.edits
    assert edit["ts"] == m.ts and m.attachments[0]["color"] == "#2ca02c"
    assert m.text.startswith("[RESOLVED] GpuHardwareThermalSlowdown")
    (reply,) = [x for x in slack.messages if x.thread_ts == m.ts]
    assert reply.text.startswith("Resolved: GpuHardwareThermalSlowdown")
    assert slack.problems == [] and eng.send_failures == 0 and eng2.send_failures == 0


def test_a_message_slack_refuses_for_good_is_counted_not_retried_forever(slack):
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    notifier = SlackNotifier(client, "C0ONCALL")
    view = MemoryView()
    eng = Engine([RULE], view, MemoryState(), [notifier], route=Route(group_wait_s=0), queue=SendQueue())
    slack.answer_next(400)  # e.g. a malformed request: retrying cannot help
    view.observe(gpu(0), 1000, 1)
    view.observe(gpu(1), 1000, 1)
    eng.tick(1000)
    assert eng.queue.join(timeout=30)
    assert eng.queue.failed == 1 and len(slack.channel_messages("C0ONCALL")) == 1


def test_a_critical_alert_joining_a_warning_group_edits_the_message_and_is_broadcast_from_its_thread(slack):
    xid = Rule(
        name="GpuXidCritical",
        metric="xid",
        severity="critical",
        spec=Event(),
        annotations={"summary": "XID {{ $labels.xid }} on {{ $labels.node }}"},
    )
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    state = MemoryState()
    notifier = SlackNotifier(client, "C0ONCALL")
    view = MemoryView()
    eng = Engine(
        [RULE, xid],
        view,
        state,
        [notifier],
        route=Route(group_wait_s=0, group_interval_s=300),
        queue=SendQueue(),
    )
    view.observe(gpu(2), 1000, 1)
    eng.tick(1000)
    view.observe({**gpu(2), "__name__": "xid", "xid": "94"}, 5000, 1)
    eng.tick(5000)  # well inside group_interval: a more severe alert still goes out at once
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    assert m.text.startswith("[CRITICAL] 2 alerts: GpuHardwareThermalSlowdown, GpuXidCritical")
    assert m.attachments[0]["color"] == "#d62728"
    (reply,) = [x for x in slack.messages if x.thread_ts == m.ts]
    assert "Now firing (critical)" in reply.text and "XID 94" in reply.text
    (call,) = [p for method, p in slack.calls if method == "chat.postMessage" and p.get("thread_ts")]
    assert call["reply_broadcast"] is True
    assert slack.problems == [] and eng.send_failures == 0


def test_the_collector_exports_slack_retries_and_refusals_on_its_metrics(slack, tmp_path):
    import urllib.request

    from gpufleet.collector.service import Collector, CollectorSettings
    from tests.conftest import free_port

    port = free_port()
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/m.db", slack_channel="C0ONCALL"
        ),
        slack_client=client,
    ).start()
    try:
        (notifier,) = [n for n in c.notifiers if n.name == "slack"]
        slack.answer_next(429, retry_after=0, times=3)
        slack.answer_next(400)
        view = MemoryView()
        eng = Engine(
            [RULE], view, MemoryState(), [notifier], route=Route(group_wait_s=0), queue=c.engine.queue
        )
        view.observe(gpu(0), 1000, 1)
        eng.tick(1000)
        assert eng.queue.join(timeout=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "gpufleet_collector_notifications_failed 1.0" in text
        assert "gpufleet_collector_notification_retries 1.0" in text
        assert "gpufleet_collector_notifications_queued 0.0" in text
    finally:
        c.close()
