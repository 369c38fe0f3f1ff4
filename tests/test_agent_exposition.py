"""The agent's real /metrics exposition through promtool: clean in gpufleet naming; in dcgm naming only
the findings dcgm-exporter's own names carry."""

from __future__ import annotations

import re
import subprocess
import urllib.request

import pytest

from gpufleet.agent.dcgm_names import dcgm_names
from gpufleet.agent.main import AgentSettings, start_agent
from tests.conftest import free_port, wait_until

PROMTOOL = "/usr/bin/promtool"

# Types as dcgm-exporter declares them (etc/default-counters.csv, etc/dcp-metrics-included.csv).
DCGM_EXPORTER_TYPES = {
    "DCGM_FI_DEV_SM_CLOCK": "gauge",
    "DCGM_FI_DEV_MEM_CLOCK": "gauge",
    "DCGM_FI_DEV_MEMORY_TEMP": "gauge",
    "DCGM_FI_DEV_GPU_TEMP": "gauge",
    "DCGM_FI_DEV_POWER_USAGE": "gauge",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "counter",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": "counter",
    "DCGM_FI_DEV_GPU_UTIL": "gauge",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "gauge",
    "DCGM_FI_DEV_ENC_UTIL": "gauge",
    "DCGM_FI_DEV_DEC_UTIL": "gauge",
    "DCGM_FI_DEV_XID_ERRORS": "gauge",
    "DCGM_FI_DEV_POWER_VIOLATION": "counter",
    "DCGM_FI_DEV_THERMAL_VIOLATION": "counter",
    "DCGM_FI_DEV_SYNC_BOOST_VIOLATION": "counter",
    "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION": "counter",
    "DCGM_FI_DEV_LOW_UTIL_VIOLATION": "counter",
    "DCGM_FI_DEV_RELIABILITY_VIOLATION": "counter",
    "DCGM_FI_DEV_FB_FREE": "gauge",
    "DCGM_FI_DEV_FB_USED": "gauge",
    "DCGM_FI_DEV_FB_RESERVED": "gauge",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": "counter",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "counter",
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": "counter",
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": "counter",
    "DCGM_FI_DEV_RETIRED_SBE": "counter",
    "DCGM_FI_DEV_RETIRED_DBE": "counter",
    "DCGM_FI_DEV_RETIRED_PENDING": "counter",
    "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": "counter",
    "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL": "counter",
    "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": "counter",
    "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL": "counter",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "counter",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "counter",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": "gauge",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "gauge",
    "DCGM_FI_PROF_SM_ACTIVE": "gauge",
    "DCGM_FI_PROF_SM_OCCUPANCY": "gauge",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "gauge",
    "DCGM_FI_PROF_DRAM_ACTIVE": "gauge",
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": "gauge",
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": "gauge",
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": "gauge",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "gauge",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "gauge",
}


def promtool(text: str) -> tuple[int, set[str]]:
    run = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    return run.returncode, {line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()}


@pytest.fixture(params=["gpufleet", "dcgm"])
def exposition(request):
    port = free_port()
    agent = start_agent(
        AgentSettings(
            listen=f"127.0.0.1:{port}",
            simulate=3,
            node="gpu-node-1",
            interval=0.2,
            metric_names=request.param,
            seed=21,
            simulate_mig={2: ["3g.40gb", "1g.10gb"]},
            process_metrics=True,
            slow_interval=0.2,
        )
    )
    try:
        agent.simulator.inject(0, "xid", xid=31)
        agent.simulator.inject(1, "thermal")

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            sm = "DCGM_FI_PROF_SM_ACTIVE{" if request.param == "dcgm" else "gpufleet_gpu_sm_active_ratio{"
            xid = "DCGM_FI_DEV_XID_ERRORS{" if request.param == "dcgm" else "gpufleet_gpu_xid_errors_total{"
            return text if sm in text and xid in text and ("_mig_" in text or "GPU_I_ID" in text) else None

        yield request.param, wait_until(scrape, timeout=15)
    finally:
        agent.stop()


def test_promtool_finds_nothing_but_what_dcgm_exporter_names_carry(exposition):
    mode, text = exposition
    rc, findings = promtool(text)
    if mode == "gpufleet":
        assert (rc, findings) == (0, set())
        return
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    exposed_dcgm = {name for name in types if name.startswith("DCGM_FI_")}
    # the core dcgm-exporter fields dashboards use are all there, typed as dcgm-exporter types them
    for name in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_PROF_SM_ACTIVE",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "DCGM_FI_DEV_XID_ERRORS",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "DCGM_FI_DEV_THERMAL_VIOLATION",
    ):
        assert name in exposed_dcgm, name
    for name in exposed_dcgm & DCGM_EXPORTER_TYPES.keys():
        assert types[name] == DCGM_EXPORTER_TYPES[name], name
    assert exposed_dcgm <= dcgm_names().keys()
    allowed = {
        f'{name} counter metrics should have "_total" suffix'
        for name in exposed_dcgm
        if types[name] == "counter"
    }
    allowed |= {
        f"{name} label names should be written in 'snake_case' not 'camelCase'" for name in exposed_dcgm
    }
    allowed |= {
        f"{name} metric name should not include type '{types[name]}'"
        for name in exposed_dcgm
        if types[name] in name.lower()
    }  # DCGM_FI_DEV_PCIE_REPLAY_COUNTER
    assert findings == allowed
    assert rc == 3  # promtool's "lint problems found"


@pytest.mark.parametrize("exposition", ["dcgm"], indirect=True)
def test_dcgm_mode_carries_dcgm_exporter_labels_and_units(exposition):
    _, text = exposition
    line = next(x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_FB_TOTAL{") and 'gpu="0"' in x)
    for label in (
        "gpu=",
        "UUID=",
        'device="nvidia0"',
        "modelName=",
        'Hostname="gpu-node-1"',
        "pci_bus_id=",
        'DCGM_FI_DRIVER_VERSION="570.133.20"',
    ):
        assert label in line
    assert float(line.rsplit(" ", 1)[1]) == 80 * 1024  # MiB, as dcgm-exporter
    util = [x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_GPU_UTIL{")]
    assert util and all(0 <= float(x.rsplit(" ", 1)[1]) <= 100 for x in util)  # percent
    mig = [x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_FB_USED{") and "GPU_I_ID=" in x]
    assert len(mig) == 2 and all("GPU_I_PROFILE=" in x for x in mig)
    reasons = [
        x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{") and 'gpu="1"' in x
    ]
    assert reasons  # the thermal fault sets HW_THERMAL (0x40) once the card is hot; the bitmask is a number
    # what dcgm-exporter lacks keeps its gpufleet name, so nothing is lost in this mode
    assert "gpufleet_gpu_up{" in text and "gpufleet_gpu_xid_errors_total{" in text
