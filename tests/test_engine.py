"""The rule engine in event time: pending -> firing -> resolved, events at once, stale data never resolves."""

from __future__ import annotations

from gpufleet.collector.rules.engine import Delivery, Engine
from gpufleet.collector.rules.kinds import Event, Threshold
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import Route, Rule

GPU = {"node": "n1", "gpu": "0", "uuid": "GPU-a", "model": "H100"}


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.sent = []

    def send(self, g):
        for n in g.changes:
            self.sent.append((n, g.previous))
        return Delivery(g.previous or ("C1", f"{len(self.sent)}.0"))


def hot_rule(**kw):
    return Rule(
        name="Hot",
        metric="temp",
        severity="warning",
        spec=Threshold(op=">", value=80),
        for_s=60,
        annotations={"summary": "GPU {{ $labels.gpu }} at {{ $value }}"},
        **kw,
    )


def make(rule):
    view, state, rec = MemoryView(), MemoryState(), Recorder()
    return view, state, rec, Engine([rule], view, state, [rec], route=Route(group_interval_s=0))


def test_threshold_waits_for_its_for_duration_then_fires_once_then_resolves():
    view, state, rec, eng = make(hot_rule())
    for t, v in [(0, 85), (30, 86), (61, 87), (90, 88), (120, 70)]:
        view.observe({"__name__": "temp", **GPU}, t * 1000, v)
        eng.tick(t * 1000)
    states = [(n.state, n.at_ms // 1000, n.annotations["summary"]) for n, _ in rec.sent]
    assert states == [("firing", 61, "GPU 0 at 87"), ("resolved", 120, "GPU 0 at 88")]
    # the resolve is told where the firing message landed, so it can be edited in place
    assert rec.sent[1][1] == ("C1", "1.0")


def test_a_blip_shorter_than_for_never_notifies():
    view, state, rec, eng = make(hot_rule())
    for t, v in [(0, 85), (30, 70), (60, 85), (90, 70)]:
        view.observe({"__name__": "temp", **GPU}, t * 1000, v)
        eng.tick(t * 1000)
    assert rec.sent == []


def test_stale_data_does_not_resolve_a_firing_alert():
    view, state, rec, eng = make(hot_rule(keep_firing_for_s=0))
    view.observe({"__name__": "temp", **GPU}, 0, 90)
    eng.tick(0)
    eng.tick(61_000)  # still fresh (within 5 min): fires
    for t in (400, 800, 1600):  # the GPU stopped sending: nothing fresh
        eng.tick(t * 1000)
    assert [n.state for n, _ in rec.sent] == ["firing"]
    assert eng.active_alerts()[0]["state"] == "firing"


def test_event_rule_fires_at_once_on_increase_and_on_first_sight_of_a_nonzero_counter():
    rule = Rule(
        name="Xid",
        metric="xid_total",
        severity="critical",
        spec=Event(),
        matchers={"xid": "48|79"},
        annotations={"summary": "XID {{ $labels.xid }}"},
        send_resolved=False,
    )
    view, state, rec, eng = make(rule)
    view.observe({"__name__": "xid_total", **GPU, "xid": "48"}, 1000, 1)  # first sight, already 1
    eng.tick(1000)
    eng.tick(2000)  # no change: no new notification
    view.observe({"__name__": "xid_total", **GPU, "xid": "13"}, 2500, 5)  # not in the rule's set
    eng.tick(3000)
    assert [(n.state, n.labels["xid"]) for n, _ in rec.sent] == [("firing", "48")]


def test_a_restarted_engine_neither_re_pages_nor_forgets():
    rule = Rule(
        name="Xid", metric="xid_total", severity="critical", spec=Event(), annotations={"summary": "x"}
    )
    view, state, rec, eng = make(rule)
    view.observe({"__name__": "xid_total", **GPU, "xid": "79"}, 1000, 1)
    eng.tick(1000)
    rec2 = Recorder()
    eng2 = Engine(
        [rule], view, state, [rec2], route=Route(group_interval_s=0)
    )  # same persisted state, new process
    eng2.tick(2000)
    assert rec2.sent == []
    assert [a["rule"] for a in eng2.active_alerts()] == ["Xid"]
    view.observe({"__name__": "xid_total", **GPU, "xid": "79"}, 3000, 2)
    eng2.tick(3000)  # a new XID while firing: the alert is already firing, no second page
    eng2.tick(3000 + 301_000)  # quiet for longer than keep-firing: resolves
    assert [n.state for n, _ in rec2.sent] == ["resolved"]
