"""Every rule kind in event time, on the in-memory view the backtest uses."""

from __future__ import annotations

import random

from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.kinds import (
    Anomaly,
    Condition,
    Escalation,
    Event,
    Peer,
    Stale,
    Threshold,
    Trend,
)
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import Route, Rule

GPU = {"node": "n1", "gpu": "0", "uuid": "GPU-a", "model": "H100"}
ANN = {"summary": "{{ $labels.uuid }} {{ $value }}"}


def engine(*rules, state=None):
    view = MemoryView()
    eng = Engine(list(rules), view, state or MemoryState(), [], route=Route(group_interval_s=0))
    return view, eng


def firing(eng, rule=None):
    return sorted(
        (a["rule"], a["labels"].get("uuid", a["labels"].get("node")), a["labels"]["severity"])
        for a in eng.active_alerts()
        if a["state"] == "firing" and (rule is None or a["rule"] == rule)
    )


def test_keep_firing_for_holds_a_flapping_alert_and_for_delays_it():
    rule = Rule(
        name="Throttle",
        metric="thr",
        severity="warning",
        spec=Threshold(op="==", value=1),
        for_s=10,
        keep_firing_for_s=60,
        annotations=ANN,
    )
    view, eng = engine(rule)
    seen = []
    for t, v in [(0, 1), (5, 1), (10, 1), (15, 0), (30, 1), (40, 0), (80, 0), (100, 0)]:
        view.observe({"__name__": "thr", **GPU}, t * 1000, v)
        eng.tick(t * 1000)
        seen.append((t, bool(firing(eng))))
    # pending until 10 s, firing through the 0 at 15 s and 40 s (keep_firing_for 60 s), resolved 60 s after 30 s
    assert seen == [
        (0, False),
        (5, False),
        (10, True),
        (15, True),
        (30, True),
        (40, True),
        (80, True),
        (100, False),
    ]


def test_threshold_against_the_gpus_own_slowdown_temperature_and_an_and_condition():
    near = Rule(
        name="Near",
        metric="temp",
        severity="warning",
        spec=Threshold(op=">=", compare_metric="slow", offset=-3),
        annotations=ANN,
    )
    idle = Rule(
        name="Idle",
        metric="sm",
        severity="warning",
        spec=Threshold(op="<", value=0.02, conditions=(Condition("mem", ">", 2e9),)),
        annotations=ANN,
    )
    view, eng = engine(near, idle)
    b = {**GPU, "uuid": "GPU-b", "gpu": "1"}
    for labels, temp, slow, sm, mem in ((GPU, 85, 87, 0.0, 40e9), (b, 85, 90, 0.0, 0.5e9)):
        view.observe({"__name__": "temp", **labels}, 1000, temp)
        view.observe({"__name__": "slow", **labels}, 1000, slow)
        view.observe({"__name__": "sm", **labels}, 1000, sm)
        view.observe({"__name__": "mem", **labels}, 1000, mem)
    eng.tick(1000)
    # GPU-a is within 3 °C of its own 87 °C; GPU-b has 5 °C left of its 90 °C. Only GPU-a holds memory idle.
    assert firing(eng) == [("Idle", "GPU-a", "warning"), ("Near", "GPU-a", "warning")]


def test_rate_threshold_sees_a_counter_rise_and_survives_a_reset():
    rule = Rule(
        name="Replay",
        metric="replay_total",
        severity="warning",
        spec=Threshold(op=">", value=0.5, rate_s=60),
        annotations=ANN,
    )
    view, eng = engine(rule)
    values = [0, 10, 20, 5, 15]  # a reset between 20 and 5 (driver reload): still ~10 per 10 s
    for i, v in enumerate(values):
        view.observe({"__name__": "replay_total", **GPU}, i * 10_000, v)
        eng.tick(i * 10_000)
    (a,) = [a for a in eng.active_alerts() if a["state"] == "firing"]
    assert a["value"] == 35 / 40


