"""Simulated NVIDIA GPUs behind the same NVML surface as ``pynvml``.

``SimulatedNVML`` offers the pynvml functions the agent calls, with the same
argument shapes, units (mW, mJ, MHz, bytes, percent) and error codes, so the
agent's NVML gateway, field table and sources run the same code path on a
laptop and in CI as on a GPU node. GPUs follow believable, load-driven
dynamics: jobs come and go, power follows SM activity, temperature follows
power with a thermal time constant, memory is held by jobs. Faults can be
injected: XIDs, thermal slowdown, power brake, ECC errors, row remapping,
PCIe replays, NVLink errors, a recovery action
(drivers R570 and newer), a GPU falling off the bus, a job that holds
memory but does nothing.

NVLink is modelled as on Hopper: GPUs are joined in pairs (0-1, 2-3, ...) by
all their links, like two H200s bridged NV18. Error counters are per link
(NVML_FI_DEV_NVLINK_ERROR_DL_* with the link as scopeId, and
nvmlDeviceGetNvLinkErrorCounter); the per-GPU totals and the per-link field ids
of older GPUs answer NOT_SUPPORTED, as on a real H200. Links correct a few bits
by ECC under load; a link can go down (at both ends of the pair, then
retrain), take CRC errors or replay in bursts.

GPUs can be put in MIG mode with instances of given
profiles (``mig={0: ["3g.40gb", "2g.20gb"]}``); the simulator never changes
MIG settings on its own, as the agent never does on a real GPU.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

SIMULATED = True

# Error codes and constants, as nvml.h defines them.
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_NOT_FOUND = 6
NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY = 161
NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY = 162
NVML_FI_DEV_NVLINK_ERROR_DL_CRC = 163
# nvmlNvLinkErrorCounter_t -> the simulated counter
NVLINK_ERROR_COUNTERS = {0: "replay", 1: "recovery", 2: "crc_flit", 3: "crc_data", 4: "ecc_data"}
NVLINK_DL_FIELDS = {
    NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY: "replay",
    NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY: "recovery",
    NVML_FI_DEV_NVLINK_ERROR_DL_CRC: "crc_flit",
}
NVLINK_REPLAYS_PER_S = 5.0  # a marginal link replaying under load
NVLINK_ECC_CORRECTIONS_PER_BYTE = 1e-13  # background ECC corrections of a healthy link, per byte carried
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_INT = 5
NVML_PCIE_UTIL_TX_BYTES = 0
SCOPE_ALL_LINKS = 0xFFFFFFFF
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
nvmlEventTypeXidCriticalError = 8
nvmlEventTypeDoubleBitEccError = 2
nvmlEventTypeSingleBitEccError = 1
NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230  # answered from driver R570 on
NVML_GPU_RECOVERY_ACTION_GPU_RESET = 1

REASON_GPU_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80

GPM_SM_UTIL, GPM_SM_OCCUPANCY, GPM_ANY_TENSOR_UTIL, GPM_DRAM_BW_UTIL = 2, 3, 5, 10
GPM_FP64_UTIL, GPM_FP32_UTIL, GPM_FP16_UTIL = 11, 12, 13
GPM_GRAPHICS_UTIL, GPM_NVLINK_RX_PER_SEC, GPM_NVLINK_TX_PER_SEC = 1, 60, 61
MIB = 1 << 20

GIB = 1 << 30


class NVMLError(Exception):
    """Raised like ``pynvml.NVMLError``: ``value`` carries the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class _Profile:
    """What kind of card is simulated."""

    model: str = "NVIDIA H100 80GB HBM3"
    memory_bytes: int = 80 * GIB
    reserved_bytes: int = 512 << 20
    idle_watts: float = 70.0
    limit_watts: float = 700.0
    max_sm_mhz: int = 1980
    mem_mhz: int = 2619
    ambient_celsius: float = 30.0
    celsius_per_watt: float = 0.07
    thermal_tau_s: float = 40.0
    slowdown_celsius: int = 87
    shutdown_celsius: int = 92
    memory_above_core_celsius: float = 6.0
    pcie_generation: int = 5
    pcie_width: int = 16
    nvlink_links: int = 18
    nvlink_bytes_per_s: float = 120e9  # payload one direction at full training load, over all links
    mig_slices: int = 7


# Workload phases: (name, NVML utilization, SM activity per unit of utilization, tensor share, DRAM share, memory GiB)
_PHASES = [
    ("idle", 0.0, 0.0, 0.0, 0.0, 0.0),
    ("training", 0.98, 0.88, 0.75, 0.45, 62.0),
    ("inference", 0.55, 0.55, 0.5, 0.35, 38.0),
    ("dataloader_bound", 0.9, 0.22, 0.15, 0.1, 48.0),
]


