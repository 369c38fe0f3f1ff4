"""A simulated fleet for the dashboard tests: simulated agents with injected faults, plus series the
simulated agents do not make on their own here (inference servers, row remapping, PCIe/NVLink errors, pods,
processes), written through remote-write like any other client would, under the names their producers
declare (a renamed series fails the fixture instead of writing a name no agent sends)."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

from gpufleet.agent.fields import PROCESS_MEMORY
from gpufleet.agent.main import AgentSettings, start_agent
from gpufleet.agent.sources.inference import _HIST_FAMILIES, _RATE_FAMILIES
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, gpu_field, produced

CLUSTER = "dc1"
NODES = ("gpu-node-a", "gpu-node-b")
INTERVAL = "2s"  # the $__interval the tests expand queries with
SCRAPE_INTERVAL = 1.0


def start_agents(collector_url: str | None) -> list[Any]:
    agents = []
    for i, node in enumerate(NODES):
        agents.append(
            start_agent(
                AgentSettings(
                    listen=f"127.0.0.1:{free_port()}",
                    collector=collector_url,
                    simulate=2,
                    node=node,
                    cluster=CLUSTER,
                    interval=0.5,
                    push_interval=1.0,
                    seed=11 + i,
                )
            )
        )
    a, b = agents
    a.simulator.inject(0, "xid", xid=48)
    a.simulator.inject(1, "ecc", count=2)
    b.simulator.inject(0, "idle_memory", duration=600)
    b.simulator.inject(1, "hw_slowdown", duration=600)
    return agents


def _gpu_labels(agent: Any, index: int) -> dict[str, str]:
    gpu = agent.agent.sources[0].gpus[index]
    return {
        "node": agent.settings.node,
        "gpu": str(index),
        "uuid": gpu.uuid,
        "model": gpu.model,
        "cluster": CLUSTER,
    }


def extra_series(agents: list[Any], step: int, now_ms: int) -> list[rw.Series]:
    """One sample of every extra series at ``now_ms``; counters grow with ``step``."""
    out = []

    def add(name: str, labels: dict[str, str], value: float) -> None:
        out.append(rw.Series({"__name__": name, **labels}, [(now_ms, float(value))]))

    for agent in agents:
        for i in range(2):
            g = _gpu_labels(agent, i)
            add(gpu_field("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"), {**g, "type": "correctable"}, i)
            add(gpu_field("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"), {**g, "type": "uncorrectable"}, 0)
            add(gpu_field("DCGM_FI_DEV_ROW_REMAP_PENDING"), g, 1 if i == 1 else 0)
            add(gpu_field("DCGM_FI_DEV_ROW_REMAP_FAILURE"), g, 0)
            add(gpu_field("DCGM_FI_DEV_RETIRED_DBE"), {**g, "cause": "double_bit"}, i)
            add(gpu_field("DCGM_FI_DEV_PCIE_REPLAY_COUNTER"), g, step * (i + 1))
            add(
                gpu_field("DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"),
                {**g, "type": "crc_flit"},
                step * i,
            )
            add(
                produced(PROCESS_MEMORY[0]),
                {**g, "pid": str(4000 + i), "command": "python"},
                (20 + i) * (1 << 30),
            )
            # the agent's Kubernetes attribution puts pod labels on the GPU series
            add(gpu_field("DCGM_FI_DEV_GPU_UTIL"), {**g, "namespace": "ml", "pod": f"trainer-{i}"}, 0.9)
    node = agents[0].settings.node
    for model, server in (("llama-3-8b", "vllm-0"), ("mistral-7b", "vllm-1")):
        lab = {"node": node, "cluster": CLUSTER, "model": model, "server": server}
        for name, p50, p99 in (
            (produced(_HIST_FAMILIES["e2e"][0]), 0.8, 2.5),
            (produced(_HIST_FAMILIES["ttft"][0]), 0.05, 0.3),
            (produced(_HIST_FAMILIES["itl"][0]), 0.02, 0.06),
            (produced(_HIST_FAMILIES["queue"][0]), 0.01, 0.2),
        ):
            add(name, {**lab, "quantile": "0.5"}, p50)
            add(name, {**lab, "quantile": "0.99"}, p99)
        # rates under the names the agent's inference source gives them
        for key, value in (
            ("requests", 12.0),
            ("generation_tokens", 2400.0),
            ("prompt_tokens", 9000.0),
            ("errors", 0.1),
        ):
            add(produced(_RATE_FAMILIES[key][0]), lab, value)
    return out


def write(url: str, series: list[rw.Series]) -> None:
    req = urllib.request.Request(
        url,
        data=rw.encode(series),
        method="POST",
        headers={
            "Content-Type": rw.CONTENT_TYPE,
            "Content-Encoding": rw.CONTENT_ENCODING,
            "X-Prometheus-Remote-Write-Version": "0.1.0",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 204), resp.status


def run(agents: list[Any], write_url: str, seconds: float = 12.0) -> None:
    """Let the agents run while the extra series are written once a second."""
    for step in range(int(seconds)):
        write(write_url, extra_series(agents, step, int(time.time() * 1000)))
        if step == seconds // 2:
            agents[0].simulator.inject(
                0, "xid", xid=48
            )  # a second XID, so increases are seen inside the range
            agents[0].simulator.inject(1, "xid", xid=79)
        time.sleep(1.0)
