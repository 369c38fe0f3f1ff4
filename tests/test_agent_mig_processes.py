"""MIG instances get their own series; processes (opt-in) carry their container; MIG settings are never touched."""

from __future__ import annotations

import re
from types import SimpleNamespace

from gpufleet.agent.attribution import container_of
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from tests.conftest import wait_until


class Recording:
    """Stands in front of the NVML library and writes down every name the agent asks it for.

    A name is recorded when it is looked up, before the library is consulted, so a call to a
    function this library lacks (the simulator has no MIG-changing functions) is recorded too."""

    def __init__(self, lib: object) -> None:
        self._lib = lib
        self.looked_up: list[str] = []

    def __getattr__(self, name: str) -> object:
        self.looked_up.append(name)
        return getattr(self._lib, name)


# Functions that change MIG layout or other device state: enabling MIG, carving GPU or compute
# instances, tearing them down, and every setter or reset NVML offers.
MIG_CHANGING = re.compile(
    r"^nvml(Device|GpuInstance|ComputeInstance)(Set|Create|Destroy|Reset|Clear)|Destroy"
)


def series(fams, name):
    return [(lab, v) for f in fams if f.name == name for lab, v in f.samples]


def mig_source(clock, **kw):
    sim = SimulatedNVML(
        2, clock=lambda: clock.t, seed=4, workload="busy", mig={0: ["3g.40gb", "2g.20gb", "1g.10gb"]}
    )
    lib = Recording(sim)
    src = GpuSource(Nvml(lib), "node-a", watch_events=False, background=False, clock=lambda: clock.t, **kw)
    src.start()
    return sim, lib, src


def test_a_gpu_in_mig_mode_reports_each_instance_and_its_profile():
    clock = SimpleNamespace(t=0.0)
    sim, _, src = mig_source(clock)
    src.collect()
    clock.t += 60
    fams = src.collect()
    used = series(fams, "gpufleet_mig_memory_used_bytes")
    assert sorted((lab["gpu"], lab["mig_profile"], lab["gpu_instance"]) for lab, _ in used) == [
        ("0", "1g.10gb", "13"),
        ("0", "2g.20gb", "5"),
        ("0", "3g.40gb", "1"),
    ]
    total = {lab["mig_profile"]: v for lab, v in series(fams, "gpufleet_mig_memory_total_bytes")}
    assert total["3g.40gb"] == 40192 * 2**20
    assert all(lab["mig_uuid"].startswith("MIG-") and lab["uuid"].startswith("GPU-") for lab, _ in used)
    sm = {lab["mig_profile"]: v for lab, v in series(fams, "gpufleet_mig_sm_active_ratio")}
    assert set(sm) == {"3g.40gb", "2g.20gb", "1g.10gb"} and all(0 < v <= 1 for v in sm.values())
    # NVML has no whole-GPU utilization in MIG mode: GPU 0 reads none, GPU 1 (no MIG) does
    assert {lab["gpu"] for lab, _ in series(fams, "gpufleet_gpu_utilization_ratio")} == {"1"}
    modes = {lab["gpu"]: lab["mig_mode"] for lab, _ in series(fams, "gpufleet_gpu_info")}
    assert modes == {"0": "enabled", "1": "disabled"}


def test_the_agent_only_reads_mig_state_and_never_changes_it() -> None:
    """A whole life of the GPU source, event watcher and background reader included: start, samples, close."""
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(
        2, clock=lambda: clock.t, seed=4, workload="busy", mig={0: ["3g.40gb", "2g.20gb", "1g.10gb"]}
    )
    lib = Recording(sim)
    src = GpuSource(Nvml(lib), "node-a", clock=lambda: clock.t, process_metrics=True)
    src.start()
    try:
        wait_until(lambda: "nvmlEventSetWait_v2" in lib.looked_up)
        for _ in range(3):
            clock.t += 5
            src.collect()
    finally:
        src.close()
    asked = set(lib.looked_up)
    assert {
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMigDeviceHandleByIndex",
        "nvmlDeviceRegisterEvents",
    } <= asked
    assert sorted(name for name in asked if MIG_CHANGING.search(name)) == []