@dataclass
class _Gpu:
    index: int
    uuid: str
    serial: str
    bus_id: str
    profile: _Profile
    rng: random.Random
    phase: tuple = _PHASES[0]
    phase_until: float = 0.0
    util: float = 0.0
    sm: float = 0.0
    temp: float = 35.0
    power: float = 70.0
    mem_used: float = 0.0
    energy_mj: float = 0.0
    lost: bool = False
    faults: dict[str, float] = field(default_factory=dict)  # fault name -> until (monotonic-free, sim time)
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)
    gpm_counter: float = 0.0
    gpm_accum: dict[int, float] = field(default_factory=dict)
    # field-value counters (nvml.h NVML_FI_DEV_*), in NVML units
    nvlink_kib: dict[str, float] = field(default_factory=lambda: {"tx": 0.0, "rx": 0.0})
    violation_ns: dict[int, float] = field(default_factory=dict)
    nvlink_counts: dict[tuple[str, int], float] = field(default_factory=dict)  # (counter, link) -> count
    nvlink_down_until: dict[int, float] = field(default_factory=dict)  # link -> sim time it retrains
    nvlink_replaying_until: dict[int, float] = field(default_factory=dict)  # link -> end of a replay burst
    nvlink_ecc_due: float = 0.0  # ECC corrections accrued, not yet counted on a link
    pcie_replays: int = 0
    recovery_action: int = 0  # nvmlDeviceGpuRecoveryAction_t
    remapped: list[int] = field(
        default_factory=lambda: [0, 0, 0, 0]
    )  # correctable, uncorrectable, pending, failure
    mig: list[_Mig] = field(default_factory=list)
    pid: int = 0


@dataclass
class _Mig:
    """One MIG instance (a GPU instance with one compute instance) of a simulated GPU."""

    slot: int
    gpu_instance: int
    compute_instance: int
    slices: int
    memory_mb: int
    uuid: str
    load: float  # the instance's share of the parent's activity model
    gpm_accum: dict[int, float] = field(default_factory=dict)


# MIG profiles: name -> (GPU slices, memory MiB) on an 80 GB H100.
MIG_PROFILES = {
    "1g.10gb": (1, 9984),
    "1g.20gb": (1, 19968),
    "2g.20gb": (2, 19968),
    "3g.40gb": (3, 40192),
    "4g.40gb": (4, 40192),
    "7g.80gb": (7, 80896),
}