def test_stale_gpu_is_no_data_and_never_resolves_until_data_returns():
    rule = Rule(
        name="Stale",
        metric="up",
        severity="warning",
        spec=Stale(after_s=30, by=("node", "uuid")),
        annotations=ANN,
    )
    view, eng = engine(rule)
    view.observe({"__name__": "up", **GPU}, 0, 1)
    eng.tick(0)
    eng.tick(20_000)
    assert firing(eng) == []
    for t in (31, 600, 3600, 86_400):  # an hour, a day: still "no data", never resolved
        eng.tick(t * 1000)
        assert firing(eng) == [("Stale", "GPU-a", "warning")]
    view.observe({"__name__": "up", **GPU}, 86_401_000, 1)
    eng.tick(86_401_000)
    assert firing(eng) == []


def test_a_gpu_missing_from_its_nodes_inventory_fires_while_the_node_still_reports():
    rule = Rule(
        name="Missing",
        metric="up",
        severity="critical",
        spec=Stale(inventory=True, after_s=30, by=("node",)),
        annotations=ANN,
    )
    state = MemoryState()
    view, eng = engine(rule, state=state)
    for t in range(0, 60, 10):
        for i in range(4):
            view.observe({"__name__": "up", **GPU, "uuid": f"GPU-{i}", "gpu": str(i)}, t * 1000, 1)
        eng.tick(t * 1000)
    for t in range(60, 200, 10):  # GPU-3 vanishes from enumeration (e.g. the agent restarted without it)
        for i in range(3):
            view.observe({"__name__": "up", **GPU, "uuid": f"GPU-{i}", "gpu": str(i)}, t * 1000, 1)
        eng.tick(t * 1000)
    assert firing(eng) == [("Missing", "GPU-3", "critical")]
    # the known inventory survives a restart: a new engine on the same state still knows GPU-3
    view2, eng2 = engine(rule, state=state)
    for i in range(3):
        view2.observe({"__name__": "up", **GPU, "uuid": f"GPU-{i}", "gpu": str(i)}, 200_000, 1)
    eng2.tick(200_000)
    assert firing(eng2) == [("Missing", "GPU-3", "critical")]


def test_app_xids_are_info_and_escalate_when_one_gpu_repeats_them_across_pods():
    rule = Rule(
        name="AppXid",
        metric="xid_total",
        severity="info",
        matchers={"xid": "13|31|43"},
        spec=Event(escalate=Escalation("pod", 2, 86_400, "warning")),
        annotations=ANN,
    )
    view, eng = engine(rule)
    view.observe({"__name__": "xid_total", **GPU, "pod": "train-1", "xid": "13"}, 1000, 1)
    eng.tick(1000)
    assert firing(eng) == [("AppXid", "GPU-a", "info")]
    view.observe({"__name__": "xid_total", **GPU, "pod": "train-1", "xid": "13"}, 2000, 2)  # same pod again
    eng.tick(2000)
    assert firing(eng) == [("AppXid", "GPU-a", "info")]
    view.observe({"__name__": "xid_total", **GPU, "pod": "train-2", "xid": "31"}, 3000, 1)  # another pod
    eng.tick(3000)
    assert ("AppXid", "GPU-a", "warning") in firing(eng)
    other = {**GPU, "uuid": "GPU-b", "gpu": "1"}  # a different GPU's first app XID stays info
    view.observe({"__name__": "xid_total", **other, "pod": "train-3", "xid": "13"}, 4000, 1)
    eng.tick(4000)
    assert ("AppXid", "GPU-b", "info") in firing(eng)