def test_the_mig_guard_recognises_every_state_changing_nvml_function() -> None:
    changing = [
        "nvmlDeviceSetMigMode",
        "nvmlDeviceCreateGpuInstance",
        "nvmlDeviceCreateGpuInstanceWithPlacement",
        "nvmlGpuInstanceCreateComputeInstance",
        "nvmlGpuInstanceCreateComputeInstanceWithPlacement",
        "nvmlGpuInstanceDestroy",
        "nvmlComputeInstanceDestroy",
        "nvmlDeviceSetPowerManagementLimit",
        "nvmlDeviceResetGpuLockedClocks",
        "nvmlDeviceClearEccErrorCounts",
    ]
    reading = ["nvmlDeviceGetMigMode", "nvmlDeviceGetGpuInstanceId", "nvmlEventSetCreate", "NVMLError"]
    assert [n for n in changing if not MIG_CHANGING.search(n)] == []
    assert [n for n in reading if MIG_CHANGING.search(n)] == []


def write_proc(root, pid, comm, cgroup):
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cgroup").write_text(cgroup)


CONTAINERD_SYSTEMD = (
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
    "0a1b2c3d_1111_2222_3333_444455556666.slice/cri-containerd-" + "ab" * 32 + ".scope\n"
)
CGROUPFS_V1 = (
    "12:memory:/kubepods/besteffort/pod9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff/" + "cd" * 32 + "\n"
    "11:cpu,cpuacct:/kubepods/besteffort/pod9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff/" + "cd" * 32 + "\n"
)


def test_container_and_pod_of_a_process_come_from_its_cgroup(tmp_path):
    write_proc(tmp_path, 10, "python3", CONTAINERD_SYSTEMD)
    write_proc(tmp_path, 11, "trainer", CGROUPFS_V1)
    write_proc(tmp_path, 12, "sshd", "0::/system.slice/ssh.service\n")
    write_proc(tmp_path, 13, "dockerd-run", "0::/system.slice/docker-" + "ef" * 32 + ".scope\n")
    assert container_of(10, tmp_path) == ("python3", "ab" * 32, "0a1b2c3d-1111-2222-3333-444455556666")
    assert container_of(11, tmp_path) == ("trainer", "cd" * 32, "9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff")
    assert container_of(12, tmp_path) == ("sshd", "", "")
    assert container_of(13, tmp_path) == ("dockerd-run", "ef" * 32, "")
    assert container_of(99, tmp_path) == ("", "", "")  # gone between NVML's answer and our look


def test_process_series_are_opt_in_and_name_the_container(tmp_path):
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(2, clock=lambda: clock.t, seed=9, workload="busy")
    pid = sim.describe()[0]["pid"]
    write_proc(tmp_path, pid, "python3", CONTAINERD_SYSTEMD)
    off = GpuSource(Nvml(sim), "n", watch_events=False, background=False, clock=lambda: clock.t)
    off.start()
    on = GpuSource(
        Nvml(sim),
        "n",
        watch_events=False,
        background=False,
        clock=lambda: clock.t,
        process_metrics=True,
        proc_root=tmp_path,
    )
    on.start()
    clock.t += 60
    assert series(off.collect(), "gpufleet_gpu_process_memory_used_bytes") == []
    fams = on.collect()
    mem = {lab["pid"]: (lab, v) for lab, v in series(fams, "gpufleet_gpu_process_memory_used_bytes")}
    lab, v = mem[str(pid)]
    assert lab["gpu"] == "0" and lab["command"] == "python3" and lab["container_id"] == "ab" * 32
    assert lab["pod_uid"] == "0a1b2c3d-1111-2222-3333-444455556666"
    assert v > 10 * 2**30  # a training job holds tens of GiB
    sm = {lab["pid"]: v for lab, v in series(fams, "gpufleet_gpu_process_sm_utilization_ratio")}
    assert 0.8 < sm[str(pid)] <= 1.0
    # the process on GPU 1 has no /proc entry in the fake tree: reported, with empty container labels
    other = sim.describe()[1]["pid"]
    assert mem[str(other)][0]["container_id"] == ""
