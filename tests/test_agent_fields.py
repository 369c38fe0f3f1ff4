"""The field table, row by row: real NVML names, simulator, scripted NVML answers, slow rows off the hot path."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from gpufleet.agent import fields as F
from gpufleet.agent.fields import COSTLY_EVERY, FIELDS, GPM_FIELDS, SLOW_FIELDS, Call, FieldValue
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.settings import AgentSettings
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from tests.fake_nvml import GPU_IS_LOST, FakeNVML

GIB, MIB = 1 << 30, 1 << 20


def by_series(families):
    return {(f.name, tuple(sorted(lab.items()))): v for f in families for lab, v in f.samples}


def row_values(families, row):
    fam = next(f for f in families if f.name == row.name)
    return {tuple(lab[k] for k in row.labels): v for lab, v in fam.samples}


def calls_of(table=FIELDS):
    return sorted({s.fn for f in table for s in f.sources() if isinstance(s, Call)})


def test_every_nvml_function_and_field_id_the_table_names_exists_in_the_real_bindings():
    for fn in calls_of():
        assert callable(getattr(pynvml, fn, None)), f"pynvml has no {fn}"
    # our FI_* constants are nvml.h's NVML_FI_DEV_* numbers
    for const in [c for c in dir(F) if c.startswith("FI_")]:
        assert getattr(pynvml, "NVML_FI_DEV_" + const[3:]) == getattr(F, const), const
    # the per-link field ids of Ampere and older are nvml.h's NVML_FI_DEV_NVLINK_<COUNTER>_ERROR_COUNT_L<n>
    per_link = {}
    for kind, ids in F.NVLINK_LEGACY_LINK_FIELDS.items():
        for link, fid in enumerate(ids):
            name = f"NVML_FI_DEV_NVLINK_{kind.upper()}_ERROR_COUNT_L{link}"
            assert getattr(pynvml, name) == fid, name
            per_link[fid] = (kind, link)
    assert {k: getattr(pynvml, f"NVML_NVLINK_ERROR_DL_{k.upper()}") for k in F.NVLINK_ERROR_COUNTERS} == (
        F.NVLINK_ERROR_COUNTERS
    )
    used = {s.id for f in FIELDS for s in f.sources() if isinstance(s, FieldValue)}
    assert used <= {getattr(F, c) for c in dir(F) if c.startswith("FI_")} | set(per_link)
    assert pynvml.nvmlMemory_v2 == F.MEMORY_V2
    for reason, bit in F.CLOCK_EVENT_REASONS.items():
        assert bit in {v for k, v in vars(pynvml).items() if k.startswith("nvmlClocksEventReason")}, reason
    gpm = {v: k for k, v in vars(pynvml).items() if k.startswith("NVML_GPM_METRIC_")}
    for g in GPM_FIELDS:
        assert g.metric_id in gpm, g.name


def test_the_simulator_offers_every_function_the_table_and_the_source_call():
    sim = SimulatedNVML(1)
    for fn in calls_of() + [
        "nvmlDeviceGetFieldValues",
        "nvmlGpmMigSampleGet",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMigDeviceHandleByIndex",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetProcessUtilization",
    ]:
        assert callable(getattr(sim, fn, None)), f"the simulator lacks {fn}"


def test_every_row_reads_a_believable_value_on_the_simulator():
    clock = SimpleNamespace(t=1000.0)
    sim = SimulatedNVML(1, clock=lambda: clock.t, seed=3, workload="busy")
    src = GpuSource(
        Nvml(sim), "n", watch_events=False, background=False, clock=lambda: clock.t, nvlink_per_link=True
    )
    src.start()
    src.collect()
    for _ in range(COSTLY_EVERY):  # two minutes of a training job, sampled at each slow refresh
        clock.t += AgentSettings().slow_interval
        fams = src.collect()
    ranges = {
        "ratio": (0, 1),
        "celsius": (20, 100),
        "watts": (50, 1000),
        "hertz": (1e8, 4e9),
        "bytes": (0, 200 * GIB),
        "joules": (1, 1e9),
        "seconds": (0, 1e6),
        "": (0, 64),
    }
    for row in FIELDS:
        got = row_values(fams, row)
        expected_keys = set(row.read) if isinstance(row.read, dict) else {()}
        assert set(got) == expected_keys, f"{row.name} read {sorted(got)} on the simulator"
        lo, hi = ranges[row.unit]
        if row.kind == "counter" and row.unit == "bytes":
            hi = 120 * 1e12  # two minutes at no more than 1 TB/s
        for key, v in got.items():
            assert lo <= v <= hi, (row.name, key, v)
    gpm = {g.name: g for g in GPM_FIELDS}
    for name, g in gpm.items():
        assert row_values(fams, SimpleNamespace(name=name, labels=())), f"{name} read no value"
        if g.unit == "ratio":
            assert 0 <= row_values(fams, SimpleNamespace(name=name, labels=()))[()] <= 1
    sm = row_values(fams, SimpleNamespace(name="gpufleet_gpu_sm_active_ratio", labels=()))[()]
    assert sm > 0.6  # a training job keeps the SMs busy
    power = row_values(fams, SimpleNamespace(name="gpufleet_gpu_power_watts", labels=()))[()]
    energy = row_values(fams, SimpleNamespace(name="gpufleet_gpu_energy_joules_total", labels=()))[()]
    assert power > 300 and energy > 120 * 70  # at least idle power over two minutes


def _field_answer(values: dict):
    """A scripted nvmlDeviceGetFieldValues: {field id or (field id, scope): (value type, value)}; others answer
    NOT_SUPPORTED."""
    members = {1: "uiVal", 3: "ullVal", 5: "siVal", 0: "dVal"}

    def answer(ids):
        out = []
        for fid, scope in ids:
            entry = SimpleNamespace(
                fieldId=fid, scopeId=scope, valueType=0, nvmlReturn=3, value=SimpleNamespace()
            )
            got = values.get((fid, scope), values.get(fid))
            if got is not None:
                vtype, v = got
                entry.valueType, entry.nvmlReturn = vtype, 0
                setattr(entry.value, members[vtype], v)
            out.append(entry)
        return out

    return answer


def scripted_gpu() -> dict:
    """NVML answers in NVML units for every function and field id the table reads."""
    fields = {
        3: (3, 2),
        4: (3, 0),
        5: (3, 17),
        6: (3, 1),
        29: (1, 0),
        30: (1, 0),
        31: (1, 0),
        38: (3, 4),
        45: (3, 0),
        52: (3, 9),
        59: (3, 1),
        160: (3, 0),
        74: (3, 2_500_000_000),
        75: (3, 0),
        76: (3, 0),
        77: (3, 0),
        78: (3, 61_000_000_000),
        79: (3, 0),
        269: (3, 0),
        270: (3, 0),
        271: (3, 500_000_000),
        82: (1, 71),
        83: (3, 123_456_789),
        94: (1, 12),
        138: (3, 2048),
        139: (3, 1024),
        142: (1, 3),
        143: (1, 1),
        144: (1, 1),
        145: (1, 0),
        230: (1, 2),
    }
    return {
        "nvmlDeviceGetUtilizationRates": SimpleNamespace(gpu=87, memory=40),
        "nvmlDeviceGetEncoderUtilization": [5, 167000],
        "nvmlDeviceGetDecoderUtilization": [7, 167000],
        "nvmlDeviceGetMemoryInfo": lambda version: SimpleNamespace(
            version=version,
            total=80 * GIB,
            reserved=512 * MIB,
            used=10 * GIB,
            free=80 * GIB - 512 * MIB - 10 * GIB,
        ),
        "nvmlDeviceGetTemperature": 61,
        "nvmlDeviceGetTemperatureThreshold": lambda kind: {0: 92, 1: 87}[kind],
        "nvmlDeviceGetPowerUsage": 312_500,
        "nvmlDeviceGetEnforcedPowerLimit": 700_000,
        "nvmlDeviceGetClockInfo": lambda kind: {1: 1980, 2: 2619}[kind],
        "nvmlDeviceGetCurrentClocksEventReasons": 0x4 | 0x80,
        "nvmlDeviceGetCurrPcieLinkGeneration": 4,
        "nvmlDeviceGetCurrPcieLinkWidth": 16,
        "nvmlDeviceGetMaxPcieLinkGeneration": 5,
        "nvmlDeviceGetMaxPcieLinkWidth": 16,
        "nvmlDeviceGetPcieThroughput": lambda counter: {0: 1000, 1: 4000}[counter],
        "nvmlDeviceGetFieldValues": _field_answer(
            fields
            | {(fid, link): (3, LINK_DL[fid] + link) for fid in LINK_DL for link in range(F.NVLINK_MAX_LINKS)}
            | {
                fid: (3, fid)
                for kind in ("crc_data", "ecc_data")
                for fid in F.NVLINK_LEGACY_LINK_FIELDS[kind]
            }
        ),
        "nvmlDeviceGetNvLinkErrorCounter": lambda link, counter: 1000 * counter + link,
        "nvmlDeviceGetNvLinkState": lambda link: int(link != LINK_DOWN),
    }


# The scripted GPU answers per-GPU NVLink totals (Ampere), Hopper's link-scoped counters for CRC, replay and
# recovery, per-link field ids for CRC-data and ECC errors on links 0-11, nvmlDeviceGetNvLinkErrorCounter on
# the links above; link 5 is down.
LINK_DL = {
    F.FI_NVLINK_ERROR_DL_CRC: 300,
    F.FI_NVLINK_ERROR_DL_REPLAY: 100,
    F.FI_NVLINK_ERROR_DL_RECOVERY: 200,
}
LINK_DOWN = 5


def _scripted_link_errors(kind: str, link: int) -> int:
    if kind in F.NVLINK_DL_FIELDS:
        return LINK_DL[F.NVLINK_DL_FIELDS[kind]] + link
    if link < 12:
        return F.NVLINK_LEGACY_LINK_FIELDS[kind][link]
    return 1000 * F.NVLINK_ERROR_COUNTERS[kind] + link


# What each row must read from scripted_gpu(), in base units.
EXPECTED = {
    ("gpufleet_gpu_utilization_ratio", ()): 0.87,
    ("gpufleet_gpu_memory_bandwidth_utilization_ratio", ()): 0.40,
    ("gpufleet_gpu_encoder_utilization_ratio", ()): 0.05,
    ("gpufleet_gpu_decoder_utilization_ratio", ()): 0.07,
    ("gpufleet_gpu_memory_used_bytes", ()): 10 * GIB,
    ("gpufleet_gpu_memory_free_bytes", ()): 80 * GIB - 512 * MIB - 10 * GIB,
    ("gpufleet_gpu_memory_total_bytes", ()): 80 * GIB,
    ("gpufleet_gpu_memory_reserved_bytes", ()): 512 * MIB,
    ("gpufleet_gpu_temperature_celsius", ()): 61,
    ("gpufleet_gpu_memory_temperature_celsius", ()): 71,
    ("gpufleet_gpu_slowdown_temperature_celsius", ()): 87,
    ("gpufleet_gpu_shutdown_temperature_celsius", ()): 92,
    ("gpufleet_gpu_power_watts", ()): 312.5,
    ("gpufleet_gpu_power_limit_watts", ()): 700,
    ("gpufleet_gpu_energy_joules_total", ()): 123_456.789,
    ("gpufleet_gpu_sm_clock_hertz", ()): 1.98e9,
    ("gpufleet_gpu_memory_clock_hertz", ()): 2.619e9,
    **{
        ("gpufleet_gpu_clock_event_active", (r,)): float(r in ("sw_power_cap", "hw_power_brake"))
        for r in F.CLOCK_EVENT_REASONS
    },
    **{
        ("gpufleet_gpu_clock_event_violation_seconds_total", (r,)): v
        for r, v in {
            "sw_power_cap": 2.5,
            "thermal": 0,
            "sync_boost": 0,
            "board_limit": 0,
            "low_utilization": 61,
            "reliability": 0,
            "sw_thermal": 0,
            "hw_thermal": 0,
            "hw_power_brake": 0.5,
        }.items()
    },
    ("gpufleet_gpu_ecc_errors_total", ("corrected", "volatile")): 2,
    ("gpufleet_gpu_ecc_errors_total", ("uncorrected", "volatile")): 0,
    ("gpufleet_gpu_ecc_errors_total", ("corrected", "aggregate")): 17,
    ("gpufleet_gpu_ecc_errors_total", ("uncorrected", "aggregate")): 1,
    ("gpufleet_gpu_remapped_rows_total", ("correctable",)): 3,
    ("gpufleet_gpu_remapped_rows_total", ("uncorrectable",)): 1,
    ("gpufleet_gpu_row_remap_pending", ()): 1,
    ("gpufleet_gpu_row_remap_failure", ()): 0,
    ("gpufleet_gpu_retired_pages_total", ("single_bit",)): 0,
    ("gpufleet_gpu_retired_pages_total", ("double_bit",)): 0,
    ("gpufleet_gpu_retired_pages_pending", ()): 0,
    ("gpufleet_gpu_pcie_link_generation", ()): 4,
    ("gpufleet_gpu_pcie_link_width", ()): 16,
    ("gpufleet_gpu_pcie_link_max_generation", ()): 5,
    ("gpufleet_gpu_pcie_link_max_width", ()): 16,
    ("gpufleet_gpu_recovery_action", ()): 2,
    ("gpufleet_gpu_pcie_replays_total", ()): 12,
    ("gpufleet_gpu_pcie_transmit_bytes_per_second", ()): 1000 * 1024,
    ("gpufleet_gpu_pcie_receive_bytes_per_second", ()): 4000 * 1024,
    ("gpufleet_gpu_nvlink_errors_total", ("crc_flit",)): 4,
    ("gpufleet_gpu_nvlink_errors_total", ("crc_data",)): 0,
    ("gpufleet_gpu_nvlink_errors_total", ("replay",)): 9,
    ("gpufleet_gpu_nvlink_errors_total", ("recovery",)): 1,
    ("gpufleet_gpu_nvlink_errors_total", ("ecc_data",)): 0,
    **{
        ("gpufleet_gpu_nvlink_link_errors_total", (kind, str(link))): _scripted_link_errors(kind, link)
        for kind in F.NVLINK_TYPES
        for link in range(F.NVLINK_MAX_LINKS)
    },
    ("gpufleet_gpu_nvlink_links", ()): 18,
    ("gpufleet_gpu_nvlink_links_up", ()): 17,
    **{("gpufleet_gpu_nvlink_link_up", (str(link),)): float(link != LINK_DOWN) for link in range(18)},
    ("gpufleet_gpu_nvlink_transmit_bytes_total", ()): 2048 * 1024,
    ("gpufleet_gpu_nvlink_receive_bytes_total", ()): 1024 * 1024,
}


def test_every_row_converts_scripted_nvml_answers_to_base_units():
    fake = FakeNVML(["GPU-a"], scripted_gpu())
    src = GpuSource(Nvml(fake), "n", watch_events=False, background=False, nvlink_per_link=True)
    src.start()
    fams = src.collect()
    got = {(row.name, key): v for row in FIELDS for key, v in row_values(fams, row).items()}
    every_series = {
        (row.name, key) for row in FIELDS for key in (row.read if isinstance(row.read, dict) else {(): None})
    }
    assert set(EXPECTED) == every_series, "EXPECTED must name every series of the table"
    assert got.keys() == EXPECTED.keys()
    for key, want in EXPECTED.items():
        assert got[key] == pytest.approx(want), key


def test_one_sample_makes_each_nvml_call_once_per_gpu_and_leaves_slow_rows_to_the_slow_reader():
    clock = SimpleNamespace(t=0.0)
    fake = FakeNVML(["GPU-a", "GPU-b"], scripted_gpu())
    src = GpuSource(
        Nvml(fake), "n", watch_events=False, background=False, clock=lambda: clock.t, slow_interval=10.0
    )
    src.start()  # reads the slow rows once
    fake.calls.clear()
    for _ in range(5):
        clock.t += 1.0
        src.collect()
    per_sample = {fn: fake.calls.count(fn) / 5 for fn in set(fake.calls)}
    assert per_sample["nvmlDeviceGetFieldValues"] == 2  # one batched read per GPU
    assert per_sample["nvmlDeviceGetMemoryInfo"] == 2  # four rows, one call
    assert per_sample["nvmlDeviceGetCurrentClocksEventReasons"] == 2  # nine reasons, one call
    slow_only = {s.fn for f in SLOW_FIELDS for s in f.sources() if isinstance(s, Call)}
    assert slow_only & set(fake.calls) == set(), "slow rows were read on the hot path"
    # ... yet their values are in every sample, from the slow reader's cache
    assert row_values(src.collect(), SLOW_FIELDS[0])
    # The slow rows are read again every slow interval; the costly ones (PCIe throughput, the energy and
    # violation counters) every COSTLY_EVERY-th time.
    pcie, limits = [], []
    for _ in range(2 * COSTLY_EVERY):
        fake.calls.clear()
        clock.t += 10.0
        src.collect()
        pcie.append(fake.calls.count("nvmlDeviceGetPcieThroughput"))
        limits.append(fake.calls.count("nvmlDeviceGetEnforcedPowerLimit"))
    assert limits == [2] * (2 * COSTLY_EVERY)  # a cheap slow row: every refresh, 2 GPUs
    assert pcie == ([0] * (COSTLY_EVERY - 1) + [4]) * 2  # 2 GPUs x tx, rx, every COSTLY_EVERY-th refresh
    # ... and their values stay in every sample in between
    assert row_values(src.collect(), next(f for f in SLOW_FIELDS if f.costly))


def test_the_background_reader_refreshes_slow_rows_without_a_sample():
    from tests.conftest import wait_until

    fake = FakeNVML(["GPU-a"], scripted_gpu())
    src = GpuSource(Nvml(fake), "n", watch_events=False, background=True, slow_interval=0.05)
    src.start()
    try:
        fake.calls.clear()
        wait_until(lambda: fake.calls.count("nvmlDeviceGetPcieThroughput") >= 4, timeout=5)
    finally:
        src.close()


def test_a_gpu_lost_inside_the_batched_read_reads_down_while_the_others_go_on():
    answers = scripted_gpu()

    def lost_fields(ids):
        return [
            SimpleNamespace(
                fieldId=fid, scopeId=s, valueType=0, nvmlReturn=GPU_IS_LOST, value=SimpleNamespace()
            )
            for fid, s in ids
        ]

    answers[("nvmlDeviceGetFieldValues", 1)] = lost_fields
    src = GpuSource(Nvml(FakeNVML(["GPU-a", "GPU-b"], answers)), "n", watch_events=False, background=False)
    src.start()
    up = next(f for f in src.collect() if f.name == "gpufleet_gpu_up")
    assert {lab["gpu"]: v for lab, v in up.samples} == {"0": 1.0, "1": 0.0}


def test_an_old_gpu_without_field_values_or_gpm_still_reports_what_it_has():
    answers = {k: v for k, v in scripted_gpu().items() if k != "nvmlDeviceGetFieldValues"}
    src = GpuSource(Nvml(FakeNVML(["GPU-a"], answers)), "n", watch_events=False, background=False)
    src.start()
    s = by_series(src.collect())
    names = {name for name, _ in s}
    assert "gpufleet_gpu_power_watts" in names and "gpufleet_gpu_ecc_errors_total" not in names
    assert (
        s[
            (
                "gpufleet_gpu_up",
                (("gpu", "0"), ("model", "NVIDIA H100 80GB HBM3"), ("node", "n"), ("uuid", "GPU-a")),
            )
        ]
        == 1.0
    )


def test_injected_memory_and_link_faults_show_in_their_rows():
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(2, clock=lambda: clock.t, seed=5)
    src = GpuSource(Nvml(sim), "n", watch_events=False, background=False, clock=lambda: clock.t)
    src.start()
    sim.inject(1, "row_remap")
    sim.inject(1, "pcie_replay", count=3)
    sim.inject(0, "nvlink_error", count=2)
    clock.t += AgentSettings().slow_interval + 1  # past the slow cadence: the replay counter is a slow row
    fams = src.collect()
    rows = {f.name: f for f in FIELDS}

    def by_gpu(row):
        return {
            (lab["gpu"], *(lab[k] for k in row.labels)): v
            for f in fams
            if f.name == row.name
            for lab, v in f.samples
        }

    assert by_gpu(rows["gpufleet_gpu_remapped_rows_total"])[("1", "uncorrectable")] == 1
    assert by_gpu(rows["gpufleet_gpu_row_remap_pending"]) == {("0",): 0, ("1",): 1}
    assert by_gpu(rows["gpufleet_gpu_pcie_replays_total"]) == {("0",): 0, ("1",): 3}
    assert by_gpu(rows["gpufleet_gpu_nvlink_errors_total"])[("0", "crc_flit")] == 2


def test_docs_metrics_md_shows_the_table_as_it_is():
    from pathlib import Path

    from gpufleet.agent.metrics_doc import render

    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    assert render() in doc, "docs/metrics.md is stale: run python -m gpufleet.cli.catalogue"


def test_graphics_activity_shows_after_a_second_then_is_worked_out_once_per_costly_window():
    """GPM GRAPHICS_UTIL costs a millisecond or more a call: computed over the costly rows' window
    (COSTLY_EVERY slow intervals), the first window a second long so the series is there from the start."""
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(1, clock=lambda: clock.t, seed=2, workload="busy")
    calls: list[float] = []
    metrics_get = sim.nvmlGpmMetricsGet

    def counted(mg):
        if any(mg.metrics[i].metricId == 1 for i in range(mg.numMetrics)):  # GRAPHICS_UTIL
            calls.append(clock.t)
        return metrics_get(mg)

    sim.nvmlGpmMetricsGet = counted
    src = GpuSource(Nvml(sim), "n", watch_events=False, background=False, clock=lambda: clock.t)
    src.start()
    name = "gpufleet_gpu_graphics_engine_active_ratio"
    seen = []
    window = AgentSettings().slow_interval * COSTLY_EVERY
    for _ in range(int(2 * window) + 10):  # two windows and a bit, at 1 Hz
        seen.append(any(f.name == name and f.samples for f in src.collect()))
        clock.t += 1.0
    assert seen[0] is False and all(seen[1:])
    assert calls == [1.0, 1.0 + window, 1.0 + 2 * window]
