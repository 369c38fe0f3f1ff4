"""The GPU field table: one row per metric, read through the NVML gateway.

Adding a metric is adding a row. A row says *what* to read, not how: ``Call``
(an NVML function on the GPU's handle, then an attribute, list item or bit of
its answer) or ``FieldValue`` (an NVML field id, read together with every other
field id of the sample in one batched ``nvmlDeviceGetFieldValues`` call).
Rows with extra labels map each label-value tuple to its own source. The GPU
source reads the table, docs/metrics.md documents it, and tests loop over
every row against the simulator, a scripted fake NVML and the real pynvml
bindings (every function name and field id must exist there).

Where NVML moved a value between GPU generations (NVLink error counters: per-GPU totals until Ampere, one
field per link scoped by ``scopeId`` on Hopper), a row names every place with ``FirstOf``: the first that
answers on a GPU is learned from its first reads and kept, and a read a GPU answers "not supported" is never
asked again. ``SumOf`` adds per-link reads up to a per-GPU value, ``CountOf`` counts the reads a GPU answers
(the links it has).

``slow`` rows are calls that cost milliseconds (energy counter ~3 ms, PCIe
throughput ~20 ms because NVML samples the bus) or values that never change;
they are read by a background reader every ``slow_interval`` seconds and
served from its cache, so one sample of all GPUs stays cheap. ``costly`` slow rows (half a millisecond or more
of the driver's CPU a read on an H100: the energy counter, the clock-event violation counters, PCIe
throughput) are read every ``COSTLY_EVERY``-th time: on an 8-GPU node at the defaults they were a quarter
of the agent's CPU time (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from gpufleet.core.metricspec import ALWAYS

# nvml.h constants (stable ABI numbers).
TEMPERATURE_GPU = 0
THRESHOLD_SHUTDOWN, THRESHOLD_SLOWDOWN = 0, 1
CLOCK_SM, CLOCK_MEM = 1, 2
PCIE_UTIL_TX_BYTES, PCIE_UTIL_RX_BYTES = 0, 1
MEMORY_V2 = 0x02000028  # nvmlMemory_v2: sizeof(nvmlMemory_v2_t) | 2 << 24; adds `reserved`
SCOPE_ALL_LINKS = 0xFFFFFFFF  # scopeId meaning "summed over every NVLink"

# nvmlFieldValue ids (nvml.h NVML_FI_DEV_*), stable ABI numbers.
FI_ECC_SBE_VOL_TOTAL, FI_ECC_DBE_VOL_TOTAL, FI_ECC_SBE_AGG_TOTAL, FI_ECC_DBE_AGG_TOTAL = 3, 4, 5, 6
FI_RETIRED_SBE, FI_RETIRED_DBE, FI_RETIRED_PENDING = 29, 30, 31
FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL = 38
FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 45
FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL = 52
FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 59
FI_PERF_POLICY_POWER, FI_PERF_POLICY_THERMAL, FI_PERF_POLICY_SYNC_BOOST = 74, 75, 76
FI_PERF_POLICY_BOARD_LIMIT, FI_PERF_POLICY_LOW_UTILIZATION, FI_PERF_POLICY_RELIABILITY = 77, 78, 79
FI_MEMORY_TEMP = 82
FI_TOTAL_ENERGY_CONSUMPTION = 83
FI_PCIE_REPLAY_COUNTER = 94
FI_NVLINK_THROUGHPUT_DATA_TX, FI_NVLINK_THROUGHPUT_DATA_RX = 138, 139
FI_REMAPPED_COR, FI_REMAPPED_UNC, FI_REMAPPED_PENDING, FI_REMAPPED_FAILURE = 142, 143, 144, 145
FI_NVLINK_ECC_DATA_ERROR_COUNT_TOTAL = 160
# Hopper and newer: one counter per link, the link in scopeId; they replace the per-link fields below (driver
# R525 release notes). Blackwell drops them again for NVML_FI_DEV_NVLINK_COUNT_* (not read here).
FI_NVLINK_ERROR_DL_REPLAY, FI_NVLINK_ERROR_DL_RECOVERY, FI_NVLINK_ERROR_DL_CRC = 161, 162, 163
FI_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN = 269
FI_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN = 270
FI_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN = 271
FI_GET_GPU_RECOVERY_ACTION = 230  # driver R570 and newer; older drivers answer NOT_SUPPORTED

# NVLink. Links an NVLink 4 or 5 GPU has at most (H100, H200, B200: 18; nvml.h's NVML_NVLINK_MAX_LINKS is a
# larger array bound). Before Hopper, NVML had one field id per link and counter, links 0 to 11 (nvml.h
# NVML_FI_DEV_NVLINK_<COUNTER>_ERROR_COUNT_L<n>; ids 32-37 then 96-101 for CRC flit errors, and so on).
NVLINK_MAX_LINKS = 18
NVLINK_TYPES = ("crc_flit", "crc_data", "replay", "recovery", "ecc_data")
NVLINK_LEGACY_LINK_FIELDS: dict[str, tuple[int, ...]] = {
    "crc_flit": (*range(32, 38), *range(96, 102)),
    "crc_data": (*range(39, 45), *range(102, 108)),
    "replay": (*range(46, 52), *range(108, 114)),
    "recovery": (*range(53, 59), *range(114, 120)),
    "ecc_data": tuple(range(148, 160)),
}
NVLINK_TOTAL_FIELDS = {
    "crc_flit": FI_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    "crc_data": FI_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL,
    "replay": FI_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    "recovery": FI_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
    "ecc_data": FI_NVLINK_ECC_DATA_ERROR_COUNT_TOTAL,
}
# The DL CRC counter of Hopper is the one NVIDIA names as the CRC flit counters' replacement.
NVLINK_DL_FIELDS = {
    "crc_flit": FI_NVLINK_ERROR_DL_CRC,
    "replay": FI_NVLINK_ERROR_DL_REPLAY,
    "recovery": FI_NVLINK_ERROR_DL_RECOVERY,
}
# nvmlNvLinkErrorCounter_t of nvmlDeviceGetNvLinkErrorCounter(device, link, counter) (Pascal to Hopper).
NVLINK_ERROR_COUNTERS = {"replay": 0, "recovery": 1, "crc_flit": 2, "crc_data": 3, "ecc_data": 4}

# nvmlDeviceGpuRecoveryAction_t values of FI_GET_GPU_RECOVERY_ACTION.
RECOVERY_ACTIONS = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
}

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

# Cumulative time clocks were held down, per reason (nanoseconds in NVML).
VIOLATION_FIELDS = {
    "sw_power_cap": FI_PERF_POLICY_POWER,
    "thermal": FI_PERF_POLICY_THERMAL,
    "sync_boost": FI_PERF_POLICY_SYNC_BOOST,
    "board_limit": FI_PERF_POLICY_BOARD_LIMIT,
    "low_utilization": FI_PERF_POLICY_LOW_UTILIZATION,
    "reliability": FI_PERF_POLICY_RELIABILITY,
    "sw_thermal": FI_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN,
    "hw_thermal": FI_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN,
    "hw_power_brake": FI_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN,
}


@dataclass(frozen=True, slots=True)
class Call:
    """``fn(handle, *args)``, then ``.attr``, ``[item]`` or ``bool(answer & mask)`` of the answer."""

    fn: str
    args: tuple[Any, ...] = ()
    attr: str | None = None
    item: int | None = None
    mask: int | None = None

    def describe(self) -> str:
        args = "".join(f", {a:#x}" if isinstance(a, int) and a > 0xFFFF else f", {a}" for a in self.args)
        pick = (
            f".{self.attr}"
            if self.attr
            else f"[{self.item}]"
            if self.item is not None
            else f" & {self.mask:#x}"
            if self.mask is not None
            else ""
        )
        return f"`{self.fn}(h{args}){pick}`"


@dataclass(frozen=True, slots=True)
class FieldValue:
    """One value of the batched ``nvmlDeviceGetFieldValues`` call."""

    id: int
    scope: int = 0

    def describe(self) -> str:
        scope = (
            ""
            if not self.scope
            else " (all links)"
            if self.scope == SCOPE_ALL_LINKS
            else f" scope {self.scope}"
        )
        return f"field {self.id}{scope}"


Read = Call | FieldValue  # one NVML read


@dataclass(frozen=True, slots=True, eq=False)  # identity: table entries, kept in learned-answer maps
class FirstOf:
    """The first of ``options`` that a GPU answers. Which one is learned from the GPU's first reads and kept;
    until an option is known not to answer, the ones after it are not taken (a failed read is not a "no")."""

    options: tuple[Source, ...]

    def describe(self) -> str:
        return " or ".join(o.describe() for o in self.options)


@dataclass(frozen=True, slots=True, eq=False)  # identity: table entries, kept in learned-answer maps
class SumOf:
    """The sum of the ``parts`` a GPU answers (one counter per link, summed per GPU); absent when none does.
    With ``hold``, a part that answered once and then fails a read keeps its last value in the sum, so a sum of
    counters never goes backwards (which a rate would take for a counter reset)."""

    parts: tuple[Source, ...]
    hold: bool = True

    def describe(self) -> str:
        return f"sum of {_span(self.parts)}"


@dataclass(frozen=True, slots=True, eq=False)  # identity: table entries, kept in learned-answer maps
class CountOf:
    """How many of ``parts`` a GPU has answered (the NVLinks it has); absent when none has."""

    parts: tuple[Read, ...]

    def describe(self) -> str:
        return f"count of answering {_span(self.parts)}"


def _span(parts: tuple[Source, ...]) -> str:
    if len(parts) < 3:
        return ", ".join(p.describe() for p in parts)
    return f"{parts[0].describe()} … {parts[-1].describe()} ({len(parts)} reads)"


Source = Read | FirstOf | SumOf | CountOf


def reads(src: Source) -> list[Read]:
    """Every NVML read a source may make."""
    if isinstance(src, (Call, FieldValue)):
        return [src]
    inner = src.options if isinstance(src, FirstOf) else src.parts
    return [r for s in inner for r in reads(s)]


@dataclass(frozen=True, slots=True, eq=False)  # identity: rows are unique table entries
class Field:
    name: str
    kind: str  # "gauge" | "counter"
    unit: str
    help: str
    read: Source | dict[tuple[str, ...], Source]
    labels: tuple[str, ...] = ()
    scale: float = 1.0  # NVML unit -> our base unit
    # dcgm-exporter's name (one, or one per label-value tuple), its type, and the factor from our unit to its unit.
    dcgm: str | dict[tuple[str, ...], str] | None = None
    dcgm_kind: str = "gauge"
    dcgm_scale: float = 1.0
    # A change in this field is pushed to the collector at once, not at the next batch.
    urgent: bool = False
    # Read off the hot path by the background reader (costly or static values).
    slow: bool = False
    # A slow row read only every COSTLY_EVERY-th slow refresh (a counter or a 20 ms snapshot: a slower
    # cadence loses resolution, not events).
    costly: bool = False
    # Also read on every MIG device of a GPU in MIG mode (as gpufleet_mig_*).
    mig: bool = False
    # One series per NVLink (and type): read only with --nvlink-per-link (series multiply by the links).
    per_link: bool = False
    # When the series exists, for the metric catalogue.
    when: str = ALWAYS

    def sources(self) -> list[Read]:
        """Every NVML read the row may make."""
        tops = list(self.read.values()) if isinstance(self.read, dict) else [self.read]
        return [r for s in tops for r in reads(s)]


MIB = 1 << 20
KIB = 1 << 10


def _link_errors(kind: str, link: int) -> Source:
    """Where a GPU keeps one link's counter of ``kind``, newest place first: the link-scoped field (Hopper),
    the link's own field id (Ampere and older, links 0-11), nvmlDeviceGetNvLinkErrorCounter."""
    options: list[Source] = []
    if kind in NVLINK_DL_FIELDS:
        options.append(FieldValue(NVLINK_DL_FIELDS[kind], link))
    legacy = NVLINK_LEGACY_LINK_FIELDS[kind]
    if link < len(legacy):
        options.append(FieldValue(legacy[link]))
    options.append(Call("nvmlDeviceGetNvLinkErrorCounter", (link, NVLINK_ERROR_COUNTERS[kind])))
    return FirstOf(tuple(options))


