"""The rule pack on what the agent exports: simulated GPUs, read by the GPU source, fed to the rule engine."""

from __future__ import annotations

from types import SimpleNamespace

from gpufleet.agent.nvml import Nvml
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.collector.rules.backtest import replay
from gpufleet.collector.rules.model import default_rules_path, load_pack

SLOW_CADENCE_S = 10


def record(
    driver: str, inject_at_s: int, kind: str, minutes: int = 3
) -> list[tuple[int, dict[str, str], float]]:
    """Samples of two simulated GPUs, one every 5 s, with fault ``kind`` injected into GPU 1 at ``inject_at_s``."""
    clock = SimpleNamespace(t=1_000.0)
    sim = SimulatedNVML(2, clock=lambda: clock.t, seed=11, driver=driver)
    src = GpuSource(Nvml(sim), "node-a", watch_events=False, background=False, clock=lambda: clock.t)
    src.start()
    samples = []
    for step in range(minutes * 12 + 1):
        if step * 5 == inject_at_s:
            sim.inject(1, kind)
        ts = int(clock.t * 1000)
        for fam in src.collect():
            samples += [(ts, {"__name__": fam.name, **labels}, value) for labels, value in fam.samples]
        clock.t += 5
    return samples


def fired(samples: list[tuple[int, dict[str, str], float]], alert: str) -> list[dict]:
    pack = load_pack([default_rules_path()])
    return [r for r in replay(samples, pack) if r["alert"] == alert and r["state"] == "firing"]


def test_a_gpu_whose_driver_asks_for_a_reset_pages_within_the_slow_cadence():
    samples = record("570.133.20", inject_at_s=60, kind="recovery_action")
    alerts = fired(samples, "GpuRecoveryActionRequired")
    assert [a["labels"]["gpu"] for a in alerts] == ["1"]
    assert alerts[0]["value"] == 1  # NVML_GPU_RECOVERY_ACTION_GPU_RESET
    assert 60 <= alerts[0]["at"] - samples[0][0] / 1000 <= 60 + SLOW_CADENCE_S + 5


def test_a_healthy_gpu_on_a_recent_driver_exports_recovery_action_none():
    samples = record("570.133.20", inject_at_s=-1, kind="recovery_action", minutes=1)
    actions = {s[1]["gpu"]: s[2] for s in samples if s[1]["__name__"] == "gpufleet_gpu_recovery_action"}
    assert actions == {"0": 0, "1": 0}
    assert fired(samples, "GpuRecoveryActionRequired") == []


def test_a_driver_older_than_r570_exports_no_recovery_action_and_the_rule_stays_silent():
    samples = record("555.42.06", inject_at_s=60, kind="recovery_action")
    assert not [s for s in samples if s[1]["__name__"] == "gpufleet_gpu_recovery_action"]
    assert fired(samples, "GpuRecoveryActionRequired") == []
    assert [s for s in samples if s[1]["__name__"] == "gpufleet_gpu_power_watts"], "the rest still reports"
