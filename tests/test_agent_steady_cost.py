"""An agent sampling every second does per sample only what the sample needs: a series' labels are made once
and handed out again, the pusher encodes a series' labels once, and what it sends is, byte for byte, what the
codec makes of the same samples; changes (a MIG layout, an urgent value) still show at once."""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

from gpufleet.agent.attribution import DeviceLabels
from gpufleet.agent.core import Agent
from gpufleet.agent.families import Family, Snapshot
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.push import Pusher
from gpufleet.agent.settings import AgentSettings
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.agent.sources.host import HostSource
from gpufleet.core import remote_write as rw
from gpufleet.core.sender import URGENT_HEADER


@dataclass
class Answer:
    status: int = 204
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Capturing:
    """An HTTP transport that takes every batch and keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict[str, str]]] = []

    def request(self, method: str, url: str, *, body: bytes, headers: dict[str, str]) -> Answer:
        self.sent.append((body, headers))
        return Answer()


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Workload:
    """A source whose label dicts are new every sample and not in sorted order, with an empty label value
    and a zero: what an enrich stage or an inference server's own labels look like to the pusher."""

    name = "workload"
    names_devices = False

    def __init__(self) -> None:
        self.n = 0

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def collect(self) -> list[Family]:
        self.n += 1
        f = Family("gpufleet_inference_requests_total", "counter", "Requests served.")
        f.add({"node": "n", "model": "llama", "endpoint": "", "cluster": "c"}, 0.0 if self.n == 1 else self.n)
        f.add({"model": "mistral", "node": "n", "endpoint": "vllm-0"}, 3.0)
        return [f]


def naive_request(snaps: list[Snapshot]) -> bytes:
    """The request as the codec makes it: one series per name and label set, samples in time order."""
    series: dict[tuple, rw.Series] = {}
    meta: dict[str, rw.Metadata] = {}
    for snap in snaps:
        for fam in snap.families:
            meta.setdefault(fam.name, rw.Metadata(fam.name, fam.kind, fam.help))
            for labels, value in fam.samples:
                key = (fam.name, tuple(sorted(labels.items())))
                s = series.setdefault(key, rw.Series({"__name__": fam.name, **labels}))
                s.samples.append((snap.timestamp_ms, value))
    return rw.encode(series.values(), list(meta.values()))


def mig_node(clock: Clock) -> GpuSource:
    sim = SimulatedNVML(2, seed=3, clock=clock, mig={0: ["3g.40gb", "2g.20gb"]})
    return GpuSource(Nvml(sim), "n", watch_events=False, background=False, clock=clock)


def test_a_pushed_batch_is_byte_for_byte_what_the_codec_makes_of_the_same_samples():
    clock, http = Clock(), Capturing()
    taken: list[Snapshot] = []
    gpu = mig_node(clock)
    gpu.start()
    pusher = Pusher("http://collector:9446", http=http)
    holders = {g.uuid: {"pod": "trainer-0", "namespace": "ml"} for g in gpu.gpus[1:]}
    agent = Agent(
        [gpu, HostSource("n"), Workload()],
        node="n",
        clock=clock,
        sinks=[taken.append, pusher],
        enrichers=[DeviceLabels(lambda device: dict(holders.get(device, {})))],
    )
    for batch in range(3):  # the series' keys are remembered across batches
        for _ in range(4):
            agent.sample()
            clock.t += 1
        assert pusher.flush()
        body, _ = http.sent[-1]
        assert body == naive_request(taken[batch * 4 :])
    assert rw.decode(http.sent[-1][0]).sample_count == sum(
        len(f.samples) for snap in taken[8:] for f in snap.families
    )


def test_values_and_times_at_the_edges_of_the_wire_format_are_pushed_as_the_codec_writes_them():
    http = Capturing()
    pusher = Pusher("http://collector:9446", http=http)
    values = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e308, 5e-324, -3.0, 2.0**53 + 1]
    snaps = []
    for ms in (0, 1, 127, 128, 1_700_000_000_000, 2**62, -1000):
        f = Family("gpufleet_gpu_power_watts", "gauge", "Power draw.")
        for i, v in enumerate(values):
            f.add({"gpu": str(i), "node": "n"}, v)
        snaps.append(Snapshot(ms, [f, Family("gpufleet_gpu_up", "gauge", "")]))
        pusher(snaps[-1])
    assert pusher.flush()
    assert http.sent[-1][0] == naive_request(snaps)


