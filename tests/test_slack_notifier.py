"""Slack through the real slack-sdk client against the strict Slack Web API double: one message per alert
group, edited in place on resolve with a reply in its thread, and nothing lost to 429s or 5xx."""

from __future__ import annotations

import json
import shlex
import urllib.parse
from pathlib import Path

import pytest
from slack_sdk import WebClient

from gpufleet.collector.notify.queue import SendQueue
from gpufleet.collector.notify.slack import SlackNotifier
from gpufleet.collector.rules.dispatch import Silence
from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.kinds import Event, Threshold
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import Route, Rule
from gpufleet.core.labels import Matcher
from tests.doubles.slack_api import Message, SlackDouble

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


XID = Rule(
    name="GpuXidCritical",
    metric="xid",
    severity="critical",
    spec=Event(),
    annotations={"summary": "XID {{ $labels.xid }} on {{ $labels.node }}"},
)
DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"


def make(slack, state=None, grafana=None, rules=(RULE,), group_by=Route.group_by):
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    state = state or MemoryState()
    notifier = SlackNotifier(client, "C0ONCALL", grafana_url=grafana)
    view = MemoryView()
    route = Route(group_by=tuple(group_by), group_wait_s=0, group_interval_s=0)
    eng = Engine(list(rules), view, state, [notifier], route=route, queue=SendQueue())
    return view, eng, notifier


def shown(text: str) -> str:
    """mrkdwn as Slack shows it: its three entities back as the characters."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def silence_args(m: Message) -> list[str]:
    """The silence command as the on-call copies it from the message's code block, split as a shell splits it."""
    (block,) = [
        b for b in m.attachments[0]["blocks"] if b["type"] == "section" and "```" in b["text"]["text"]
    ]
    return shlex.split(shown(block["text"]["text"].split("```")[1]))


def fields_of(m: Message) -> dict[str, str]:
    """Each field's value as Slack shows it, by its title."""
    texts = [
        f["text"] for b in m.attachments[0]["blocks"] if b["type"] == "section" for f in b.get("fields", [])
    ]
    return {t.split("\n", 1)[0].strip("*"): shown(t.split("\n", 1)[1]) for t in texts}


def grafana_params(m: Message) -> list[tuple[str, str]]:
    (url,) = [
        e["url"]
        for b in m.attachments[0]["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e["text"]["text"] == "Grafana"
    ]
    return urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)


def matchers_of(args: list[str]) -> list[Matcher]:
    """The MATCHER arguments of `gpufleet silence add`, read with the grammar the CLI reads them with."""
    assert args[:3] == ["gpufleet", "silence", "add"]
    return [Matcher.parse(a) for a in args[3 : args.index("--duration")]]


def workload(i: int) -> dict[str, str]:
    return {**gpu(i), "namespace": "ml", "container": "trainer", "job": "llama-pretrain"}


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
    # narrowed to the GPU with the variables the dashboard defines, from before the alert to now while it fires
    assert buttons["Grafana"] == (
        "https://grafana.example.org/d/gpufleet-gpu/gpu?from=1699999100000&to=now"
        "&var-cluster=prod&var-node=node-0&var-gpu=3"
    )
    assert silence_args(m) == [
        "gpufleet",
        "silence",
        "add",
        "alertname=GpuHardwareThermalSlowdown",
        "cluster=prod",
        "node=node-0",
        "gpu=3",
        "uuid=GPU-0003",
        "--duration",
        "2h",
        "--comment",
        "acknowledged in Slack: GpuHardwareThermalSlowdown",
    ]
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


