"""`gpufleet top` in a real pseudo-terminal against a collector fed by simulated GPUs on two nodes."""

from __future__ import annotations

import json
import re
import sys
import urllib.request

import pexpect
import pytest

from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.cli.top_ui import Filters, TopState, visible_gpus
from gpufleet.collector.service import Collector, CollectorSettings
from tests.conftest import free_port, wait_until

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")
ROW = re.compile(r"^\s*(node-[ab])\s+(\d+)\s+H100\S*\s.*?\s(\d+)°C\s+(\d+)W")


@pytest.fixture
def two_nodes(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    c = Collector(
        CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/t.db", eval_interval=1.0)
    ).start()
    agents = [
        start_agent(
            AgentSettings(
                listen=f"127.0.0.1:{free_port()}",
                collector=url,
                simulate=3,
                node=node,
                cluster="lab",
                interval=0.3,
                push_interval=0.5,
                seed=seed,
            )
        )
        for node, seed in (("node-a", 1), ("node-b", 2))
    ]
    try:

        def fleet_ready():
            with urllib.request.urlopen(url + "/api/v1/fleet", timeout=5) as resp:
                f = json.loads(resp.read())
            gpus = [g for n in f["nodes"] for g in n["gpus"]]
            return len(gpus) == 6 and all(g["temperature_celsius"] is not None for g in gpus)

        wait_until(fleet_ready, timeout=20)
        yield url, agents
    finally:
        for a in agents:
            a.stop()
        c.close()


def frames(output: str) -> list[list[str]]:
    """The screens top drew, as plain text lines (each redraw starts at the cursor's home)."""
    return [ANSI.sub("", f).replace("\r", "").split("\n") for f in output.split("\x1b[H")[1:]]


def last_frame(output: str, marker: str) -> list[str]:
    return next(f for f in reversed(frames(output)) if any(marker in line for line in f))


def rows(frame: list[str]) -> list[tuple[str, int, int, int]]:
    return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in map(ROW.match, frame) if m]


def spawn_top(url: str, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "gpufleet.cli", "top", "--collector", url, "--interval", "0.5", *args],
        dimensions=(30, 180),
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin"},
        encoding="utf-8",
        timeout=15,
    )


def test_top_shows_every_gpu_sorts_on_a_key_press_and_quits_cleanly(two_nodes):
    url, _ = two_nodes
    p = spawn_top(url)
    seen = []

    def expect(pattern) -> str:
        p.expect(pattern)
        seen.append(p.before + (p.after if isinstance(p.after, str) else ""))
        return "".join(seen)

    try:
        expect("6 GPUs shown")
        out = expect("6 GPUs shown")  # a second, full frame
        first = rows(last_frame(out, "sort: node"))
        assert [(n, g) for n, g, _, _ in first] == [(f"node-{x}", i) for x in "ab" for i in range(3)]

        p.send("t")
        expect("sort: temperature")
        out = expect("6 GPUs shown")
        by_temp = rows(last_frame(out, "sort: temperature"))
        assert len(by_temp) == 6
        temps = [t for _, _, t, _ in by_temp]
        assert temps == sorted(temps, reverse=True)

        p.send("p")
        expect("sort: power")
        out = expect("6 GPUs shown")
        watts = [w for _, _, _, w in rows(last_frame(out, "sort: power"))]
        assert len(watts) == 6 and watts == sorted(watts, reverse=True)

        p.send("/node-b\r")
        out = expect("3 GPUs shown")
        assert {n for n, *_ in rows(last_frame(out, "filter: /node-b"))} == {"node-b"}

        p.send("q")
        out = expect(pexpect.EOF)
    finally:
        p.close(force=True)
    assert p.exitstatus == 0, out[-2000:]
    assert out.rstrip().endswith("\x1b[?1049l")  # left the alternate screen: the shell is back as it was


def test_top_filters_from_the_command_line_and_says_when_the_collector_is_gone(two_nodes, tmp_path):
    url, _ = two_nodes
    p = spawn_top(url, "--node", "node-a", "--sort", "alerts")
    try:
        p.expect("3 GPUs shown")
        p.expect("filter: node=node-a")
    finally:
        p.send("q")
        p.expect(pexpect.EOF, timeout=10)
        p.close()
    assert p.exitstatus == 0

    gone = spawn_top(f"http://127.0.0.1:{free_port()}")
    try:
        gone.expect("cannot reach the collector at http://127.0.0.1:")
        gone.send("q")
        gone.expect(pexpect.EOF, timeout=10)
    finally:
        gone.close(force=True)
    assert gone.exitstatus == 0


def _gpu(node, gpu, **kw):
    return {
        "node": node,
        "gpu": str(gpu),
        "cluster": kw.pop("cluster", "c"),
        "model": "NVIDIA H100",
        "uuid": f"GPU-{node}-{gpu}",
        "pod": kw.pop("pod", None),
        "namespace": kw.pop("namespace", None),
        "alerts": kw.pop("alerts", []),
        "up": True,
        "stale": False,
        **kw,
    }


def test_sorting_puts_missing_values_last_and_alerts_by_severity():
    warn = {"rule": "GpuTemperatureHigh", "state": "firing", "severity": "warning", "runbook_url": None}
    crit = {"rule": "GpuXidCritical", "state": "firing", "severity": "critical", "runbook_url": None}
    fleet = {
        "nodes": [
            {
                "gpus": [
                    _gpu("a", 0, sm_active=0.5, alerts=[warn]),
                    _gpu("a", 1, sm_active=None),
                    _gpu("b", 0, sm_active=0.9, alerts=[crit], pod="train", namespace="ml"),
                    _gpu("b", 1, sm_active=0.1),
                ]
            }
        ]
    }
    order = [(g["node"], g["gpu"]) for g in visible_gpus(fleet, TopState(sort="sm"))]
    assert order == [("b", "0"), ("a", "0"), ("b", "1"), ("a", "1")]
    order = [(g["node"], g["gpu"]) for g in visible_gpus(fleet, TopState(sort="alerts"))]
    assert order[:2] == [("b", "0"), ("a", "0")]
    state = TopState(filters=Filters(pod="ml/"))
    assert [g["uuid"] for g in visible_gpus(fleet, state)] == ["GPU-b-0"]
    state = TopState()
    for key in "/train\r":
        state.press(key)
    assert state.text_filter == "train" and len(visible_gpus(fleet, state)) == 1
    state.press("\x1b")
    assert state.text_filter == "" and len(visible_gpus(fleet, state)) == 4
    state.press("q")
    assert state.quit