def test_a_gpus_series_carry_the_same_label_dicts_sample_after_sample():
    clock = Clock()
    gpu = mig_node(clock)
    gpu.start()
    gpu.collect()  # GPM rates need a sample before
    clock.t += 1
    first = gpu.collect()
    clock.t += 1
    second = gpu.collect()
    assert [f.name for f in first] == [f.name for f in second]
    assert sum(len(f.samples) for f in second) > 100
    for a, b in zip(first, second, strict=True):
        assert [la for la, _ in a.samples] == [lb for lb, _ in b.samples], a.name
        assert all(la is lb for (la, _), (lb, _) in zip(a.samples, b.samples, strict=True)), a.name


def test_a_held_gpus_series_carry_the_same_joined_labels_until_its_holder_changes():
    clock = Clock()
    gpu = GpuSource(Nvml(SimulatedNVML(2, seed=3, clock=clock)), "n", watch_events=False, background=False)
    gpu.start()
    held, free = gpu.gpus[0].uuid, gpu.gpus[1].uuid
    holders = {held: {"pod": "trainer-0", "namespace": "ml"}}
    agent = Agent([gpu], node="n", clock=clock, enrichers=[DeviceLabels(lambda d: dict(holders.get(d, {})))])

    def series() -> dict[tuple[str, str, str], dict[str, str]]:
        clock.t += 1
        snap = agent.sample()
        return {
            (f.name, labels["uuid"], str(sorted(labels.items()))): labels
            for f in snap.families
            for labels, _ in f.samples
            if "uuid" in labels and "compute_instance" not in labels
        }

    series()
    first, second = series(), series()
    assert first.keys() == second.keys()
    assert all(first[k] is second[k] for k in first)  # the same dicts: the pusher knows them by identity
    assert {labels.get("pod") for (_, uuid, _), labels in first.items() if uuid == held} == {"trainer-0"}
    assert not any("pod" in labels for (_, uuid, _), labels in first.items() if uuid == free)

    holders[held] = {"pod": "trainer-1", "namespace": "ml"}  # the GPU goes to another pod
    third = series()
    assert {labels.get("pod") for (_, uuid, _), labels in third.items() if uuid == held} == {"trainer-1"}
    assert all(third[k] is second[k] for k in third if k in second and k[1] == free)


class MigTurnsOff:
    """The simulator, until GPU 0 is told to leave MIG mode: then NVML shows it without instances."""

    def __init__(self, sim: SimulatedNVML) -> None:
        self._sim = sim
        self.off = False

    def nvmlDeviceGetMigMode(self, handle: SimpleNamespace) -> list[int]:
        if self.off and handle.index == 0:
            return [0, 0]
        return self._sim.nvmlDeviceGetMigMode(handle)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sim, name)


def test_a_gpu_leaving_mig_mode_loses_its_instances_series_and_its_info_says_so():
    clock = SimpleNamespace(t=0.0)
    lib = MigTurnsOff(SimulatedNVML(2, seed=3, clock=lambda: clock.t, mig={0: ["3g.40gb"]}))
    gpu = GpuSource(Nvml(lib), "n", watch_events=False, background=False, clock=lambda: clock.t)
    gpu.start()

    def sample() -> dict[str, list[dict[str, str]]]:
        clock.t += AgentSettings().slow_interval + 1  # past the slow interval: the MIG layout is read again
        return {f.name: [labels for labels, _ in f.samples] for f in gpu.collect()}

    before = sample()
    assert [lab["mig_profile"] for lab in before["gpufleet_mig_info"]] == ["3g.40gb"]
    assert {lab["gpu"]: lab["mig_mode"] for lab in before["gpufleet_gpu_info"]} == {
        "0": "enabled",
        "1": "disabled",
    }
    lib.off = True
    after = sample()
    assert not after.get("gpufleet_mig_info")
    assert {lab["gpu"]: lab["mig_mode"] for lab in after["gpufleet_gpu_info"]} == {
        "0": "disabled",
        "1": "disabled",
    }


def throttle(value: float, labels: dict[str, str] | None = None) -> Snapshot:
    f = Family("gpufleet_gpu_clock_event_active", "gauge", "A clock-event reason is active.")
    f.add(labels if labels is not None else {"node": "n", "uuid": "GPU-0", "reason": "hw_thermal"}, value)
    return Snapshot(1_700_000_000_000, [f])


