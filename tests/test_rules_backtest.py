"""The backtest says what the live collector would have said: the same samples, through the store and through
a recorded trace, give the same notifications at the same times."""

from __future__ import annotations

import io
import random

from gpufleet.collector.rules.backtest import read_trace, replay
from gpufleet.collector.rules.engine import Delivery, Engine
from gpufleet.collector.rules.model import Route, default_rules_path, load_pack
from gpufleet.collector.rules.state import SqlAlertState
from gpufleet.core import remote_write as rw


class Recorder:
    name = "recorder"

    def __init__(self):
        self.lines = []

    def send(self, g):
        for n in list(g.firing) if g.repeat else g.changes:
            self.lines.append((n.rule, n.state, g.at_ms / 1000, n.labels.get("uuid"), n.labels["severity"]))
        return Delivery()


def fleet_samples():
    """Ten minutes of two GPUs at 5 s: one heats into thermal slowdown, gets an XID, then falls off the bus."""
    rng = random.Random(1)
    t0 = 1_767_225_600_000
    out = []
    for k in range(120):
        t = t0 + k * 5000
        for gpu, uuid in ((0, "GPU-hot"), (1, "GPU-ok")):
            base = {"node": "n1", "gpu": str(gpu), "uuid": uuid, "model": "H100"}
            hot = gpu == 0 and 20 <= k < 60
            lost = gpu == 0 and k >= 90
            out.append(({"__name__": "gpufleet_gpu_up", **base}, t, 0.0 if lost else 1.0))
            if lost:
                continue
            out.append(
                (
                    {"__name__": "gpufleet_gpu_temperature_celsius", **base},
                    t,
                    (86.0 if hot else 60.0) + rng.random(),
                )
            )
            out.append(({"__name__": "gpufleet_gpu_slowdown_temperature_celsius", **base}, t, 87.0))
            out.append(
                (
                    {"__name__": "gpufleet_gpu_clock_event_active", **base, "reason": "hw_thermal"},
                    t,
                    1.0 if hot and k >= 30 else 0.0,
                )
            )
            if gpu == 0 and k >= 70:
                out.append(({"__name__": "gpufleet_gpu_xid_errors_total", **base, "xid": "94"}, t, 1.0))
    return out


def to_openmetrics(samples) -> str:
    by_series: dict[tuple, list] = {}
    for labels, t, v in samples:
        by_series.setdefault(tuple(labels.items()), []).append((t, v))
    lines, families = [], {}
    for key, pts in by_series.items():
        families.setdefault(dict(key)["__name__"], []).append((key, pts))
    for name, series in families.items():
        counter = name.endswith("_total")
        lines.append(f"# TYPE {name[:-6] if counter else name} {'counter' if counter else 'gauge'}")
        for key, pts in series:
            lab = ",".join(f'{k}="{v}"' for k, v in key if k != "__name__")
            lines += [f"{name}{{{lab}}} {v} {t / 1000:.3f}" for t, v in pts]
    return "\n".join(lines + ["# EOF", ""])


def test_backtest_and_live_engine_on_the_store_send_the_same_notifications(store):
    pack = load_pack([default_rules_path()])
    pack.route = Route(group_wait_s=0, group_interval_s=30, repeat_interval_s=3600)
    samples = fleet_samples()
    # live: samples written to the store as an agent pushes them, the engine ticking on the store every 5 s
    live = Recorder()
    engine = Engine(pack, store, SqlAlertState(store.engine), [live])
    times = sorted({t for _, t, _ in samples})
    for t in times:
        store.write([rw.Series(labels, [(t, v)]) for labels, ts, v in samples if ts == t], now_ms=t)
        engine.tick(t)
    # backtest: the same samples as a recorded OpenMetrics trace
    replayed = [
        (r["alert"], r["state"], r["at"], r["labels"].get("uuid"), r["labels"]["severity"])
        for r in replay(read_trace(io.StringIO(to_openmetrics(samples))), pack)
    ]
    assert replayed == live.lines
    told = {(rule, state) for rule, state, *_ in live.lines}
    assert {
        ("GpuTemperatureNearSlowdown", "firing"),
        ("GpuHardwareThermalSlowdown", "firing"),
        ("GpuXidCritical", "firing"),
        ("GpuLost", "firing"),
    } <= told
