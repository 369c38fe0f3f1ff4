"""The agent's pipeline: sources from one table, an enrich stage for who holds each GPU, sinks, and the
agent's own metrics as the union of what its components report."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from gpufleet.agent.attribution import DeviceLabels, PodAttribution
from gpufleet.agent.core import Agent
from gpufleet.agent.families import Family, Snapshot
from gpufleet.agent.nvml import Nvml, NvmlEvent
from gpufleet.agent.pipeline import OwnMetrics
from gpufleet.agent.settings import AgentSettings
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources import SOURCES, SourceContext, selected
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.agent.spool import Spool
from tests.conftest import wait_until

AGENT = Path(__file__).resolve().parent.parent / "agent"


def test_every_source_in_the_table_is_built_by_its_factory_under_its_name():
    settings = AgentSettings(node="n")
    ctx = SourceContext(
        settings,
        Nvml(SimulatedNVML(1, seed=1)),
        on_event=lambda: None,
        gpu_lookup=lambda: [],
        gpus_for_pod=None,
    )
    for spec in SOURCES:
        src = spec.factory(ctx)
        assert src.name == spec.name
        assert spec.help


def test_an_agent_runs_the_default_sources_and_refuses_an_unknown_one_naming_those_it_knows():
    assert [s.name for s in selected(AgentSettings())] == [s.name for s in SOURCES if s.default_on]
    assert [s.name for s in selected(AgentSettings(sources=("host",)))] == ["host"]
    with pytest.raises(
        ValueError, match=r"unknown source\(s\) \['nvme'\]; known: \['gpu', 'host', 'inference'\]"
    ):
        selected(AgentSettings(sources=("gpu", "nvme")))


class _EndpointSource:
    """A source that labels its own pods and names a GPU only to be joined with the GPU series."""

    name = "endpoint"
    names_devices = False

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def collect(self) -> list[Family]:
        f = Family("gpufleet_inference_gpu_info", "gauge", "A GPU serving the model.")
        f.add({"node": "n", "uuid": "GPU-x", "pod": "server-0", "namespace": "serving"}, 1.0)
        return [f]


def test_the_enrich_stage_labels_gpu_series_with_their_pod_and_leaves_a_sources_own_pod_labels_alone():
    sim = SimulatedNVML(2, seed=4)
    uuids = [g["uuid"] for g in sim.describe()]
    holders = {
        uuids[1]: {"pod": "trainer-0", "namespace": "ml", "container": "main"},
        "GPU-x": {"pod": "other"},
    }
    gpu = GpuSource(Nvml(sim), "n", watch_events=False, background=False)
    gpu.start()
    taken: list[Snapshot] = []
    agent = Agent(
        [gpu, _EndpointSource()],
        node="n",
        sinks=[taken.append],
        enrichers=[DeviceLabels(lambda device: dict(holders.get(device, {})))],
    )
    snap = agent.sample()
    assert taken == [snap]
    up = {
        lab["gpu"]: lab.get("pod")
        for f in snap.families
        if f.name == "gpufleet_gpu_up"
        for lab, _ in f.samples
    }
    assert up == {"0": None, "1": "trainer-0"}
    (info,) = [lab for f in snap.families if f.name == "gpufleet_inference_gpu_info" for lab, _ in f.samples]
    assert info["pod"] == "server-0"


def test_a_failing_enricher_costs_the_labels_not_the_sample(caplog):
    def broken(device: str) -> dict[str, str]:
        raise RuntimeError("kubelet exploded")

    gpu = GpuSource(Nvml(SimulatedNVML(1, seed=5)), "n", watch_events=False, background=False)
    gpu.start()
    snap = Agent([gpu], node="n", enrichers=[DeviceLabels(broken)]).sample()
    assert [v for f in snap.families if f.name == "gpufleet_gpu_up" for _, v in f.samples] == [1.0]
    assert "enriching a sample failed" in caplog.text


def test_the_agents_own_metrics_are_the_union_of_its_components_each_labelled_with_the_node(tmp_path):
    def kubelet_down() -> object:
        raise OSError("connection refused")

    attribution = PodAttribution("/nonexistent/kubelet.sock", list_pods=kubelet_down)
    attribution.update()
    spool = Spool(tmp_path, fsync=False)
    spool.put(b"batch", 7)
    own = OwnMetrics("node-a", [Nvml(SimulatedNVML(1)), attribution, spool]).collect()
    got = {(f.name, tuple(sorted(lab.items()))): v for f in own for lab, v in f.samples}
    assert got[("gpufleet_agent_simulated", (("node", "node-a"),))] == 1.0
    assert got[("gpufleet_agent_pod_resources_failures_total", (("node", "node-a"),))] == 1.0
    assert got[("gpufleet_agent_spool_samples", (("node", "node-a"),))] == 7.0
    assert (
        got[("gpufleet_agent_spool_dropped_samples_total", (("node", "node-a"), ("reason", "size")))] == 0.0
    )
    assert [f.name for f in own][:2] == [
        "gpufleet_agent_simulated",
        "gpufleet_agent_pod_resources_failures_total",
    ]


def test_xid_events_are_read_through_the_nvml_gateway():
    sim = SimulatedNVML(2, seed=6)
    nvml = Nvml(sim)
    nvml.start()
    gpus = nvml.gpus()
    events = nvml.event_set()
    assert all(nvml.register_events(g.handle, 0x8, events) for g in gpus)
    assert nvml.wait_event(events, 10) is None  # a timeout is no event, not an error
    sim.inject(1, "xid", xid=48)
    event = nvml.wait_event(events, 1000)
    assert event == NvmlEvent(nvml.handle_key(gpus[1].handle), 0x8, 48)
    nvml.free_event_set(events)


class _WaitsItsTimeOut(SimulatedNVML):
    """The simulator, with an event wait NVML-like in that nothing cuts it short (it ends when the test says,
    standing in for its timeout), and shutdowns recorded."""

    SHUTDOWN_ENDS_WAITS = False

    def __init__(self) -> None:
        super().__init__(1, seed=7)
        self.in_wait = threading.Event()
        self.timeout = threading.Event()
        self.shutdowns = 0

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        self.in_wait.set()
        self.timeout.wait(60)
        raise self.NVMLError(10)  # NVML_ERROR_TIMEOUT

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1
        super().nvmlShutdown()


def test_nvml_is_not_shut_down_under_a_thread_inside_an_event_wait_and_is_once_the_wait_ends():
    lib = _WaitsItsTimeOut()
    nvml = Nvml(lib)
    nvml.start()
    events = nvml.event_set()
    waiter = threading.Thread(target=nvml.wait_event, args=(events, 5000))
    waiter.start()
    assert lib.in_wait.wait(10)
    nvml.shutdown()  # the agent stopping while the XID thread waits: NVML stays up under it
    assert lib.shutdowns == 0
    lib.timeout.set()
    waiter.join(10)
    assert not waiter.is_alive()
    nvml.shutdown()
    assert lib.shutdowns == 1


def test_shutting_the_simulator_down_ends_an_event_wait_at_once():
    sim = SimulatedNVML(1, seed=8)
    nvml = Nvml(sim)
    nvml.start()
    events = nvml.event_set()
    assert all(nvml.register_events(g.handle, 0x8, events) for g in nvml.gpus())
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(nvml.wait_event(events, 600_000)))
    waiter.start()
    wait_until(lambda: nvml._waiting == 1, timeout=10)  # inside the wait
    nvml.shutdown()
    waiter.join(30)  # a ten-minute wait, ended by the shutdown
    assert not waiter.is_alive() and got == [None]


def test_no_agent_module_but_the_gateway_reaches_the_nvml_library():
    offenders = []
    for path in AGENT.rglob("*.py"):
        if path.name in ("nvml.py", "simulator.py"):  # the gateway, and the library stand-in it can be given
            continue
        text = path.read_text()
        if re.search(r"^\s*(import pynvml|from pynvml)|\.lib\b|_lib\.|nvmlEventSetWait", text, re.MULTILINE):
            offenders.append(path.name)
    assert offenders == []