def test_a_group_of_two_gpus_links_both_and_one_silence_command_mutes_every_alert_in_it(slack):
    view, eng, notifier = make(
        slack,
        grafana="https://grafana.example.org/d/gpufleet-node-gpu-postgres",
        rules=(RULE, XID),
        group_by=("cluster", "node"),
    )
    view.observe(workload(1), 1_700_000_000_000, 1)
    view.observe(workload(3), 1_700_000_000_000, 1)
    view.observe({**workload(3), "__name__": "xid", "xid": "94"}, 1_700_000_000_000, 1)
    view.observe(workload(9), 1_700_000_000_000, 1)  # node-1: a group, and a message, of its own
    eng.tick(1_700_000_000_000)
    assert eng.queue.join(timeout=30)
    (m,) = [x for x in slack.channel_messages("C0ONCALL") if "node-0" in x.text]
    head = m.attachments[0]["blocks"][0]["text"]["text"]
    assert head == "[CRITICAL] 3 alerts on node-0 GPUs 1, 3"
    fields = fields_of(m)
    assert fields["GPU"] == "1, 3" and fields["UUID"] == "GPU-0001, GPU-0003"
    assert fields["Pod"] == "ml/train-1, ml/train-3"
    assert fields["Container"] == "trainer" and fields["Job"] == "llama-pretrain"
    assert "Value" not in fields  # one value would stand for three alerts

    params = grafana_params(m)
    assert params == [
        ("from", "1699999100000"),
        ("to", "now"),
        ("var-cluster", "prod"),
        ("var-node", "node-0"),
        ("var-gpu", "1"),
        ("var-gpu", "3"),
    ]
    for flavour in ("postgres", "prometheus"):
        board = json.loads((DASHBOARDS / f"node-gpu.{flavour}.json").read_text())
        defined = {v["name"] for v in board["templating"]["list"]}
        assert {k.removeprefix("var-") for k, _ in params if k.startswith("var-")} <= defined

    args = silence_args(m)
    assert args[args.index("--duration") :] == [
        "--duration",
        "2h",
        "--comment",
        "acknowledged in Slack: GpuHardwareThermalSlowdown, GpuXidCritical",
    ]
    matchers = matchers_of(args)
    # the labels all three share; not alertname, uuid, gpu, pod or xid, which differ between them
    assert [str(x) for x in matchers] == [
        "cluster=prod",
        "node=node-0",
        "namespace=ml",
        "container=trainer",
        "job=llama-pretrain",
    ]
    # the silence as the CLI would add it mutes all three alerts, and nothing on node-1
    eng.state.add_silence(Silence.new(matchers, 1_700_000_000_000, 1_700_007_200_000, "oncall", "ack", 0))
    eng.tick(1_700_000_001_000)
    muted = {(a["rule"], a["labels"]["uuid"]): a["muted_by"] for a in eng.active_alerts()}
    assert len(muted) == 4
    assert all(muted[k] for k in muted if k[1] != "GPU-0009")
    assert muted[("GpuHardwareThermalSlowdown", "GPU-0009")] is None
    assert slack.problems == [] and eng.send_failures == 0


def test_a_group_across_nodes_narrows_the_link_to_its_nodes_and_not_to_gpu_indexes(slack):
    view, eng, notifier = make(slack, grafana="https://g.example.org/d/x?orgId=1", group_by=("alertname",))
    view.observe(gpu(3), 1_700_000_000_000, 1)
    view.observe({**gpu(13), "cluster": "dev"}, 1_700_000_000_000, 1)  # node-1 GPU 5, another cluster
    eng.tick(1_700_000_000_000)
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    assert m.attachments[0]["blocks"][0]["text"]["text"] == "[WARNING] 2 alerts on 2 nodes"
    assert grafana_params(m) == [
        ("orgId", "1"),
        ("from", "1699999100000"),
        ("to", "now"),
        ("var-cluster", "prod"),
        ("var-cluster", "dev"),
        ("var-node", "node-0"),
        ("var-node", "node-1"),
    ]
    assert [str(x) for x in matchers_of(silence_args(m))] == ["alertname=GpuHardwareThermalSlowdown"]


def test_a_resolved_message_links_the_whole_episode_and_offers_no_silence(slack):
    view, eng, notifier = make(slack, grafana="https://grafana.example.org/d/gpufleet-node-gpu-postgres")
    view.observe(gpu(2), 1_700_000_000_000, 1)
    eng.tick(1_700_000_000_000)
    view.observe(gpu(2), 1_700_003_600_000, 0)
    eng.tick(1_700_003_600_000)
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    assert len(m.edits) == 1
    assert dict(grafana_params(m))["to"] == str(1_700_003_600_000 + 15 * 60_000)
    assert dict(grafana_params(m))["from"] == str(1_700_000_000_000 - 15 * 60_000)
    assert "```" not in json.dumps(m.attachments)
    assert slack.problems == [] and eng.send_failures == 0


