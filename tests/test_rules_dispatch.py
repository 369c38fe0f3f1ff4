"""Grouping, inhibition, silences and restarts: what reaches the on-call engineer, and when."""

from __future__ import annotations

from gpufleet.collector.rules.dispatch import Matcher, Silence
from gpufleet.collector.rules.engine import Delivery, Engine
from gpufleet.collector.rules.kinds import Threshold
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import InhibitRule, Route, Rule

GPU = {"cluster": "c1", "node": "n1", "gpu": "0", "uuid": "GPU-a"}
ANN = {"summary": "{{ $labels.alertname }} on {{ $labels.uuid }}"}


def rule(name, metric, severity="warning", **kw):
    return Rule(
        name=name, metric=metric, severity=severity, spec=Threshold(op=">", value=0), annotations=ANN, **kw
    )


class Recorder:
    name = "recorder"

    def __init__(self):
        self.groups = []

    def send(self, g):
        self.groups.append((g, g.previous))
        return Delivery(g.previous or ("C1", f"{len(self.groups)}.0"))

    def told(self):
        return [
            (g.at_ms // 1000, g.state, sorted((n.rule, n.state) for n in g.changes)) for g, _ in self.groups
        ]


RULES = [
    rule("Hot", "hot"),
    rule("Slow", "slow"),
    rule("Xid", "xid", "critical"),
    rule("Lost", "lost", "critical"),
    rule("NodeSilent", "node_silent", "critical"),
]
INHIBIT = [
    InhibitRule({"alertname": "Lost"}, {}, ("uuid",)),
    InhibitRule({"alertname": "NodeSilent"}, {}, ("node",)),
    InhibitRule({"severity": "critical"}, {"severity": "warning"}, ("uuid",)),
]


def setup(route=None, state=None, inhibit=INHIBIT):
    view, rec = MemoryView(), Recorder()
    eng = Engine(
        RULES,
        view,
        state or MemoryState(),
        [rec],
        route=route or Route(group_wait_s=10, group_interval_s=60, repeat_interval_s=3600),
        inhibit_rules=inhibit,
    )
    return view, eng, rec


def put(view, t, metric, value, labels=GPU):
    view.observe({"__name__": metric, **labels}, t * 1000, value)


def run(view, eng, until, events, step=5):
    """events: {t: [(metric, value, labels?)]}; series keep their last value (re-sent every step)."""
    current = {}
    for t in range(0, until + 1, step):
        for ev in events.get(t, []):
            metric, value, *rest = ev
            current[(metric, tuple(sorted((rest[0] if rest else GPU).items())))] = value
        for (metric, labels), value in current.items():
            put(view, t, metric, value, dict(labels))
        eng.tick(t * 1000)


def test_alerts_about_one_gpu_wait_group_wait_then_go_out_as_one_message():
    view, eng, rec = setup()
    run(view, eng, 30, {0: [("hot", 1), ("slow", 1)]})
    assert rec.told() == [(10, "firing", [("Hot", "firing"), ("Slow", "firing")])]


def test_a_new_warning_joins_at_group_interval_but_a_critical_goes_out_at_once():
    view, eng, rec = setup()
    run(view, eng, 200, {0: [("hot", 1)], 20: [("slow", 1)], 100: [("xid", 1)]})
    assert rec.told() == [
        (10, "firing", [("Hot", "firing")]),
        (70, "firing", [("Slow", "firing")]),  # group_interval after the first message
        (100, "firing", [("Xid", "firing")]),
    ]  # more severe than anything sent: at once
    assert rec.groups[2][0].escalated
    assert rec.groups[1][1] == rec.groups[2][1] == ("C1", "1.0")  # the same message, edited


def test_a_group_is_repeated_after_repeat_interval_and_closed_with_a_resolved_message():
    view, eng, rec = setup(route=Route(group_wait_s=0, group_interval_s=60, repeat_interval_s=600))
    run(view, eng, 1500, {0: [("hot", 1)], 1000: [("hot", 0)]})
    told = [(t, s) for t, s, _ in rec.told()]
    assert told == [(0, "firing"), (600, "firing"), (1000, "resolved")]  # group_interval since 600 has passed
    assert rec.groups[1][0].repeat and not rec.groups[0][0].repeat
    assert rec.groups[2][0].resolved[0].rule == "Hot"
    assert rec.groups[2][1] == ("C1", "1.0")  # the resolve edits the first message


def test_a_lost_gpu_mutes_everything_else_about_it_but_not_other_gpus():
    view, eng, rec = setup(route=Route(group_wait_s=0, group_interval_s=0))
    other = {**GPU, "gpu": "1", "uuid": "GPU-b"}
    run(view, eng, 20, {0: [("lost", 1), ("hot", 1), ("xid", 1), ("hot", 1, other)]})
    sent = sorted((n.rule, n.labels["uuid"]) for g, _ in rec.groups for n in g.changes)
    assert sent == [("Hot", "GPU-b"), ("Lost", "GPU-a")]
    muted = {a["rule"]: a["muted_by"] for a in eng.active_alerts() if a["labels"]["uuid"] == "GPU-a"}
    assert muted["Hot"].startswith("inhibited by Lost") and muted["Xid"].startswith("inhibited by Lost")
    assert muted["Lost"] is None


def test_critical_mutes_warning_on_the_same_gpu_and_a_node_alert_without_uuid_mutes_no_gpu_by_uuid():
    view, eng, rec = setup(route=Route(group_wait_s=0, group_interval_s=0), inhibit=INHIBIT[2:])
    node_only = {"cluster": "c1", "node": "n1"}
    run(
        view,
        eng,
        10,
        {
            0: [
                ("xid", 1),
                ("hot", 1),
                ("node_silent", 1, node_only),
                ("slow", 1, {**GPU, "uuid": "GPU-b", "gpu": "1"}),
            ]
        },
    )
    sent = sorted((n.rule, n.labels.get("uuid", "-")) for g, _ in rec.groups for n in g.changes)
    assert sent == [("NodeSilent", "-"), ("Slow", "GPU-b"), ("Xid", "GPU-a")]


def test_a_silent_node_mutes_its_gpus():
    view, eng, rec = setup(route=Route(group_wait_s=0, group_interval_s=0), inhibit=INHIBIT[1:2])
    run(
        view,
        eng,
        10,
        {
            0: [
                ("node_silent", 1, {"cluster": "c1", "node": "n1"}),
                ("hot", 1),
                ("hot", 1, {**GPU, "node": "n2", "uuid": "GPU-z"}),
            ]
        },
    )
    sent = sorted((n.rule, n.labels["node"]) for g, _ in rec.groups for n in g.changes)
    assert sent == [("Hot", "n2"), ("NodeSilent", "n1")]


def test_a_silence_mutes_matching_alerts_until_it_expires_then_they_are_told():
    state = MemoryState()
    state.add_silence(
        Silence.new(
            [Matcher.parse("alertname=~Hot|Slow"), Matcher.parse("node!=n9")],
            0,
            100_000,
            "ops",
            "fan swap on n1",
            0,
        )
    )
    view, eng, rec = setup(route=Route(group_wait_s=0, group_interval_s=0), state=state)
    run(view, eng, 150, {0: [("hot", 1), ("xid", 1, {**GPU, "uuid": "GPU-b"})]})
    assert rec.told() == [(0, "firing", [("Xid", "firing")]), (100, "firing", [("Hot", "firing")])]


def test_matchers_parse_as_amtool_writes_them_and_reject_nonsense():
    m = Matcher.parse('uuid=~"GPU-a.*"')
    assert (m.name, m.value, m.is_regex, m.is_equal) == ("uuid", "GPU-a.*", True, True)
    assert Matcher.parse("severity!=info").matches({"severity": "critical"})
    assert not Matcher.parse("severity!=info").matches({"severity": "info"})
    for bad in ("no operator", "x=~(", "=v"):
        try:
            Matcher.parse(bad)
        except ValueError as exc:
            assert "matcher" in str(exc) or "regular expression" in str(exc)
        else:
            raise AssertionError(bad)


def test_a_restarted_collector_neither_re_pages_nor_forgets_where_the_message_is(store):
    from gpufleet.collector.rules.state import SqlAlertState

    state = SqlAlertState(store.engine)
    route = Route(group_wait_s=0, group_interval_s=0)
    view, rec = MemoryView(), Recorder()
    eng = Engine(RULES, view, state, [rec], route=route, inhibit_rules=INHIBIT)
    put(view, 0, "hot", 1)
    eng.tick(0)
    state.save_group_target(rec.groups[0][0].episode, "recorder", ("C9", "111.222"))
    rec2 = Recorder()
    eng2 = Engine(
        RULES, view, SqlAlertState(store.engine), [rec2], route=route, inhibit_rules=INHIBIT
    )  # a new process
    put(view, 5, "hot", 1)
    eng2.tick(5000)
    assert rec2.groups == []
    put(view, 10, "hot", 0)
    eng2.tick(10_000)
    ((g, previous),) = rec2.groups
    assert g.state == "resolved" and previous == ("C9", "111.222")


def test_silences_persist_in_the_store_and_expire(store):
    from gpufleet.collector.rules.state import SqlAlertState

    state = SqlAlertState(store.engine)
    s = Silence.new([Matcher.parse("uuid=GPU-a")], 1000, 10_000, "ana", "RMA ticket 42", 1000)
    state.add_silence(s)
    assert [x.id for x in state.active_silences(5000)] == [s.id]
    assert state.list_silences()[0].matchers == s.matchers
    state.expire_silence(s.id, 6000)
    assert state.active_silences(6000) == [] and state.get_silence(s.id).ends_at_ms == 6000