def _anomaly_run(method):
    rule = Rule(
        name="Spike",
        metric="m",
        severity="warning",
        spec=Anomaly(method=method, z=6, z_clear=2, window=60, min_samples=30, alpha=0.05, direction="up"),
        annotations=ANN,
    )
    view, eng = engine(rule)
    rng = random.Random(3)
    states = []
    for t in range(400):
        v = 10 + rng.gauss(0, 0.5)
        if 200 <= t < 260:
            v += 20  # a fault: far outside the noise
        elif 260 <= t < 270:
            v += 1.5  # easing off: inside z but above z_clear for EWMA/MAD -> hysteresis keeps it
        view.observe({"__name__": "m", **GPU}, t * 1000, v)
        eng.tick(t * 1000)
        states.append(bool(firing(eng)))
    return states


def test_ewma_and_mad_anomalies_fire_on_a_fault_with_hysteresis_and_not_on_noise():
    for method in ("ewma", "mad"):
        states = _anomaly_run(method)
        assert not any(states[:200]), method  # 170 samples of noise after warm-up: no alert
        assert all(states[201:260]), method
        assert not any(states[290:]), (
            method
        )  # cleared once back inside z_clear; the baseline did not learn the fault


def test_a_straggler_below_its_jobs_median_fires_and_a_job_change_does_not():
    rule = Rule(
        name="Straggler",
        metric="sm",
        severity="warning",
        spec=Peer(by=("job",), below=0.6, min_peers=3, min_median=0.3),
        for_s=20,
        annotations=ANN,
    )
    view, eng = engine(rule)
    for t in range(0, 60, 5):
        for i in range(8):
            load = (
                0.1 if t >= 30 else 0.9
            )  # the whole job goes quiet at 30 s (a checkpoint): nobody straggles
            if i == 5 and t < 30:
                load = 0.3
            view.observe({"__name__": "sm", **GPU, "uuid": f"GPU-{i}", "job": "llm"}, t * 1000, load)
        view.observe({"__name__": "sm", **GPU, "uuid": "GPU-solo", "job": "other"}, t * 1000, 0.0)
        eng.tick(t * 1000)
        if t == 25:
            assert firing(eng) == [("Straggler", "GPU-5", "warning")]
    assert firing(eng) == []


def test_a_steady_memory_leak_fires_and_a_job_loading_its_model_does_not():
    rule = Rule(
        name="Leak",
        metric="used",
        severity="warning",
        spec=Trend(limit_metric="total", window_s=1800, horizon_s=3600),
        annotations=ANN,
    )
    view, eng = engine(rule)
    leak, step = {**GPU, "uuid": "GPU-leak"}, {**GPU, "uuid": "GPU-load"}
    for t in range(0, 2400, 10):
        view.observe(
            {"__name__": "used", **leak}, t * 1000, 20e9 + t * 15e6
        )  # +54 GB/h, full within the hour
        view.observe({"__name__": "used", **step}, t * 1000, 2e9 if t < 1500 else 70e9)  # one big step
        for labels in (leak, step):
            view.observe({"__name__": "total", **labels}, t * 1000, 80e9)
        eng.tick(t * 1000)
    assert firing(eng) == [("Leak", "GPU-leak", "warning")]
    (a,) = eng.active_alerts()
    assert 0 < a["value"] < 1  # hours to full


def test_a_staircase_of_jobs_loading_models_one_after_another_is_not_a_leak():
    rule = Rule(
        name="Leak",
        metric="used",
        severity="warning",
        spec=Trend(limit_metric="total", window_s=1800, horizon_s=3600),
        annotations=ANN,
    )
    view, eng = engine(rule)
    stairs = {**GPU, "uuid": "GPU-stairs"}
    for t in range(0, 2400, 10):
        level = [0, 20e9, 38e9, 48e9, 62e9, 75e9][min(5, t // 400)]  # a new, bigger job every ~7 minutes
        view.observe({"__name__": "used", **stairs}, t * 1000, level + (t % 400) * 1e6)
        view.observe({"__name__": "total", **stairs}, t * 1000, 80e9)
        eng.tick(t * 1000)
    assert firing(eng) == []