def _gpu_errors(kind: str) -> Source:
    """A GPU's counter of ``kind`` over all its links: NVML's total, else the sum of its links' counters."""
    links = tuple(_link_errors(kind, link) for link in range(NVLINK_MAX_LINKS))
    return FirstOf((FieldValue(NVLINK_TOTAL_FIELDS[kind]), SumOf(links)))


# nvmlDeviceGetNvLinkState(device, link): 1 active, 0 inactive; a link the GPU lacks answers an error.
_LINK_STATE = tuple(Call("nvmlDeviceGetNvLinkState", (link,)) for link in range(NVLINK_MAX_LINKS))


FIELDS: tuple[Field, ...] = (
    # ---- utilization ------------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_utilization_ratio",
        "gauge",
        "ratio",
        "Share of the last sample period in which a kernel was running on the GPU (NVML utilization.gpu).",
        Call("nvmlDeviceGetUtilizationRates", attr="gpu"),
        scale=0.01,
        dcgm="DCGM_FI_DEV_GPU_UTIL",
        dcgm_scale=100,
    ),
    Field(
        "gpufleet_gpu_memory_bandwidth_utilization_ratio",
        "gauge",
        "ratio",
        "Share of the last sample period in which device memory was being read or written (NVML utilization.memory).",
        Call("nvmlDeviceGetUtilizationRates", attr="memory"),
        scale=0.01,
        dcgm="DCGM_FI_DEV_MEM_COPY_UTIL",
        dcgm_scale=100,
    ),
    Field(
        "gpufleet_gpu_encoder_utilization_ratio",
        "gauge",
        "ratio",
        "Share of the last sample period the video encoder was busy.",
        Call("nvmlDeviceGetEncoderUtilization", item=0),
        scale=0.01,
        dcgm="DCGM_FI_DEV_ENC_UTIL",
        dcgm_scale=100,
    ),
    Field(
        "gpufleet_gpu_decoder_utilization_ratio",
        "gauge",
        "ratio",
        "Share of the last sample period the video decoder was busy.",
        Call("nvmlDeviceGetDecoderUtilization", item=0),
        scale=0.01,
        dcgm="DCGM_FI_DEV_DEC_UTIL",
        dcgm_scale=100,
    ),
    # ---- framebuffer ------------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_memory_used_bytes",
        "gauge",
        "bytes",
        "Framebuffer memory allocated by processes, in bytes (driver-reserved memory not included).",
        Call("nvmlDeviceGetMemoryInfo", (MEMORY_V2,), attr="used"),
        mig=True,
        dcgm="DCGM_FI_DEV_FB_USED",
        dcgm_scale=1 / MIB,
    ),
    Field(
        "gpufleet_gpu_memory_free_bytes",
        "gauge",
        "bytes",
        "Framebuffer memory free, in bytes.",
        Call("nvmlDeviceGetMemoryInfo", (MEMORY_V2,), attr="free"),
        mig=True,
        dcgm="DCGM_FI_DEV_FB_FREE",
        dcgm_scale=1 / MIB,
    ),
    Field(
        "gpufleet_gpu_memory_total_bytes",
        "gauge",
        "bytes",
        "Framebuffer memory in total, in bytes.",
        Call("nvmlDeviceGetMemoryInfo", (MEMORY_V2,), attr="total"),
        mig=True,
        dcgm="DCGM_FI_DEV_FB_TOTAL",
        dcgm_scale=1 / MIB,
    ),
    Field(
        "gpufleet_gpu_memory_reserved_bytes",
        "gauge",
        "bytes",
        "Framebuffer memory reserved by the driver and firmware, in bytes.",
        Call("nvmlDeviceGetMemoryInfo", (MEMORY_V2,), attr="reserved"),
        mig=True,
        dcgm="DCGM_FI_DEV_FB_RESERVED",
        dcgm_scale=1 / MIB,
    ),
    # ---- temperature ------------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_temperature_celsius",
        "gauge",
        "celsius",
        "GPU core temperature in degrees Celsius.",
        Call("nvmlDeviceGetTemperature", (TEMPERATURE_GPU,)),
        dcgm="DCGM_FI_DEV_GPU_TEMP",
    ),
    Field(
        "gpufleet_gpu_memory_temperature_celsius",
        "gauge",
        "celsius",
        "GPU memory (HBM) temperature in degrees Celsius.",
        FieldValue(FI_MEMORY_TEMP),
        dcgm="DCGM_FI_DEV_MEMORY_TEMP",
    ),
    Field(
        "gpufleet_gpu_slowdown_temperature_celsius",
        "gauge",
        "celsius",
        "Temperature at which the GPU slows its clocks to cool down (its own threshold).",
        Call("nvmlDeviceGetTemperatureThreshold", (THRESHOLD_SLOWDOWN,)),
        slow=True,
        dcgm="DCGM_FI_DEV_SLOWDOWN_TEMP",
    ),
    Field(
        "gpufleet_gpu_shutdown_temperature_celsius",
        "gauge",
        "celsius",
        "Temperature at which the GPU shuts down.",
        Call("nvmlDeviceGetTemperatureThreshold", (THRESHOLD_SHUTDOWN,)),
        slow=True,
        dcgm="DCGM_FI_DEV_SHUTDOWN_TEMP",
    ),
    # ---- power ------------------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_power_watts",
        "gauge",
        "watts",
        "Power draw in watts.",
        Call("nvmlDeviceGetPowerUsage"),
        scale=1e-3,
        dcgm="DCGM_FI_DEV_POWER_USAGE",
    ),
    Field(
        "gpufleet_gpu_power_limit_watts",
        "gauge",
        "watts",
        "Power limit the driver enforces, in watts.",
        Call("nvmlDeviceGetEnforcedPowerLimit"),
        scale=1e-3,
        slow=True,
        dcgm="DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
    ),
    # ~3 ms on an H200: off the hot path; rate() over a counter does not need every second.
    Field(
        "gpufleet_gpu_energy_joules_total",
        "counter",
        "joules",
        "Energy used since the driver loaded, in joules.",
        FieldValue(FI_TOTAL_ENERGY_CONSUMPTION),
        scale=1e-3,
        slow=True,
        costly=True,
        dcgm="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        dcgm_kind="counter",
        dcgm_scale=1e3,
    ),
    # ---- clocks -----------------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_sm_clock_hertz",
        "gauge",
        "hertz",
        "SM clock in hertz.",
        Call("nvmlDeviceGetClockInfo", (CLOCK_SM,)),
        scale=1e6,
        dcgm="DCGM_FI_DEV_SM_CLOCK",
        dcgm_scale=1e-6,
    ),
    Field(
        "gpufleet_gpu_memory_clock_hertz",
        "gauge",
        "hertz",
        "Memory clock in hertz.",
        Call("nvmlDeviceGetClockInfo", (CLOCK_MEM,)),
        scale=1e6,
        dcgm="DCGM_FI_DEV_MEM_CLOCK",
        dcgm_scale=1e-6,
    ),
    Field(
        "gpufleet_gpu_clock_event_active",
        "gauge",
        "",
        "1 while the clock-event (throttle) reason is active, else 0.",
        {
            (reason,): Call("nvmlDeviceGetCurrentClocksEventReasons", mask=bit)
            for reason, bit in CLOCK_EVENT_REASONS.items()
        },
        labels=("reason",),
        urgent=True,
        dcgm="DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    ),
    Field(
        "gpufleet_gpu_clock_event_violation_seconds_total",
        "counter",
        "seconds",
        "Time the clocks were held below the requested clocks, per reason, since the driver loaded.",
        # 0.8–1 ms per reason id on an H200 (bench/nvml_profile.py): a counter, so the slow cadence loses nothing.
        {(reason,): FieldValue(fid) for reason, fid in VIOLATION_FIELDS.items()},
        labels=("reason",),
        scale=1e-9,
        slow=True,
        costly=True,
        dcgm={
            ("sw_power_cap",): "DCGM_FI_DEV_POWER_VIOLATION",
            ("thermal",): "DCGM_FI_DEV_THERMAL_VIOLATION",
            ("sync_boost",): "DCGM_FI_DEV_SYNC_BOOST_VIOLATION",
            ("board_limit",): "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION",
            ("low_utilization",): "DCGM_FI_DEV_LOW_UTIL_VIOLATION",
            ("reliability",): "DCGM_FI_DEV_RELIABILITY_VIOLATION",
        },
        dcgm_kind="counter",
        dcgm_scale=1e9,
    ),
    # ---- memory errors ----------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_ecc_errors_total",
        "counter",
        "",
        "ECC memory errors by type (corrected/uncorrected) and scope (volatile: since the driver loaded; "
        "aggregate: over the GPU's life).",
        {
            ("corrected", "volatile"): FieldValue(FI_ECC_SBE_VOL_TOTAL),
            ("uncorrected", "volatile"): FieldValue(FI_ECC_DBE_VOL_TOTAL),
            ("corrected", "aggregate"): FieldValue(FI_ECC_SBE_AGG_TOTAL),
            ("uncorrected", "aggregate"): FieldValue(FI_ECC_DBE_AGG_TOTAL),
        },
        labels=("type", "scope"),
        urgent=True,
        dcgm={
            ("corrected", "volatile"): "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            ("uncorrected", "volatile"): "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            ("corrected", "aggregate"): "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            ("uncorrected", "aggregate"): "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        },
        dcgm_kind="counter",
    ),
    Field(
        "gpufleet_gpu_remapped_rows_total",
        "counter",
        "",
        "Memory rows remapped to spares, by the kind of error that caused it (Ampere and newer).",
        {("correctable",): FieldValue(FI_REMAPPED_COR), ("uncorrectable",): FieldValue(FI_REMAPPED_UNC)},
        labels=("type",),
        urgent=True,
        dcgm={
            ("correctable",): "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
            ("uncorrectable",): "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        },
        dcgm_kind="counter",
    ),
    Field(
        "gpufleet_gpu_row_remap_pending",
        "gauge",
        "",
        "1 when a row remapping waits for a GPU reset to take effect.",
        FieldValue(FI_REMAPPED_PENDING),
        urgent=True,
        dcgm="DCGM_FI_DEV_ROW_REMAP_PENDING",
    ),
    Field(
        "gpufleet_gpu_row_remap_failure",
        "gauge",
        "",
        "1 when a row could not be remapped (no spare rows left): the GPU needs service.",
        FieldValue(FI_REMAPPED_FAILURE),
        urgent=True,
        dcgm="DCGM_FI_DEV_ROW_REMAP_FAILURE",
    ),
    Field(
        "gpufleet_gpu_retired_pages_total",
        "counter",
        "",
        "Memory pages retired, by cause (pre-Ampere GPUs; newer ones remap rows instead).",
        {("single_bit",): FieldValue(FI_RETIRED_SBE), ("double_bit",): FieldValue(FI_RETIRED_DBE)},
        labels=("cause",),
        urgent=True,
        dcgm={("single_bit",): "DCGM_FI_DEV_RETIRED_SBE", ("double_bit",): "DCGM_FI_DEV_RETIRED_DBE"},
        dcgm_kind="counter",
    ),
    Field(
        "gpufleet_gpu_retired_pages_pending",
        "gauge",
        "",
        "1 when a page retirement waits for a GPU reset to take effect.",
        FieldValue(FI_RETIRED_PENDING),
        dcgm="DCGM_FI_DEV_RETIRED_PENDING",
        dcgm_kind="counter",
    ),
    # A state the driver sets after a fault (often with XID 154) and holds until the action is taken: the slow
    # cadence (10 s) is soon enough for an alert that asks for a reset or a reboot.
    Field(
        "gpufleet_gpu_recovery_action",
        "gauge",
        "",
        "What the driver says the GPU needs to recover: 0 none, 1 GPU reset, 2 node reboot, 3 drain "
        "peer-to-peer, 4 drain and reset (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; driver R570 and newer, "
        "absent on older drivers).",
        FieldValue(FI_GET_GPU_RECOVERY_ACTION),
        urgent=True,
        slow=True,
    ),
    # ---- PCIe -------------------------------------------------------------------------------------
    Field(
        "gpufleet_gpu_pcie_link_generation",
        "gauge",
        "",
        "Current PCIe link generation (drops when the GPU idles to save power).",
        Call("nvmlDeviceGetCurrPcieLinkGeneration"),
        dcgm="DCGM_FI_DEV_PCIE_LINK_GEN",
    ),
    Field(
        "gpufleet_gpu_pcie_link_width",
        "gauge",
        "",
        "Current PCIe link width in lanes.",
        Call("nvmlDeviceGetCurrPcieLinkWidth"),
        slow=True,
        dcgm="DCGM_FI_DEV_PCIE_LINK_WIDTH",
    ),
    Field(
        "gpufleet_gpu_pcie_link_max_generation",
        "gauge",
        "",
        "Highest PCIe link generation the GPU and system support together.",
        Call("nvmlDeviceGetMaxPcieLinkGeneration"),
        slow=True,
        dcgm="DCGM_FI_DEV_PCIE_MAX_LINK_GEN",
    ),
    Field(
        "gpufleet_gpu_pcie_link_max_width",
        "gauge",
        "",
        "Widest PCIe link the GPU and system support together.",
        Call("nvmlDeviceGetMaxPcieLinkWidth"),
        slow=True,
        dcgm="DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH",
    ),
    Field(
        "gpufleet_gpu_pcie_replays_total",
        "counter",
        "",
        "PCIe packets replayed after link errors; a rising count means a flaky slot, riser or cable.",
        # about 0.45 ms on an H200 (bench/nvml_profile.py): a counter, read on the slow cadence.
        FieldValue(FI_PCIE_REPLAY_COUNTER),
        slow=True,
        dcgm="DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        dcgm_kind="counter",
    ),
    # ~20 ms each on an H200 (NVML samples the bus): off the hot path.
    Field(
        "gpufleet_gpu_pcie_transmit_bytes_per_second",
        "gauge",
        "bytes",
        "PCIe traffic from the GPU, in bytes per second (NVML samples it over 20 ms).",
        Call("nvmlDeviceGetPcieThroughput", (PCIE_UTIL_TX_BYTES,)),
        scale=KIB,
        slow=True,
        costly=True,
        dcgm="DCGM_FI_PROF_PCIE_TX_BYTES",
    ),
    Field(
        "gpufleet_gpu_pcie_receive_bytes_per_second",
        "gauge",
        "bytes",
        "PCIe traffic to the GPU, in bytes per second (NVML samples it over 20 ms).",
        Call("nvmlDeviceGetPcieThroughput", (PCIE_UTIL_RX_BYTES,)),
        scale=KIB,
        slow=True,
        costly=True,
        dcgm="DCGM_FI_PROF_PCIE_RX_BYTES",
    ),
    # ---- NVLink -----------------------------------------------------------------------------------
    # Error counters and link state are read on the slow cadence: up to 90 link-scoped reads per GPU on the
    # first pass (fewer once the GPU's answers are learned), and counters lose nothing between reads.
    Field(
        "gpufleet_gpu_nvlink_errors_total",
        "counter",
        "",
        "NVLink errors summed over the GPU's links, by type: crc_flit (CRC errors; on Hopper the data-link CRC "
        "counter), crc_data, replay, recovery, ecc_data (data the link's ECC corrected). Read from the per-GPU "
        "totals where the GPU answers them (Ampere and older), else from its per-link counters (Hopper).",
        {(kind,): _gpu_errors(kind) for kind in NVLINK_TYPES},
        labels=("type",),
        urgent=True,
        slow=True,
        dcgm={
            ("crc_flit",): "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
            ("crc_data",): "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
            ("replay",): "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
            ("recovery",): "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
            ("ecc_data",): "DCGM_FI_DEV_NVLINK_ECC_DATA_ERROR_COUNT_TOTAL",
        },
        dcgm_kind="counter",
        when="on GPUs with NVLink",
    ),
    Field(
        "gpufleet_gpu_nvlink_link_errors_total",
        "counter",
        "",
        "NVLink errors of one link, by type (the counters gpufleet_gpu_nvlink_errors_total sums; opt-in: "
        "--nvlink-per-link).",
        {
            (kind, str(link)): _link_errors(kind, link)
            for kind in NVLINK_TYPES
            for link in range(NVLINK_MAX_LINKS)
        },
        labels=("type", "link"),
        slow=True,
        per_link=True,
        # dcgm-exporter has a field per link for these four (L0..L17), none for ECC data.
        dcgm={
            (kind, str(link)): f"DCGM_FI_DEV_NVLINK_{kind.upper()}_ERROR_COUNT_L{link}"
            for kind in ("crc_flit", "crc_data", "replay", "recovery")
            for link in range(NVLINK_MAX_LINKS)
        },
        dcgm_kind="counter",
        when="opt-in: --nvlink-per-link",
    ),
    Field(
        "gpufleet_gpu_nvlink_links",
        "gauge",
        "",
        "NVLinks the GPU has: the links NVML reports a state for (nvmlDeviceGetNvLinkState), up or down.",
        CountOf(_LINK_STATE),
        slow=True,
        when="on GPUs with NVLink",
    ),
    Field(
        "gpufleet_gpu_nvlink_links_up",
        "gauge",
        "",
        "NVLinks that are up (active). Fewer than gpufleet_gpu_nvlink_links: a link is down.",
        SumOf(_LINK_STATE, hold=False),
        urgent=True,
        slow=True,
        when="on GPUs with NVLink",
    ),
    Field(
        "gpufleet_gpu_nvlink_link_up",
        "gauge",
        "",
        "1 while the NVLink is up (active), 0 while it is down (opt-in: --nvlink-per-link).",
        {(str(link),): state for link, state in enumerate(_LINK_STATE)},
        labels=("link",),
        slow=True,
        per_link=True,
        when="opt-in: --nvlink-per-link",
    ),
    Field(
        "gpufleet_gpu_nvlink_transmit_bytes_total",
        "counter",
        "bytes",
        "NVLink payload data sent, summed over all links, in bytes.",
        FieldValue(FI_NVLINK_THROUGHPUT_DATA_TX, SCOPE_ALL_LINKS),
        scale=KIB,
    ),
    Field(
        "gpufleet_gpu_nvlink_receive_bytes_total",
        "counter",
        "bytes",
        "NVLink payload data received, summed over all links, in bytes.",
        FieldValue(FI_NVLINK_THROUGHPUT_DATA_RX, SCOPE_ALL_LINKS),
        scale=KIB,
    ),
)