class SimulatedNVML:
    """A pynvml-shaped object simulating ``count`` GPUs. ``clock`` gives seconds (injectable for tests)."""

    SIMULATED = True
    SHUTDOWN_ENDS_WAITS = True  # nvmlShutdown ends every event wait at once (see Nvml.shutdown)
    NVMLError = NVMLError

    def __init__(
        self,
        count: int = 2,
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        profile: _Profile | None = None,
        workload: str = "mixed",
        driver: str = "570.133.20",
        mig: dict[int, list[str]] | None = None,
    ) -> None:
        self._clock = clock
        self._profile = profile or _Profile()
        rng = random.Random(seed)
        self._workload = workload
        self._driver = driver
        self._driver_major = int(driver.split(".")[0])
        self._lock = threading.RLock()
        self._events: deque[tuple[int, int, int]] = deque()
        self._event_cv = threading.Condition(self._lock)
        self._t = clock()
        self._gpus = []
        for i in range(count):
            uid = "GPU-" + "-".join(f"{rng.getrandbits(b):0{b // 4}x}" for b in (32, 16, 16, 16, 48))
            self._gpus.append(
                _Gpu(
                    i,
                    uid,
                    f"165{rng.randrange(10**9, 10**10)}",
                    f"00000000:{0x18 + i * 0x10:02X}:00.0",
                    self._profile,
                    random.Random(rng.random()),
                    pid=41000 + 100 * i,
                )
            )
        for gpu_index, profiles in (mig or {}).items():
            if not 0 <= gpu_index < count:
                raise ValueError(f"mig: no simulated GPU {gpu_index}; there are {count}")
            used = 0
            for slot, name in enumerate(profiles):
                if name not in MIG_PROFILES:
                    raise ValueError(f"mig: unknown profile {name!r}; choose from {sorted(MIG_PROFILES)}")
                slices, mem = MIG_PROFILES[name]
                used += slices
                if used > self._profile.mig_slices:
                    raise ValueError(
                        f"mig: profiles {profiles} need more than {self._profile.mig_slices} slices"
                    )
                muid = "MIG-" + "-".join(f"{rng.getrandbits(b):0{b // 4}x}" for b in (32, 16, 16, 16, 48))
                self._gpus[gpu_index].mig.append(
                    _Mig(
                        slot,
                        gpu_instance=[1, 5, 13, 11, 9, 7, 14][slot],
                        compute_instance=0,
                        slices=slices,
                        memory_mb=mem,
                        uuid=muid,
                        load=0.3 + 0.7 * rng.random(),
                    )
                )
        self._initialised = False

    # ---- fault injection -------------------------------------------------------------------------
    def inject(
        self,
        gpu: int,
        kind: str,
        *,
        xid: int | None = None,
        duration: float = 120.0,
        count: int = 1,
        link: int = 0,
    ) -> str:
        """Inject a fault into simulated GPU ``gpu``. Returns a sentence saying what was done. NVLink faults
        hit ``link``: ``nvlink_error`` counts ``count`` CRC errors on it, ``nvlink_down`` takes it down at both
        ends of the pair for ``duration`` seconds (then it retrains, one recovery each end), ``nvlink_replay``
        makes it replay packets for ``duration`` seconds."""
        with self._lock:
            self._advance()
            if not 0 <= gpu < len(self._gpus):
                raise ValueError(
                    f"no simulated GPU {gpu}; there are {len(self._gpus)} (0..{len(self._gpus) - 1})"
                )
            g = self._gpus[gpu]
            now = self._t
            links = g.profile.nvlink_links
            if kind.startswith("nvlink") and not 0 <= link < links:
                raise ValueError(f"no NVLink {link} on simulated GPU {gpu}; it has {links} (0..{links - 1})")
            if kind == "xid":
                if xid is None:
                    raise ValueError("an xid fault needs an XID code, e.g. xid=79")
                self._events.append((gpu, nvmlEventTypeXidCriticalError, int(xid)))
                self._event_cv.notify_all()
                if xid == 79:
                    g.lost = True
                return f"XID {xid} on GPU {gpu}"
            if kind == "lost":
                self._events.append((gpu, nvmlEventTypeXidCriticalError, 79))
                self._event_cv.notify_all()
                g.lost = True
                return f"GPU {gpu} fell off the bus (XID 79)"
            if kind in ("thermal", "power_brake", "idle_memory", "sw_thermal", "hw_slowdown", "straggler"):
                g.faults[kind] = now + duration
                return f"{kind} on GPU {gpu} for {duration:g}s"
            if kind == "ecc":
                key = (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)
                g.ecc[key] = g.ecc.get(key, 0) + count
                agg = (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_AGGREGATE_ECC)
                g.ecc[agg] = g.ecc.get(agg, 0) + count
                self._events.append((gpu, nvmlEventTypeDoubleBitEccError, 0))
                self._event_cv.notify_all()
                return f"{count} uncorrectable ECC error(s) on GPU {gpu}"
            if kind == "row_remap":  # an uncorrectable error remapped a row; takes effect at the next reset
                g.remapped[1] += count
                g.remapped[2] = 1
                return f"{count} row(s) remapped after uncorrectable errors on GPU {gpu}, reset pending"
            if kind == "remap_failure":
                g.remapped[3] = 1
                return f"row remapping failed on GPU {gpu}: no spare rows left"
            if kind == "pcie_replay":
                g.pcie_replays += count
                return f"{count} PCIe replay(s) on GPU {gpu}"
            if kind == "recovery_action":  # the driver reports XID 154 when it sets a recovery action
                g.recovery_action = NVML_GPU_RECOVERY_ACTION_GPU_RESET
                self._events.append((gpu, nvmlEventTypeXidCriticalError, 154))
                self._event_cv.notify_all()
                return f"GPU {gpu} asks for a GPU reset (recovery action 1, XID 154)"
            if kind == "nvlink_error":
                g.nvlink_counts[("crc_flit", link)] = g.nvlink_counts.get(("crc_flit", link), 0) + count
                return f"{count} NVLink CRC error(s) on GPU {gpu} link {link}"
            if kind == "nvlink_down":
                ends = [g] + [p for p in [self._peer(g)] if p is not None]
                for end in ends:
                    end.nvlink_down_until[link] = now + duration
                peer = f" and GPU {ends[1].index}" if len(ends) > 1 else ""
                return f"NVLink {link} of GPU {gpu}{peer} down for {duration:g}s"
            if kind == "nvlink_replay":
                g.nvlink_replaying_until[link] = now + duration
                return f"NVLink {link} of GPU {gpu} replays {NVLINK_REPLAYS_PER_S:g}/s for {duration:g}s"
            if kind == "recover":
                g.lost = False
                g.faults.clear()
                g.recovery_action = 0
                g.nvlink_replaying_until.clear()
                for end in [g] + [p for p in [self._peer(g)] if p is not None]:
                    for down in list(end.nvlink_down_until):
                        end.nvlink_down_until[down] = now  # retrains at the next step
                return f"GPU {gpu} recovered"
            raise ValueError(
                f"unknown fault {kind!r}; choose one of xid, lost, thermal, sw_thermal, "
                "hw_slowdown, power_brake, idle_memory, straggler, ecc, row_remap, remap_failure, "
                "pcie_replay, recovery_action, nvlink_error, nvlink_down, nvlink_replay, recover"
            )

    # ---- dynamics --------------------------------------------------------------------------------
    def _advance(self) -> None:
        now = self._clock()
        dt = now - self._t
        # Dynamics have time constants of seconds: integrating more often than every 50 ms only costs CPU
        # (every NVML call lands here), so calls within 50 ms see the same state, as NVML's own sampling does.
        if dt < 0.05:
            return
        # Integrate in steps of at most 1 s so a long gap behaves like many short ones.
        steps = max(1, min(int(math.ceil(dt)), 3600))
        h = dt / steps
        for k in range(steps):
            t = self._t + (k + 1) * h
            for g in self._gpus:
                self._step(g, t, h)
        self._t = now

    def _step(self, g: _Gpu, t: float, h: float) -> None:
        p = g.profile
        for name, until in list(g.faults.items()):
            if t >= until:
                del g.faults[name]
        if t >= g.phase_until:
            if self._workload == "idle":
                g.phase = _PHASES[0]
            elif self._workload == "busy":
                g.phase = _PHASES[1]
            else:
                g.phase = g.rng.choices(_PHASES, weights=(3, 5, 3, 1))[0]
            g.phase_until = t + g.rng.uniform(60, 600)
        _, util, sm_eff, tensor, dram, mem_gib = g.phase
        if "idle_memory" in g.faults:
            util, sm_eff, mem_gib = 0.0, 0.0, max(mem_gib, 40.0)
        target_util = util * (1 + 0.03 * g.rng.gauss(0, 1)) if util else 0.0
        throttled = any(f in g.faults for f in ("thermal", "sw_thermal", "hw_slowdown", "power_brake"))
        clock_share = 0.55 if throttled else 1.0
        a = 1 - math.exp(-h / 3.0)
        g.util += a * (min(1.0, max(0.0, target_util)) - g.util)
        g.sm = g.util * sm_eff * (1 + 0.02 * g.rng.gauss(0, 1))
        if "straggler" in g.faults:  # starved of input (data loader, host CPU): half the SM activity
            g.sm *= 0.5
        g.sm = min(1.0, max(0.0, g.sm))
        target_power = (
            p.idle_watts + (p.limit_watts - p.idle_watts) * (0.35 * g.util + 0.65 * g.sm) * clock_share
        )
        target_power = min(target_power, p.limit_watts)
        g.power += (1 - math.exp(-h / 1.5)) * (target_power - g.power)
        target_temp = p.ambient_celsius + p.celsius_per_watt * g.power
        if "thermal" in g.faults:  # a failed fan or blocked airflow: heat the card towards its slowdown point
            target_temp = p.slowdown_celsius + 3
        g.temp += (1 - math.exp(-h / p.thermal_tau_s)) * (target_temp - g.temp)
        g.mem_used += (1 - math.exp(-h / 5.0)) * (mem_gib * GIB - g.mem_used)
        g.energy_mj += g.power * h * 1000.0
        # GPM counters: accumulate percent-seconds (and MiB for bandwidths) per metric, read as deltas between
        # two samples like real GPM samples.
        g.gpm_counter += h
        nvlink = p.nvlink_bytes_per_s * g.sm * tensor if g.phase[0] == "training" else 0.0
        nvlink *= self._nvlink_step(g, t, h, nvlink)
        rates = {
            GPM_GRAPHICS_UTIL: 100 * g.util,
            GPM_SM_UTIL: 100 * g.sm,
            GPM_SM_OCCUPANCY: 60 * g.sm,
            GPM_ANY_TENSOR_UTIL: 100 * g.sm * tensor,
            GPM_DRAM_BW_UTIL: 100 * g.util * dram,
            GPM_FP16_UTIL: 90 * g.sm * tensor,
            GPM_FP32_UTIL: 20 * g.sm,
            GPM_FP64_UTIL: 0.0,
            GPM_NVLINK_TX_PER_SEC: nvlink / MIB,
            GPM_NVLINK_RX_PER_SEC: nvlink / MIB,
        }
        for mid, rate in rates.items():
            g.gpm_accum[mid] = g.gpm_accum.get(mid, 0.0) + rate * h
        for m in g.mig:
            for mid, rate in rates.items():
                m.gpm_accum[mid] = m.gpm_accum.get(mid, 0.0) + rate * m.load * h
        g.nvlink_kib["tx"] += nvlink * h / 1024
        g.nvlink_kib["rx"] += nvlink * h / 1024
        # Violation counters (nanoseconds) follow the clock-event reasons that hold the clocks down.
        bits = self._reasons(g)
        for fid, mask in (
            (74, REASON_SW_POWER_CAP),
            (75, REASON_SW_THERMAL | REASON_HW_THERMAL),
            (78, REASON_GPU_IDLE),
            (269, REASON_SW_THERMAL),
            (270, REASON_HW_THERMAL),
            (271, REASON_HW_POWER_BRAKE),
        ):
            if bits & mask:
                g.violation_ns[fid] = g.violation_ns.get(fid, 0.0) + h * 1e9

    def _nvlink_step(self, g: _Gpu, t: float, h: float, carried_per_s: float) -> float:
        """Link faults over one step of ``h`` seconds; the share of the GPU's links that are up (traffic
        spreads over those)."""
        links = g.profile.nvlink_links
        for link, until in list(g.nvlink_down_until.items()):
            if t >= until:  # retrained: one recovery on this end
                del g.nvlink_down_until[link]
                g.nvlink_counts[("recovery", link)] = g.nvlink_counts.get(("recovery", link), 0) + 1
        for link, until in list(g.nvlink_replaying_until.items()):
            if t >= until:
                del g.nvlink_replaying_until[link]
            elif link not in g.nvlink_down_until:
                key = ("replay", link)
                g.nvlink_counts[key] = g.nvlink_counts.get(key, 0) + NVLINK_REPLAYS_PER_S * h
        up = links - len(g.nvlink_down_until)
        g.nvlink_ecc_due += carried_per_s * h * NVLINK_ECC_CORRECTIONS_PER_BYTE * up / links
        if g.nvlink_ecc_due >= 1 and up:
            whole = int(g.nvlink_ecc_due)
            g.nvlink_ecc_due -= whole
            link = g.rng.choice([i for i in range(links) if i not in g.nvlink_down_until])
            g.nvlink_counts[("ecc_data", link)] = g.nvlink_counts.get(("ecc_data", link), 0) + whole
        return up / links

    def _peer(self, g: _Gpu) -> _Gpu | None:
        """The GPU at the other end of ``g``'s NVLinks: its pair (0-1, 2-3, ...), if there is one."""
        other = g.index ^ 1
        return self._gpus[other] if other < len(self._gpus) else None

    def _reasons(self, g: _Gpu) -> int:
        bits = 0
        if g.util < 0.01:
            bits |= REASON_GPU_IDLE
        if g.power >= g.profile.limit_watts * 0.98:
            bits |= REASON_SW_POWER_CAP
        if "thermal" in g.faults and g.temp >= g.profile.slowdown_celsius - 1:
            bits |= REASON_HW_THERMAL | REASON_HW_SLOWDOWN
        if "sw_thermal" in g.faults:
            bits |= REASON_SW_THERMAL
        if "hw_slowdown" in g.faults:
            bits |= REASON_HW_SLOWDOWN
        if "power_brake" in g.faults:
            bits |= REASON_HW_POWER_BRAKE | REASON_HW_SLOWDOWN
        return bits

    def _gpu(self, handle: Any, *, mig_ok: bool = False) -> _Gpu:
        """The GPU of a handle; a MIG device handle is refused unless the function works on MIG devices."""
        if not self._initialised:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self._advance()
        g = self._gpus[handle.index]
        if g.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if getattr(handle, "mig", None) is not None and not mig_ok:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return g

    def _mig(self, handle: Any) -> _Mig:
        g = self._gpu(handle, mig_ok=True)
        if getattr(handle, "mig", None) is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return g.mig[handle.mig]

    # ---- the pynvml surface ----------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._initialised = True

    def nvmlShutdown(self) -> None:
        with self._event_cv:
            self._initialised = False
            self._event_cv.notify_all()

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._driver

    def nvmlDeviceGetCount(self) -> int:
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not 0 <= index < len(self._gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(index=index)

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        with self._lock:
            if getattr(h, "mig", None) is not None:
                return self._mig(h).uuid
            return self._gpu(h).uuid

    def nvmlDeviceGetName(self, h: Any) -> str:
        with self._lock:
            return self._gpu(h).profile.model

    def nvmlDeviceGetSerial(self, h: Any) -> str:
        with self._lock:
            return self._gpu(h).serial

    def nvmlDeviceGetPciInfo(self, h: Any) -> Any:
        with self._lock:
            return SimpleNamespace(busId=self._gpu(h).bus_id)

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        with self._lock:
            g = self._gpu(h)
            if g.mig:  # NVML has no whole-GPU utilization in MIG mode
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            return SimpleNamespace(gpu=round(g.util * 100), memory=round(g.util * g.phase[4] * 100))

    def nvmlDeviceGetEncoderUtilization(self, h: Any) -> list[int]:
        with self._lock:
            self._gpu(h)
            return [0, 167000]

    def nvmlDeviceGetDecoderUtilization(self, h: Any) -> list[int]:
        with self._lock:
            g = self._gpu(h)
            # inference services decode video/images on the NVDEC engines
            return [round(g.util * 20) if g.phase[0] == "inference" else 0, 167000]

    def nvmlDeviceGetMemoryInfo(self, h: Any, version: int | None = None) -> Any:
        """v1 counts driver-reserved memory as used; v2 (``version=nvmlMemory_v2``) reports it apart."""
        with self._lock:
            g = self._gpu(h, mig_ok=True)
            if getattr(h, "mig", None) is not None:
                m = g.mig[h.mig]
                total, reserved = m.memory_mb * MIB, 0
                used = int(min(total * 0.95, g.mem_used * m.load * m.slices / g.profile.mig_slices))
            else:
                total, reserved, used = g.profile.memory_bytes, g.profile.reserved_bytes, int(g.mem_used)
            if version:
                return SimpleNamespace(
                    version=version, total=total, reserved=reserved, used=used, free=total - reserved - used
                )
            return SimpleNamespace(total=total, used=used + reserved, free=total - used - reserved)

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        with self._lock:
            return round(self._gpu(h).temp)

    def nvmlDeviceGetTemperatureThreshold(self, h: Any, kind: int) -> int:
        with self._lock:
            g = self._gpu(h)
            return (
                g.profile.slowdown_celsius
                if kind == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
                else g.profile.shutdown_celsius
            )

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        with self._lock:
            return round(self._gpu(h).power * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Any) -> int:
        with self._lock:
            return round(self._gpu(h).profile.limit_watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any) -> int:
        with self._lock:
            return int(self._gpu(h).energy_mj)

    def nvmlDeviceGetClockInfo(self, h: Any, kind: int) -> int:
        with self._lock:
            g = self._gpu(h)
            if kind == NVML_CLOCK_MEM:
                return g.profile.mem_mhz
            throttled = self._reasons(g) & (REASON_HW_SLOWDOWN | REASON_SW_THERMAL | REASON_HW_THERMAL)
            if g.util < 0.01:
                return 345
            return int(g.profile.max_sm_mhz * (0.55 if throttled else 1.0))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Any) -> int:
        with self._lock:
            return self._reasons(self._gpu(h))

    def nvmlDeviceGetTotalEccErrors(self, h: Any, error_type: int, counter_type: int) -> int:
        with self._lock:
            return self._gpu(h).ecc.get((error_type, counter_type), 0)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: Any) -> int:
        with self._lock:
            g = self._gpu(h)
            return 1 if g.util < 0.01 else g.profile.pcie_generation  # the link downshifts while idle

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: Any) -> int:
        with self._lock:
            return self._gpu(h).profile.pcie_generation

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: Any) -> int:
        with self._lock:
            return self._gpu(h).profile.pcie_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: Any) -> int:
        with self._lock:
            return self._gpu(h).profile.pcie_width

    def nvmlDeviceGetPcieThroughput(self, h: Any, counter: int) -> int:
        """KB/s over NVML's 20 ms sampling window: input batches in, a little out."""
        with self._lock:
            g = self._gpu(h)
            rate = (6e9 if g.phase[0] == "dataloader_bound" else 1.5e9) * g.util
            if counter != NVML_PCIE_UTIL_TX_BYTES:
                rate *= 4
            return int(rate * (1 + 0.05 * g.rng.gauss(0, 1)) / 1024) if rate else 0

    def nvmlDeviceGetNvLinkState(self, h: Any, link: int) -> int:
        """1 while the link is active, 0 while it is down; a link past the GPU's last one is an error."""
        with self._lock:
            g = self._gpu(h)
            if not 0 <= link < g.profile.nvlink_links:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return 0 if link in g.nvlink_down_until else 1

    def nvmlDeviceGetNvLinkErrorCounter(self, h: Any, link: int, counter: int) -> int:
        with self._lock:
            g = self._gpu(h)
            if not 0 <= link < g.profile.nvlink_links or counter not in NVLINK_ERROR_COUNTERS:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            return int(g.nvlink_counts.get((NVLINK_ERROR_COUNTERS[counter], link), 0))

    def nvmlDeviceGetFieldValues(self, h: Any, ids: list) -> list[Any]:
        """Like pynvml: ``ids`` are field ids or (field id, scope id) pairs; each answer has its own return code."""
        with self._lock:
            g = self._gpu(h)
            out = []
            for want in ids:
                fid, scope = want if isinstance(want, tuple) else (want, 0)
                got = self._field_value(g, fid, scope)
                entry = SimpleNamespace(
                    fieldId=fid,
                    scopeId=scope,
                    timestamp=int(self._t * 1e6),
                    latencyUsec=0,
                    valueType=0,
                    nvmlReturn=NVML_ERROR_NOT_SUPPORTED,
                    value=SimpleNamespace(),
                )
                if got is not None:
                    vtype, number = got
                    member = {
                        NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
                        NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
                        NVML_VALUE_TYPE_SIGNED_INT: "siVal",
                    }[vtype]
                    entry.valueType, entry.nvmlReturn = vtype, 0
                    setattr(entry.value, member, int(number))
                out.append(entry)
            return out

    def _field_value(self, g: _Gpu, fid: int, scope: int) -> tuple[int, float] | None:
        ull, ui = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, NVML_VALUE_TYPE_UNSIGNED_INT
        ecc = {3: (0, 0), 4: (1, 0), 5: (0, 1), 6: (1, 1)}
        if fid in ecc:
            return ull, g.ecc.get(ecc[fid], 0)
        if fid in (29, 30, 31):  # page retirement: H100 remaps rows instead, so nothing is ever retired
            return ui, 0
        if fid in NVLINK_DL_FIELDS:  # Hopper: one counter per link, the link in scopeId
            if scope >= g.profile.nvlink_links:
                return None
            return ull, int(g.nvlink_counts.get((NVLINK_DL_FIELDS[fid], scope), 0))
        if fid in (74, 75, 76, 77, 78, 79, 269, 270, 271):
            return ull, g.violation_ns.get(fid, 0.0)
        if fid == 82:
            return ui, round(g.temp + g.profile.memory_above_core_celsius)
        if fid == 83:
            return ull, g.energy_mj
        if fid == 94:
            return ui, g.pcie_replays
        if fid == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
            return (ui, g.recovery_action) if self._driver_major >= 570 else None
        if fid in (138, 139):
            kib = g.nvlink_kib["tx" if fid == 138 else "rx"]
            return ull, kib if scope == SCOPE_ALL_LINKS else kib / g.profile.nvlink_links
        if fid in (142, 143, 144, 145):
            return ui, g.remapped[fid - 142]
        return None

    # MIG: instances were set up when the simulator was made; nothing here changes MIG settings.
    def nvmlDeviceGetMigMode(self, h: Any) -> list[int]:
        with self._lock:
            on = int(bool(self._gpu(h).mig))
            return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:
        with self._lock:
            return self._gpu(h).profile.mig_slices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, index: int) -> Any:
        with self._lock:
            g = self._gpu(h)
            if not 0 <= index < len(g.mig):
                raise NVMLError(NVML_ERROR_NOT_FOUND)
            return SimpleNamespace(index=h.index, mig=index)

    def nvmlDeviceGetGpuInstanceId(self, h: Any) -> int:
        with self._lock:
            return self._mig(h).gpu_instance

    def nvmlDeviceGetComputeInstanceId(self, h: Any) -> int:
        with self._lock:
            return self._mig(h).compute_instance

    def nvmlDeviceGetAttributes(self, h: Any) -> Any:
        with self._lock:
            m = self._mig(h)
            return SimpleNamespace(
                multiprocessorCount=16 * m.slices,
                gpuInstanceSliceCount=m.slices,
                computeInstanceSliceCount=m.slices,
                memorySizeMB=m.memory_mb,
            )

    def nvmlGpmMigSampleGet(self, h: Any, gpu_instance: int, sample: Any) -> Any:
        with self._lock:
            g = self._gpu(h)
            m = next((m for m in g.mig if m.gpu_instance == gpu_instance), None)
            if m is None:
                raise NVMLError(NVML_ERROR_NOT_FOUND)
            sample.t = g.gpm_counter
            sample.accum = dict(m.gpm_accum)
            return sample

    # Processes: one job process per busy GPU (per MIG instance in MIG mode).
    def nvmlDeviceGetComputeRunningProcesses(self, h: Any) -> list[Any]:
        with self._lock:
            g = self._gpu(h)
            if g.mem_used < GIB:
                return []
            if g.mig:
                return [
                    SimpleNamespace(
                        pid=g.pid + 1 + m.slot,
                        gpuInstanceId=m.gpu_instance,
                        computeInstanceId=m.compute_instance,
                        usedGpuMemory=int(g.mem_used * m.load * m.slices / g.profile.mig_slices),
                    )
                    for m in g.mig
                ]
            return [
                SimpleNamespace(
                    pid=g.pid,
                    usedGpuMemory=int(g.mem_used),
                    gpuInstanceId=0xFFFFFFFF,
                    computeInstanceId=0xFFFFFFFF,
                )
            ]

    def nvmlDeviceGetProcessUtilization(self, h: Any, last_seen_us: int) -> list[Any]:
        with self._lock:
            g = self._gpu(h)
            now_us = int(self._t * 1e6)
            if g.mem_used < GIB or now_us <= last_seen_us:
                raise NVMLError(NVML_ERROR_NOT_FOUND)  # no samples newer than last_seen_us
            return [
                SimpleNamespace(
                    pid=g.pid,
                    timeStamp=now_us,
                    smUtil=round(g.util * 100),
                    memUtil=round(g.util * g.phase[4] * 100),
                    encUtil=0,
                    decUtil=0,
                )
            ]

    # GPM: samples snapshot cumulative activity; metrics are the activity share between two samples.
    def nvmlGpmQueryDeviceSupport(self, h: Any) -> Any:
        with self._lock:
            self._gpu(h)
            return SimpleNamespace(isSupportedDevice=1)

    def nvmlGpmSampleAlloc(self) -> Any:
        return SimpleNamespace(t=0.0, accum={})

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        return None

    def nvmlGpmSampleGet(self, h: Any, sample: Any) -> Any:
        with self._lock:
            g = self._gpu(h)
            if g.mig:  # whole-GPU GPM samples are not available in MIG mode; per instance they are
                raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
            sample.t = g.gpm_counter
            sample.accum = dict(g.gpm_accum)
            return sample

    def c_nvmlGpmMetricsGet_t(self) -> Any:
        return SimpleNamespace(
            version=0,
            numMetrics=0,
            sample1=None,
            sample2=None,
            metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)],
        )

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        s1, s2 = mg.sample1, mg.sample2
        span = s2.t - s1.t
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            if span <= 0 or m.metricId not in s2.accum:
                m.nvmlReturn, m.value = NVML_ERROR_NOT_SUPPORTED, 0.0
            else:
                m.nvmlReturn = 0
                m.value = (s2.accum[m.metricId] - s1.accum.get(m.metricId, 0.0)) / span
        return mg

    # Events: XIDs and ECC errors arrive on an event set, as from the driver.
    def nvmlEventSetCreate(self) -> Any:
        return SimpleNamespace(handles=set())

    def nvmlDeviceRegisterEvents(self, h: Any, mask: int, event_set: Any) -> None:
        with self._lock:
            self._gpu(h)
            event_set.handles.add(h.index)

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        deadline = time.monotonic() + timeout_ms / 1000.0
        with self._event_cv:
            while True:
                for i, (gpu, etype, data) in enumerate(self._events):
                    if gpu in event_set.handles:
                        del self._events[i]
                        return SimpleNamespace(
                            device=SimpleNamespace(index=gpu),
                            eventType=etype,
                            eventData=data,
                            gpuInstanceId=0xFFFFFFFF,
                            computeInstanceId=0xFFFFFFFF,
                        )
                if not self._initialised:
                    raise NVMLError(NVML_ERROR_UNINITIALIZED)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NVMLError(NVML_ERROR_TIMEOUT)
                self._event_cv.wait(left)

    def nvmlEventSetFree(self, event_set: Any) -> None:
        return None

    # Summary of the simulated cards for people and tests.
    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            self._advance()
            return [
                {
                    "gpu": g.index,
                    "uuid": g.uuid,
                    "phase": g.phase[0],
                    "lost": g.lost,
                    "faults": sorted(g.faults),
                    "nvlinks_down": sorted(g.nvlink_down_until),
                    "pid": g.pid,
                    "mig": [
                        {"uuid": m.uuid, "gpu_instance": m.gpu_instance, "slices": m.slices} for m in g.mig
                    ],
                }
                for g in self._gpus
            ]

    @staticmethod
    def handle_key(handle: Any) -> Hashable:
        """Identity of a device handle, as the gateway compares event-data devices with handles."""
        mig = getattr(handle, "mig", None)
        return handle.index if mig is None else (handle.index, mig)
