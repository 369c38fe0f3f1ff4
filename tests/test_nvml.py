"""The NVML gateway and the GPU source against scripted NVML answers and the simulator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpufleet.agent.fields import FIELDS, GPM_FIELDS
from gpufleet.agent.nvml import Nvml, NvmlUnavailable
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from tests.fake_nvml import (
    DRIVER_NOT_LOADED,
    GPU_IS_LOST,
    LIBRARY_NOT_FOUND,
    NO_PERMISSION,
    FakeNVML,
    FakeNVMLError,
)


def values(families, name):
    """A family's values by GPU index; none when no GPU gave it a series (the family is then not there)."""
    fam = next((f for f in families if f.name == name), None)
    return {labels.get("gpu"): v for labels, v in fam.samples} if fam is not None else {}


@pytest.mark.parametrize(
    "code, words",
    [
        (LIBRARY_NOT_FOUND, "libnvidia-ml.so.1 was not found"),
        (DRIVER_NOT_LOADED, "driver is not loaded"),
        (NO_PERMISSION, "no permission"),
    ],
)
def test_no_driver_is_a_clear_message_with_the_way_to_try_without_a_gpu(code, words):
    with pytest.raises(NvmlUnavailable) as err:
        Nvml(FakeNVML([], init_error=code)).start()
    assert words in str(err.value)
    assert "--simulate" in str(err.value)


def test_not_supported_is_no_value_not_a_failure():
    fake = FakeNVML(["GPU-a"], {"nvmlDeviceGetTemperature": 40})  # every other field: NOT_SUPPORTED
    src = GpuSource(Nvml(fake), "node1", watch_events=False)
    src.start()
    fams = src.collect()
    assert values(fams, "gpufleet_gpu_up") == {"0": 1.0}
    assert values(fams, "gpufleet_gpu_temperature_celsius") == {"0": 40.0}
    assert "gpufleet_gpu_power_watts" not in {f.name for f in fams}  # no GPU answers it: no family


def test_a_lost_gpu_reads_down_while_the_others_keep_reporting():
    lost = FakeNVMLError(GPU_IS_LOST)
    fake = FakeNVML(
        ["GPU-a", "GPU-b", "GPU-c"],
        {
            "nvmlDeviceGetTemperature": 50,
            ("nvmlDeviceGetTemperature", 1): lost,
            ("nvmlDeviceGetPowerUsage", 1): lost,
            "nvmlDeviceGetPowerUsage": 300_000,
        },
    )
    src = GpuSource(Nvml(fake), "node1", watch_events=False)
    src.start()
    fams = src.collect()
    assert values(fams, "gpufleet_gpu_up") == {"0": 1.0, "1": 0.0, "2": 1.0}
    assert values(fams, "gpufleet_gpu_temperature_celsius") == {"0": 50.0, "2": 50.0}
    assert values(fams, "gpufleet_gpu_power_watts") == {"0": 300.0, "2": 300.0}
    # the lost GPU keeps its identity labels, so rules and dashboards know which one is down
    up = next(f for f in fams if f.name == "gpufleet_gpu_up")
    assert {lab["uuid"] for lab, v in up.samples if v == 0} == {"GPU-b"}


def test_a_gpu_that_answers_again_reads_up():
    state = {"lost": True}

    def temp(*_):
        if state["lost"]:
            raise FakeNVMLError(GPU_IS_LOST)
        return 45

    src = GpuSource(Nvml(FakeNVML(["GPU-a"], {"nvmlDeviceGetTemperature": temp})), "n", watch_events=False)
    src.start()
    assert values(src.collect(), "gpufleet_gpu_up") == {"0": 0.0}
    state["lost"] = False
    assert values(src.collect(), "gpufleet_gpu_up") == {"0": 1.0}


