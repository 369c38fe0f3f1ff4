"""The GPU field table: one row per metric, read through the NVML gateway.

Adding a metric is adding a row. ``read`` gets ``q(function, *args)``, an NVML
call already bound to one GPU's handle that answers ``None`` for "no value",
and returns a number, ``None``, or ``{label values: number}`` for fields with
extra labels. Tests loop over every row against the simulator and fake NVML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# nvml.h constants (stable ABI numbers).
TEMPERATURE_GPU = 0
THRESHOLD_SHUTDOWN, THRESHOLD_SLOWDOWN = 0, 1
CLOCK_SM, CLOCK_MEM = 1, 2
ECC_CORRECTED, ECC_UNCORRECTED = 0, 1
ECC_VOLATILE, ECC_AGGREGATE = 0, 1

# nvmlClocksEventReason* bits -> the `reason` label.
CLOCK_EVENT_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
    "display_clocks": 0x100,
}

Reader = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: str  # "gauge" | "counter"
    help: str
    read: Callable[[Reader], Any]
    labels: tuple[str, ...] = ()
    # dcgm-exporter compatible name and the factor from our base unit to its unit.
    dcgm: str | None = None
    dcgm_scale: float = 1.0
    # A change in this field is pushed to the collector at once, not at the next batch.
    urgent: bool = False


def _attr(obj: Any, name: str, scale: float = 1.0) -> float | None:
    return None if obj is None else getattr(obj, name) * scale


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else value * scale


def _clock_events(q: Reader) -> dict[tuple[str, ...], float] | None:
    bits = q("nvmlDeviceGetCurrentClocksEventReasons")
    if bits is None:
        return None
    return {(reason,): float(bool(bits & mask)) for reason, mask in CLOCK_EVENT_REASONS.items()}


def _ecc(q: Reader) -> dict[tuple[str, ...], float] | None:
    out = {}
    for type_name, etype in (("corrected", ECC_CORRECTED), ("uncorrected", ECC_UNCORRECTED)):
        for scope, ctype in (("volatile", ECC_VOLATILE), ("aggregate", ECC_AGGREGATE)):
            v = q("nvmlDeviceGetTotalEccErrors", etype, ctype)
            if v is not None:
                out[(type_name, scope)] = float(v)
    return out or None


MIB = 1 << 20

FIELDS: tuple[Field, ...] = (
    Field("gpufleet_gpu_utilization_ratio", "gauge",
          "Share of the last sample period in which a kernel was running on the GPU (NVML utilization.gpu).",
          lambda q: _attr(q("nvmlDeviceGetUtilizationRates"), "gpu", 0.01), dcgm="DCGM_FI_DEV_GPU_UTIL", dcgm_scale=100),
    Field("gpufleet_gpu_memory_bandwidth_utilization_ratio", "gauge",
          "Share of the last sample period in which device memory was being read or written (NVML utilization.memory).",
          lambda q: _attr(q("nvmlDeviceGetUtilizationRates"), "memory", 0.01), dcgm="DCGM_FI_DEV_MEM_COPY_UTIL",
          dcgm_scale=100),
    Field("gpufleet_gpu_memory_used_bytes", "gauge", "Framebuffer memory in use, in bytes.",
          lambda q: _attr(q("nvmlDeviceGetMemoryInfo"), "used"), dcgm="DCGM_FI_DEV_FB_USED", dcgm_scale=1 / MIB),
    Field("gpufleet_gpu_memory_free_bytes", "gauge", "Framebuffer memory free, in bytes.",
          lambda q: _attr(q("nvmlDeviceGetMemoryInfo"), "free"), dcgm="DCGM_FI_DEV_FB_FREE", dcgm_scale=1 / MIB),
    Field("gpufleet_gpu_memory_total_bytes", "gauge", "Framebuffer memory in total, in bytes.",
          lambda q: _attr(q("nvmlDeviceGetMemoryInfo"), "total"), dcgm="DCGM_FI_DEV_FB_TOTAL", dcgm_scale=1 / MIB),
    Field("gpufleet_gpu_temperature_celsius", "gauge", "GPU core temperature in degrees Celsius.",
          lambda q: q("nvmlDeviceGetTemperature", TEMPERATURE_GPU), dcgm="DCGM_FI_DEV_GPU_TEMP"),
    Field("gpufleet_gpu_slowdown_temperature_celsius", "gauge",
          "Temperature at which the GPU slows its clocks to cool down (its own threshold).",
          lambda q: q("nvmlDeviceGetTemperatureThreshold", THRESHOLD_SLOWDOWN), dcgm="DCGM_FI_DEV_SLOWDOWN_TEMP"),
    Field("gpufleet_gpu_shutdown_temperature_celsius", "gauge", "Temperature at which the GPU shuts down.",
          lambda q: q("nvmlDeviceGetTemperatureThreshold", THRESHOLD_SHUTDOWN), dcgm="DCGM_FI_DEV_SHUTDOWN_TEMP"),
    Field("gpufleet_gpu_power_watts", "gauge", "Power draw in watts.",
          lambda q: _scaled(q("nvmlDeviceGetPowerUsage"), 1e-3), dcgm="DCGM_FI_DEV_POWER_USAGE"),
    Field("gpufleet_gpu_power_limit_watts", "gauge", "Power limit the driver enforces, in watts.",
          lambda q: _scaled(q("nvmlDeviceGetEnforcedPowerLimit"), 1e-3), dcgm="DCGM_FI_DEV_ENFORCED_POWER_LIMIT"),
    Field("gpufleet_gpu_energy_joules_total", "counter", "Energy used since the driver loaded, in joules.",
          lambda q: _scaled(q("nvmlDeviceGetTotalEnergyConsumption"), 1e-3),
          dcgm="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", dcgm_scale=1e3),
    Field("gpufleet_gpu_sm_clock_hertz", "gauge", "SM clock in hertz.",
          lambda q: _scaled(q("nvmlDeviceGetClockInfo", CLOCK_SM), 1e6), dcgm="DCGM_FI_DEV_SM_CLOCK", dcgm_scale=1e-6),
    Field("gpufleet_gpu_memory_clock_hertz", "gauge", "Memory clock in hertz.",
          lambda q: _scaled(q("nvmlDeviceGetClockInfo", CLOCK_MEM), 1e6), dcgm="DCGM_FI_DEV_MEM_CLOCK", dcgm_scale=1e-6),
    Field("gpufleet_gpu_clock_event_active", "gauge",
          "1 while the clock-event (throttle) reason is active, else 0.",
          _clock_events, labels=("reason",), urgent=True),
    Field("gpufleet_gpu_ecc_errors_total", "counter", "ECC memory errors by type (corrected/uncorrected) and scope.",
          _ecc, labels=("type", "scope"), urgent=True),
)

# GPM (Hopper and newer) profiling metrics: computed from two GPM samples, no DCGM needed.
# (name, NVML_GPM_METRIC_* id, help, dcgm name)
GPM_FIELDS: tuple[tuple[str, int, str, str], ...] = (
    ("gpufleet_gpu_sm_active_ratio", 2, "Share of SM cycles with at least one warp resident (GPM SM_UTIL).",
     "DCGM_FI_PROF_SM_ACTIVE"),
    ("gpufleet_gpu_sm_occupancy_ratio", 3, "Resident warps as a share of the SMs' maximum (GPM SM_OCCUPANCY).",
     "DCGM_FI_PROF_SM_OCCUPANCY"),
    ("gpufleet_gpu_tensor_active_ratio", 5, "Share of cycles any tensor pipe was active (GPM ANY_TENSOR_UTIL).",
     "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"),
    ("gpufleet_gpu_dram_active_ratio", 10, "Share of cycles the memory interface was active (GPM DRAM_BW_UTIL).",
     "DCGM_FI_PROF_DRAM_ACTIVE"),
    ("gpufleet_gpu_fp64_active_ratio", 11, "Share of cycles the FP64 pipe was active (GPM FP64_UTIL).",
     "DCGM_FI_PROF_PIPE_FP64_ACTIVE"),
    ("gpufleet_gpu_fp32_active_ratio", 12, "Share of cycles the FP32 pipe was active (GPM FP32_UTIL).",
     "DCGM_FI_PROF_PIPE_FP32_ACTIVE"),
    ("gpufleet_gpu_fp16_active_ratio", 13, "Share of cycles the FP16 pipe was active (GPM FP16_UTIL).",
     "DCGM_FI_PROF_PIPE_FP16_ACTIVE"),
)