def test_an_urgent_value_is_judged_by_its_labels_not_by_the_dict_that_carries_them():
    http = Capturing()
    pusher = Pusher("http://collector:9446", http=http)
    pusher(throttle(0.0))
    pusher(throttle(0.0, {"reason": "hw_thermal", "uuid": "GPU-0", "node": "n"}))  # a new dict, same series
    pusher.flush()
    assert URGENT_HEADER not in http.sent[-1][1]
    pusher(throttle(1.0, {"uuid": "GPU-0", "reason": "hw_thermal", "node": "n"}))
    pusher.flush()
    assert http.sent[-1][1].get(URGENT_HEADER) == "1"


def test_the_sampling_loop_leaves_what_lives_as_long_as_the_agent_out_of_full_collections():
    gc.unfreeze()
    gpu = GpuSource(Nvml(SimulatedNVML(1, seed=2)), "n", watch_events=False, background=False)
    gpu.start()
    agent = Agent([gpu], node="n", interval=0.01)
    loop = threading.Thread(target=agent.run, daemon=True)
    try:
        loop.start()
        while agent.samples_taken < 2:
            loop.join(0.01)
        assert gc.get_freeze_count() > 0
    finally:
        agent.stop()
        loop.join(5)
        gc.unfreeze()


def test_a_scrape_writes_what_writing_every_series_anew_writes_and_forgets_series_that_left():
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.utils import floatToGoString

    from gpufleet.agent.exposition import TextExposition, escape, series_head

    def naive(families: list[Family]) -> bytes:
        lines = []
        for f in families:
            if f.samples:
                lines += [f"# HELP {f.name} {escape(f.help, quote=False)}", f"# TYPE {f.name} {f.kind}"]
                lines += [f"{series_head(f.name, la)} {floatToGoString(v)}" for la, v in f.samples]
        return ("\n".join(lines) + "\n").encode()

    clock = Clock()
    gpu = mig_node(clock)
    gpu.start()
    pod = {"pod": 'we"ird\\name\n', "namespace": "ml"}
    agent = Agent([gpu, Workload()], node="n", clock=clock, enrichers=[DeviceLabels(lambda d: dict(pod))])
    text = TextExposition()
    for _ in range(3):
        clock.t += 1
        families = agent.sample().families
        assert text.render(families) == naive(families)
    assert 'pod="we\\"ird\\\\name\\n"' in text.render(families).decode()
    # and Prometheus' own parser reads every sample back, labels and values as the snapshot holds them
    parsed = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for fam in text_string_to_metric_families(text.render(families).decode())
        for s in fam.samples
    }
    assert parsed == {(f.name, tuple(sorted(la.items())), v) for f in families for la, v in f.samples}
    assert len(text._heads) == sum(len(f.samples) for f in families)
    text.render(families[:1])  # the other series left: their heads go
    assert len(text._heads) == len(families[0].samples)


def test_a_push_goes_at_the_sample_that_makes_it_due_every_interval_not_a_sample_later():
    from tests.conftest import wait_until

    clock, http = Clock(), Capturing()
    pusher = Pusher("http://collector:9446", http=http, interval=5.0, clock=clock)
    pusher.start()
    try:
        for second in range(1, 31):
            clock.t += 1.0 - (0.002 if second % 2 else 0.001)  # a sampler's tick a little early
            pusher(throttle(0.0))
            if second % 5 == 0:  # the fifth sample since the last push sends the five
                wait_until(lambda second=second: len(http.sent) == second // 5, timeout=5)
                assert rw.decode(http.sent[-1][0]).sample_count == 5
            else:
                assert len(http.sent) == second // 5
    finally:
        pusher.stop()


def test_samples_further_apart_than_half_the_push_interval_never_push_more_often_than_asked():
    clock, http = Clock(), Capturing()
    pusher = Pusher("http://collector:9446", http=http, interval=5.0, clock=clock)
    pushed_at = []
    for second in range(2, 25, 2):  # a sample every 2 s, the pusher's thread played here, as Pusher.run does
        clock.t += 2.0
        pusher(throttle(0.0))
        if pusher._flush.is_set():  # the sample woke the pusher
            pusher._flush.clear()
            pusher._flushed_at = clock.t
            assert pusher.flush()
            pushed_at.append(second)
    assert pushed_at == [6, 12, 18, 24]  # the first sample a whole interval after the last push
    assert len(http.sent) == 4
