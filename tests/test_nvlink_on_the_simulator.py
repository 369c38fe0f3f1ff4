"""NVLink health on a simulated pair of Hopper GPUs: the GPU source reads the counters and link state the way
it reads a real H100/H200 (one counter per link, the per-GPU totals answering NOT_SUPPORTED), and the rule
pack, fed through the rule engine, pages once for a link that goes down and warns once for a replay burst,
and both resolve when the link is healthy again."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from types import SimpleNamespace

import pytest

from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.collector.rules.backtest import replay
from gpufleet.collector.rules.model import default_rules_path, load_pack
from tests.conftest import free_port, wait_until

SLOW_CADENCE_S = (
    AgentSettings().slow_interval
)  # the GPU source's slow rows, NVLink counters and state among them
STEP_S = 5
INJECT_AT_S = 60

Sample = tuple[int, dict[str, str], float]


def record(kind: str | None, *, link: int, duration: float, minutes: int) -> list[Sample]:
    """Samples of a busy simulated NVLink pair (GPUs 0 and 1), one every 5 s; fault ``kind`` hits GPU 1's
    ``link`` at 60 s."""
    clock = SimpleNamespace(t=1_000.0)
    sim = SimulatedNVML(2, clock=lambda: clock.t, seed=11, workload="busy")
    src = GpuSource(Nvml(sim), "node-a", watch_events=False, background=False, clock=lambda: clock.t)
    src.start()
    samples: list[Sample] = []
    for step in range(minutes * 60 // STEP_S + 1):
        if kind is not None and step * STEP_S == INJECT_AT_S:
            sim.inject(1, kind, link=link, duration=duration)
        ts = int(clock.t * 1000)
        for fam in src.collect():
            samples += [(ts, {"__name__": fam.name, **labels}, value) for labels, value in fam.samples]
        clock.t += STEP_S
    return samples


def notifications(samples: list[Sample], alert: str) -> list[dict]:
    """What the default pack would send about ``alert``, as `gpufleet alerts backtest` prints it."""
    pack = load_pack([default_rules_path()])
    return [r for r in replay(samples, pack) if r["alert"] == alert and not r.get("repeat")]


def since_start(samples: list[Sample], note: dict) -> float:
    return note["at"] - samples[0][0] / 1000


def series(samples: list[Sample], name: str, **match: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _, labels, value in samples:
        if labels["__name__"] == name and all(labels.get(k) == v for k, v in match.items()):
            out.setdefault(labels["gpu"], []).append(value)
    return out


def test_a_link_that_goes_down_pages_once_for_each_gpu_of_the_pair_and_resolves_when_it_retrains():
    samples = record("nvlink_down", link=3, duration=180, minutes=8)
    notes = notifications(samples, "GpuNvlinkDown")
    firing = [n for n in notes if n["state"] == "firing"]
    resolved = [n for n in notes if n["state"] == "resolved"]

    assert sorted(n["labels"]["gpu"] for n in firing) == ["0", "1"]  # both ends of link 3, once each
    assert {n["labels"]["severity"] for n in firing} == {"critical"}
    assert all(n["value"] == 17 for n in firing)  # 17 of 18 links up
    # seen within the slow cadence, then `for: 1m`
    for n in firing:
        assert INJECT_AT_S + 60 <= since_start(samples, n) <= INJECT_AT_S + SLOW_CADENCE_S + 60 + STEP_S
    assert sorted(n["labels"]["gpu"] for n in resolved) == ["0", "1"]
    for n in resolved:  # the link retrains after 180 s
        assert since_start(samples, n) >= INJECT_AT_S + 180
    assert series(samples, "gpufleet_gpu_nvlink_links") == {"0": [18.0] * 97, "1": [18.0] * 97}
    # Retraining counts one recovery at each end: far below the error rule's rate.
    recoveries = series(samples, "gpufleet_gpu_nvlink_errors_total", type="recovery")
    assert {gpu: v[-1] for gpu, v in recoveries.items()} == {"0": 1.0, "1": 1.0}
    assert notifications(samples, "GpuNvlinkErrors") == []


def test_a_replay_burst_warns_once_for_the_replaying_gpu_and_resolves_after_it():
    samples = record("nvlink_replay", link=2, duration=300, minutes=14)
    notes = notifications(samples, "GpuNvlinkErrors")
    firing = [n for n in notes if n["state"] == "firing"]
    resolved = [n for n in notes if n["state"] == "resolved"]

    assert [(n["labels"]["gpu"], n["labels"]["type"]) for n in firing] == [("1", "replay")]
    assert firing[0]["labels"]["severity"] == "warning"
    assert firing[0]["value"] > 0.1  # replays per second over 5 minutes
    assert [(n["labels"]["gpu"], n["labels"]["type"]) for n in resolved] == [("1", "replay")]
    # it holds while the burst is in the rate's 5-minute window, and resolves once the window has passed it
    assert since_start(samples, firing[0]) < INJECT_AT_S + 300 + 300
    assert since_start(samples, resolved[0]) > INJECT_AT_S + 300
    assert notifications(samples, "GpuNvlinkDown") == []


def test_a_healthy_busy_pair_counts_ecc_corrections_and_raises_nothing():
    samples = record(None, link=0, duration=0, minutes=30)
    ecc = series(samples, "gpufleet_gpu_nvlink_errors_total", type="ecc_data")
    assert set(ecc) == {"0", "1"} and all(v[-1] > v[0] for v in ecc.values())  # the links correct some bits
    assert {gpu: v[-1] for gpu, v in series(samples, "gpufleet_gpu_nvlink_links_up").items()} == {
        "0": 18.0,
        "1": 18.0,
    }
    for alert in ("GpuNvlinkErrors", "GpuNvlinkDown"):
        assert notifications(samples, alert) == [], alert


# ---- the same faults driven as a person drives a simulated agent -----------------------------------------
def _inject(agent_url: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "gpufleet.cli", "simulate", "inject", *args, "--agent", agent_url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _metric(agent_url: str, name: str) -> dict[str, float]:
    """``{label set as written: value}`` of one family on the agent's /metrics."""
    with urllib.request.urlopen(agent_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name) :]] = float(value)
    return out