class GpmField(NamedTuple):
    """A GPM (Hopper and newer) metric: computed by NVML from two GPM samples, no DCGM needed."""

    name: str
    metric_id: int  # NVML_GPM_METRIC_*
    help: str
    dcgm: str | None
    unit: str = "ratio"
    scale: float = 0.01  # NVML's unit (percent, MiB/s) -> ours (ratio, bytes/s)
    # Computed over the slow cadence's window instead of every sample (GRAPHICS_UTIL alone costs about 1.7 ms
    # per nvmlGpmMetricsGet on an H200, the other metrics about 7 µs: bench/nvml_profile.py).
    slow: bool = False


GPM_FIELDS: tuple[GpmField, ...] = (
    GpmField(
        "gpufleet_gpu_graphics_engine_active_ratio",
        1,
        "Share of time the graphics/compute engine was active (GPM GRAPHICS_UTIL), averaged over 4 slow intervals (2 minutes at the default).",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        slow=True,
    ),
    GpmField(
        "gpufleet_gpu_sm_active_ratio",
        2,
        "Share of SM cycles with at least one warp resident (GPM SM_UTIL).",
        "DCGM_FI_PROF_SM_ACTIVE",
    ),
    GpmField(
        "gpufleet_gpu_sm_occupancy_ratio",
        3,
        "Resident warps as a share of the SMs' maximum (GPM SM_OCCUPANCY).",
        "DCGM_FI_PROF_SM_OCCUPANCY",
    ),
    GpmField(
        "gpufleet_gpu_tensor_active_ratio",
        5,
        "Share of cycles any tensor pipe was active (GPM ANY_TENSOR_UTIL).",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    ),
    GpmField(
        "gpufleet_gpu_dram_active_ratio",
        10,
        "Share of cycles the memory interface was active (GPM DRAM_BW_UTIL).",
        "DCGM_FI_PROF_DRAM_ACTIVE",
    ),
    GpmField(
        "gpufleet_gpu_fp64_active_ratio",
        11,
        "Share of cycles the FP64 pipe was active (GPM FP64_UTIL).",
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE",
    ),
    GpmField(
        "gpufleet_gpu_fp32_active_ratio",
        12,
        "Share of cycles the FP32 pipe was active (GPM FP32_UTIL).",
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
    ),
    GpmField(
        "gpufleet_gpu_fp16_active_ratio",
        13,
        "Share of cycles the FP16 pipe was active (GPM FP16_UTIL).",
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE",
    ),
    GpmField(
        "gpufleet_gpu_nvlink_transmit_bytes_per_second",
        61,
        "NVLink traffic sent over all links, in bytes per second (GPM NVLINK_TOTAL_TX_PER_SEC).",
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "bytes",
        float(MIB),
    ),
    GpmField(
        "gpufleet_gpu_nvlink_receive_bytes_per_second",
        60,
        "NVLink traffic received over all links, in bytes per second (GPM NVLINK_TOTAL_RX_PER_SEC).",
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
        "bytes",
        float(MIB),
    ),
)

