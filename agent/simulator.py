"""Simulated NVIDIA GPUs behind the same NVML surface as ``pynvml``.

``SimulatedNVML`` offers the pynvml functions the agent calls, with the same
argument shapes, units (mW, mJ, MHz, bytes, percent) and error codes, so the
agent's NVML gateway, field table and sources run the same code path on a
laptop and in CI as on a GPU node. GPUs follow believable, load-driven
dynamics: jobs come and go, power follows SM activity, temperature follows
power with a thermal time constant, memory is held by jobs. Faults can be
injected: XIDs, thermal slowdown, power brake, ECC errors, a GPU falling off
the bus, a job that holds memory but does nothing.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

SIMULATED = True

# Error codes and constants, as nvml.h defines them.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
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

REASON_GPU_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80

GPM_SM_UTIL, GPM_SM_OCCUPANCY, GPM_ANY_TENSOR_UTIL, GPM_DRAM_BW_UTIL = 2, 3, 5, 10
GPM_FP64_UTIL, GPM_FP32_UTIL, GPM_FP16_UTIL = 11, 12, 13

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


class SimulatedNVML:
    """A pynvml-shaped object simulating ``count`` GPUs. ``clock`` gives seconds (injectable for tests)."""

    SIMULATED = True
    NVMLError = NVMLError

    def __init__(self, count: int = 2, *, clock: Callable[[], float] = time.time, seed: int | None = None,
                 profile: _Profile | None = None, workload: str = "mixed", driver: str = "555.42.06") -> None:
        self._clock = clock
        self._profile = profile or _Profile()
        rng = random.Random(seed)
        self._workload = workload
        self._driver = driver
        self._lock = threading.RLock()
        self._events: deque[tuple[int, int, int]] = deque()
        self._event_cv = threading.Condition(self._lock)
        self._t = clock()
        self._gpus = []
        for i in range(count):
            uid = "GPU-" + "-".join(f"{rng.getrandbits(b):0{b // 4}x}" for b in (32, 16, 16, 16, 48))
            self._gpus.append(_Gpu(i, uid, f"165{rng.randrange(10**9, 10**10)}", f"00000000:{0x18 + i * 0x10:02X}:00.0",
                                   self._profile, random.Random(rng.random())))
        self._initialised = False

    # ---- fault injection -------------------------------------------------------------------------
    def inject(self, gpu: int, kind: str, *, xid: int | None = None, duration: float = 120.0, count: int = 1) -> str:
        """Inject a fault into simulated GPU ``gpu``. Returns a sentence saying what was done."""
        with self._lock:
            self._advance()
            if not 0 <= gpu < len(self._gpus):
                raise ValueError(f"no simulated GPU {gpu}; there are {len(self._gpus)} (0..{len(self._gpus) - 1})")
            g = self._gpus[gpu]
            now = self._t
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
            if kind in ("thermal", "power_brake", "idle_memory", "sw_thermal", "hw_slowdown"):
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
            if kind == "recover":
                g.lost = False
                g.faults.clear()
                return f"GPU {gpu} recovered"
            raise ValueError(f"unknown fault {kind!r}; choose one of xid, lost, thermal, sw_thermal, "
                             "hw_slowdown, power_brake, idle_memory, ecc, recover")

    # ---- dynamics --------------------------------------------------------------------------------
    def _advance(self) -> None:
        now = self._clock()
        dt = now - self._t
        if dt <= 0:
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
        g.sm = min(1.0, max(0.0, g.sm))
        target_power = p.idle_watts + (p.limit_watts - p.idle_watts) * (0.35 * g.util + 0.65 * g.sm) * clock_share
        target_power = min(target_power, p.limit_watts)
        g.power += (1 - math.exp(-h / 1.5)) * (target_power - g.power)
        target_temp = p.ambient_celsius + p.celsius_per_watt * g.power
        if "thermal" in g.faults:  # a failed fan or blocked airflow: heat the card towards its slowdown point
            target_temp = p.slowdown_celsius + 3
        g.temp += (1 - math.exp(-h / p.thermal_tau_s)) * (target_temp - g.temp)
        g.mem_used += (1 - math.exp(-h / 5.0)) * (mem_gib * GIB - g.mem_used)
        g.energy_mj += g.power * h * 1000.0
        # GPM counters: accumulate activity-seconds per metric, read as deltas like real GPM samples.
        g.gpm_counter += h
        for mid, share in ((GPM_SM_UTIL, g.sm), (GPM_SM_OCCUPANCY, g.sm * 0.6), (GPM_ANY_TENSOR_UTIL, g.sm * tensor),
                           (GPM_DRAM_BW_UTIL, g.util * dram), (GPM_FP16_UTIL, g.sm * tensor * 0.9),
                           (GPM_FP32_UTIL, g.sm * 0.2), (GPM_FP64_UTIL, 0.0)):
            g.gpm_accum[mid] = g.gpm_accum.get(mid, 0.0) + share * h

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

    def _gpu(self, handle: Any) -> _Gpu:
        if not self._initialised:
            raise NVMLError(1)
        self._advance()
        g = self._gpus[handle.index]
        if g.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return g

    # ---- the pynvml surface ----------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._initialised = True

    def nvmlShutdown(self) -> None:
        self._initialised = False

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
            return SimpleNamespace(gpu=round(g.util * 100), memory=round(g.util * g.phase[4] * 100))

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        with self._lock:
            g = self._gpu(h)
            total = g.profile.memory_bytes
            used = int(g.mem_used) + g.profile.reserved_bytes
            return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        with self._lock:
            return round(self._gpu(h).temp)

    def nvmlDeviceGetTemperatureThreshold(self, h: Any, kind: int) -> int:
        with self._lock:
            g = self._gpu(h)
            return g.profile.slowdown_celsius if kind == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN else g.profile.shutdown_celsius

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
            sample.t = g.gpm_counter
            sample.accum = dict(g.gpm_accum)
            return sample

    def c_nvmlGpmMetricsGet_t(self) -> Any:
        return SimpleNamespace(version=0, numMetrics=0, sample1=None, sample2=None,
                               metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)])

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        s1, s2 = mg.sample1, mg.sample2
        span = s2.t - s1.t
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            if span <= 0 or m.metricId not in s2.accum:
                m.nvmlReturn, m.value = NVML_ERROR_NOT_SUPPORTED, 0.0
            else:
                m.nvmlReturn = 0
                m.value = 100.0 * (s2.accum[m.metricId] - s1.accum.get(m.metricId, 0.0)) / span
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
                        return SimpleNamespace(device=SimpleNamespace(index=gpu), eventType=etype, eventData=data,
                                               gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
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
            return [{"gpu": g.index, "uuid": g.uuid, "phase": g.phase[0], "lost": g.lost,
                     "faults": sorted(g.faults)} for g in self._gpus]

    @staticmethod
    def handle_key(handle: Any) -> int:
        """Identity of a device handle, as the gateway compares event-data devices with handles."""
        return handle.index