def test_labels_follow_the_design():
    src = GpuSource(Nvml(SimulatedNVML(2, seed=1)), "node7", cluster="prod", watch_events=False)
    src.start()
    up = next(f for f in src.collect() if f.name == "gpufleet_gpu_up")
    for labels, _ in up.samples:
        assert set(labels) == {"node", "gpu", "uuid", "model", "cluster"}
        assert labels["node"] == "node7" and labels["cluster"] == "prod"
        assert labels["uuid"].startswith("GPU-") and labels["model"] == "NVIDIA H100 80GB HBM3"


def test_every_field_in_the_table_reads_a_value_on_the_simulator_in_base_units():
    clock = SimpleNamespace(t=1000.0)
    sim = SimulatedNVML(1, clock=lambda: clock.t, seed=3, workload="busy")
    src = GpuSource(Nvml(sim), "n", watch_events=False, nvlink_per_link=True, clock=lambda: clock.t)
    src.start()
    src.collect()
    clock.t += 120  # two minutes of a training job
    fams = {f.name: f for f in src.collect()}
    for field in FIELDS:
        assert field.name in fams, f"{field.name} read no value on the simulator"
        for labels, v in fams[field.name].samples:
            assert set(field.labels) <= set(labels)
            if field.name.endswith("_ratio"):
                assert 0.0 <= v <= 1.0, field.name
    for gpm in GPM_FIELDS:
        assert gpm.name in fams, f"{gpm.name} read no value on the simulator"
        for _, v in fams[gpm.name].samples:
            assert 0.0 <= v <= (1.0 if gpm.unit == "ratio" else 1e12)
    assert fams["gpufleet_gpu_sm_active_ratio"].samples[0][1] > 0.6  # a training job keeps the SMs busy
    assert fams["gpufleet_gpu_power_watts"].samples[0][1] > 300
    assert fams["gpufleet_gpu_memory_used_bytes"].samples[0][1] > 30 * 2**30


def test_dataloader_bound_job_shows_the_utilization_lie():
    """NVML utilization near 1 while SM activity stays low: the case dashboards and rules must expose."""
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(1, clock=lambda: clock.t, seed=0)
    sim._gpus[0].phase = ("dataloader_bound", 0.9, 0.22, 0.15, 0.1, 48.0)
    sim._gpus[0].phase_until = 10_000
    src = GpuSource(Nvml(sim), "n", watch_events=False)
    src.start()
    src.collect()
    clock.t += 60
    fams = src.collect()
    util = values(fams, "gpufleet_gpu_utilization_ratio")["0"]
    sm = values(fams, "gpufleet_gpu_sm_active_ratio")["0"]
    assert util > 0.8 and sm < 0.3


def test_xid_events_are_counted_per_code_and_wake_the_agent():
    woke = []
    sim = SimulatedNVML(2, seed=1)
    src = GpuSource(Nvml(sim), "n", on_event=lambda: woke.append(1))
    src.start()
    try:
        sim.inject(1, "xid", xid=48)
        sim.inject(1, "xid", xid=48)
        sim.inject(0, "xid", xid=13)
        from tests.conftest import wait_until

        wait_until(lambda: len(woke) >= 3, timeout=5)
        fam = next(f for f in src.collect() if f.name == "gpufleet_gpu_xid_errors_total")
        got = {(lab["gpu"], lab["xid"]): v for lab, v in fam.samples}
        assert got == {("1", "48"): 2.0, ("0", "13"): 1.0}
    finally:
        src.close()


def test_gpu_lost_by_xid_79_reads_down_and_keeps_its_xid_count():
    sim = SimulatedNVML(2, seed=2)
    src = GpuSource(Nvml(sim), "n")
    src.start()
    try:
        sim.inject(0, "lost")
        from tests.conftest import wait_until

        fams = wait_until(
            lambda: (lambda f: f if values(f, "gpufleet_gpu_xid_errors_total") else None)(src.collect())
        )
        assert values(fams, "gpufleet_gpu_up") == {"0": 0.0, "1": 1.0}
        assert values(fams, "gpufleet_gpu_xid_errors_total") == {"0": 1.0}
    finally:
        src.close()