@pytest.fixture
def simulated_agent():
    agent = start_agent(
        AgentSettings(
            listen=f"127.0.0.1:{free_port()}",
            simulate=2,
            node="gpu-node-1",
            interval=0.2,
            slow_interval=0.2,
            seed=7,
            nvlink_per_link=True,
        )
    )
    try:
        yield f"http://{agent.settings.listen}"
    finally:
        agent.stop()


def test_gpufleet_simulate_inject_replays_a_link_then_takes_it_down_at_both_ends_until_recover(
    simulated_agent,
):
    url = simulated_agent

    def by_gpu(name: str, *match: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in _metric(url, name).items():
            if all(m in k for m in match):
                gpu = k.split('gpu="')[1].split('"')[0]
                out[gpu] = out.get(gpu, 0.0) + v
        return out

    wait_until(lambda: by_gpu("gpufleet_gpu_nvlink_links_up") == {"0": 18.0, "1": 18.0}, timeout=30)

    def replays() -> dict[str, float]:
        return by_gpu("gpufleet_gpu_nvlink_errors_total", 'type="replay"')

    first = replays()
    assert "replays" in _inject(url, "nvlink_replay", "--gpu", "0", "--duration", "10m")
    wait_until(lambda: replays()["0"] > first["0"], timeout=30)
    assert replays()["1"] == first["1"]

    said = _inject(url, "nvlink_down", "--gpu", "1", "--duration", "10m")
    assert "NVLink 0 of GPU 1 and GPU 0 down" in said
    wait_until(lambda: by_gpu("gpufleet_gpu_nvlink_links_up") == {"0": 17.0, "1": 17.0}, timeout=30)
    down = {k for k, v in _metric(url, "gpufleet_gpu_nvlink_link_up").items() if v == 0}
    assert len(down) == 2 and all('link="0"' in k for k in down)  # per link, with --nvlink-per-link

    _inject(url, "recover", "--gpu", "1")
    wait_until(lambda: by_gpu("gpufleet_gpu_nvlink_links_up") == {"0": 18.0, "1": 18.0}, timeout=30)
    assert by_gpu("gpufleet_gpu_nvlink_links") == {"0": 18.0, "1": 18.0}