def test_label_values_that_look_like_slack_markup_arrive_escaped_and_the_silence_still_matches(slack):
    view, eng, notifier = make(slack, rules=(RULE, XID))
    hostile = {**gpu(3), "node": "<!channel> <https://x|Click here>", "pod": "a&b"}
    view.observe(hostile, 1000, 1)
    eng.tick(1000)
    view.observe({**hostile, "__name__": "xid", "xid": "94"}, 2000, 1)  # the same GPU: an edit and a reply
    eng.tick(2000)
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    (reply,) = [x for x in slack.messages if x.thread_ts == m.ts]
    mrkdwn = [m.text, m.attachments[0]["fallback"], reply.text] + [
        t
        for b in m.attachments[0]["blocks"]
        for t in ([b["text"]["text"]] if b.get("text", {}).get("type") == "mrkdwn" else [])
        + [f["text"] for f in b.get("fields", [])]
        + [e["text"] for e in b.get("elements", []) if e.get("type") == "mrkdwn"]
    ]
    assert len(mrkdwn) >= 10
    for text in mrkdwn:
        assert "<" not in text and ">" not in text, text
    assert "&lt;!channel&gt; &lt;https://x|Click here&gt;" in m.text
    assert fields_of(m)["Node"] == "<!channel> <https://x|Click here>"
    assert fields_of(m)["Pod"] == "a&b"
    assert "node=<!channel> <https://x|Click here>" in silence_args(m)
    matchers = matchers_of(silence_args(m))
    alerts = eng.active_alerts()
    assert len(alerts) == 2 and all(x.matches(a["labels"]) for a in alerts for x in matchers)
    assert slack.problems == [] and eng.send_failures == 0


def test_alerts_that_share_no_label_get_no_silence_command_that_would_mute_more(slack):
    view, eng, notifier = make(slack, rules=(RULE, XID), group_by=())
    view.observe(gpu(3), 1000, 1)
    other = {"cluster": "dev", "node": "n9", "gpu": "5", "uuid": "GPU-X", "pod": "p9", "xid": "94"}
    view.observe({**other, "__name__": "xid"}, 1000, 1)
    eng.tick(1000)
    assert eng.queue.join(timeout=30)
    (m,) = slack.channel_messages("C0ONCALL")
    text = json.dumps(m.attachments)
    assert "```" not in text and "No one silence covers these alerts" in text
    assert slack.problems == [] and eng.send_failures == 0


@pytest.mark.parametrize(
    ("public_url", "tokens", "expected"),
    [
        (None, ["w-secret"], "http://127.0.0.1:{port}"),
        ("https://gpufleet.example.com/", [], "https://gpufleet.example.com"),
    ],
)
def test_the_silence_command_names_the_collector_people_reach(slack, tmp_path, public_url, tokens, expected):
    from gpufleet.collector.service import Collector, CollectorSettings
    from tests.conftest import free_port

    port = free_port()
    client = WebClient(token="xoxb-test-token", base_url=slack.base_url)
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{port}",
            db=f"sqlite:///{tmp_path}/m.db",
            slack_channel="C0ONCALL",
            public_url=public_url,
            tokens=tokens,
        ),
        slack_client=client,
    )
    try:
        (notifier,) = [n for n in c.notifiers if n.name == "slack"]
        view = MemoryView()
        eng = Engine([RULE], view, MemoryState(), [notifier], route=Route(group_wait_s=0), queue=SendQueue())
        view.observe(gpu(0), 1000, 1)
        eng.tick(1000)
        assert eng.queue.join(timeout=30)
        (m,) = slack.channel_messages("C0ONCALL")
        args = silence_args(m)
        assert args[-2:] == ["--collector", expected.format(port=port)]
        assert ("GPUFLEET_TOKEN" in json.dumps(m.attachments)) is bool(tokens)
        assert "w-secret" not in json.dumps(m.attachments)
    finally:
        c.close()