# Series of the GPU source that are not table rows.
UP = ("gpufleet_gpu_up", "1 when the GPU answers NVML, 0 when it is lost.")
INFO = (
    "gpufleet_gpu_info",
    "Static facts about the GPU (driver, serial, PCI bus id, MIG mode); the value is always 1.",
)
XID = ("gpufleet_gpu_xid_errors_total", "XID errors reported by the driver, per XID code.")
MIG_INFO = (
    "gpufleet_mig_info",
    "A MIG instance of a GPU (profile, instance ids, UUID); the value is always 1.",
)
PROCESS_MEMORY = (
    "gpufleet_gpu_process_memory_used_bytes",
    "Framebuffer memory a process holds on the GPU, in bytes (opt-in: --process-metrics).",
)
PROCESS_SM = (
    "gpufleet_gpu_process_sm_utilization_ratio",
    "Share of the last sample period the process had a kernel running on the GPU (opt-in).",
)
MIG_LABELS = ("gpu_instance", "compute_instance", "mig_profile", "mig_uuid")


def mig_name(name: str) -> str:
    """The MIG-instance family of a GPU family: ``gpufleet_gpu_x`` -> ``gpufleet_mig_x``."""
    return "gpufleet_mig_" + name.removeprefix("gpufleet_gpu_")


PER_LINK_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.per_link)
MIG_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.mig)
# The costly slow rows are read every COSTLY_EVERY-th slow refresh: every 2 minutes at the default 30 s.
COSTLY_EVERY = 4
FAST_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if not f.slow)
SLOW_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.slow)
