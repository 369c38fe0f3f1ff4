"""Verify the agent's GPU telemetry on a real NVIDIA GPU (H100/H200), in one run:

1. every row of the field table and every GPM metric: the value it reads, or "unsupported on this GPU";
2. the same quantities from ``nvidia-smi -q -x`` and ``nvidia-smi --query-gpu`` taken right after, side by
   side, with a verdict per row (static values must match exactly, moving ones within a tolerance);
3. the "utilization lies" case: a bf16 matmul loop (SM active and tensor active should be near 0.9) and a
   kernel that spins on one thread (NVML utilization near 1.0 while SM active stays near 0).

Run (about 2 minutes):  python3 bench/gpu_verify.py [--gpu 0]
Needs nvidia-ml-py, psutil, prometheus-client and torch. Writes $OUT/gpu_verify.md and .json (default ./out).
Reads only: nothing on the GPU (clocks, MIG, power limits) is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpufleet.agent.fields import FIELDS, GPM_FIELDS  # noqa: E402
from gpufleet.agent.nvml import Nvml  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource  # noqa: E402

# ---- workloads (run in a child process so the sampling process stays undisturbed) ------------------------------
WORKER = r"""
import os, sys, time
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
import torch
kind, index, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
dev = torch.device("cuda", index)
torch.cuda.set_device(dev)
end = time.time() + seconds
if kind == "matmul":
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    while time.time() < end:
        for _ in range(20):
            c = a @ b
        torch.cuda.synchronize()
else:  # one thread in one block spinning for ~1 ms, launched back to back
    cycles = 2_000_000  # about 1 ms at H100 clocks
    while time.time() < end:
        for _ in range(50):
            torch.cuda._sleep(cycles)
        torch.cuda.synchronize()
"""


def run_workload(
    kind: str, cuda_index: int, seconds: float, src: GpuSource, gpu_index: int, warmup: float = 5.0
) -> dict:
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    child = subprocess.Popen(
        [sys.executable, "-c", WORKER, kind, str(cuda_index), str(seconds + warmup)], env=env
    )
    try:
        time.sleep(warmup)
        series: dict[str, list[float]] = {}
        src.collect()  # a fresh GPM pair inside the workload
        t_end = time.time() + seconds - 1
        while time.time() < t_end:
            time.sleep(1.0)
            for fam in src.collect():
                for labels, v in fam.samples:
                    if labels.get("gpu") == str(gpu_index) and fam.name in WATCH:
                        series.setdefault(fam.name, []).append(v)
    finally:
        child.wait(timeout=seconds + warmup + 60)
    return {name: round(statistics.mean(vs), 3) for name, vs in series.items()} | {
        "exit_code": child.returncode
    }


WATCH = {
    "gpufleet_gpu_utilization_ratio",
    "gpufleet_gpu_sm_active_ratio",
    "gpufleet_gpu_tensor_active_ratio",
    "gpufleet_gpu_sm_occupancy_ratio",
    "gpufleet_gpu_dram_active_ratio",
    "gpufleet_gpu_power_watts",
    "gpufleet_gpu_fp16_active_ratio",
    "gpufleet_gpu_graphics_engine_active_ratio",
}


# ---- nvidia-smi ------------------------------------------------------------------------------------------
def number(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.search(r"-?\d+(\.\d+)?", text)
    return float(m.group(0)) if m else None


def smi_xml(smi: str, index: int) -> ET.Element:
    xml = subprocess.run(
        [smi, "-q", "-x", "-i", str(index)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return ET.fromstring(xml).find("gpu")


def first(gpu: ET.Element, *paths: str) -> str | None:
    for p in paths:
        el = gpu.find(p)
        if el is not None and el.text and el.text.strip() not in ("N/A", ""):
            return el.text.strip()
    return None


def smi_reasons(gpu: ET.Element) -> dict[str, float] | None:
    node = gpu.find("clocks_event_reasons")
    if node is None:
        node = gpu.find("clocks_throttle_reasons")
    if node is None:
        return None
    names = {
        "gpu_idle": "idle",
        "applications_clocks": "applications_clocks_setting",
        "sw_power_cap": "sw_power_cap",
        "hw_slowdown": "hw_slowdown",
        "sync_boost": "sync_boost",
        "sw_thermal": "sw_thermal_slowdown",
        "hw_thermal": "hw_thermal_slowdown",
        "hw_power_brake": "hw_power_brake_slowdown",
        "display_clocks": "display_clock_setting",
    }
    out = {}
    for ours, theirs in names.items():
        el = next((c for c in node if c.tag.endswith(theirs)), None)
        if el is not None and el.text:
            out[ours] = 1.0 if el.text.strip() == "Active" else 0.0
    return out


# (our series, label values) -> (nvidia-smi -q -x paths, factor from our unit to nvidia-smi's, tolerance, relative?)
# tolerance None: must match exactly (static values).
MIB = 2**20
COMPARE = {
    ("gpufleet_gpu_utilization_ratio", ()): (["utilization/gpu_util"], 100, 15, False),
    ("gpufleet_gpu_memory_bandwidth_utilization_ratio", ()): (["utilization/memory_util"], 100, 15, False),
    ("gpufleet_gpu_encoder_utilization_ratio", ()): (["utilization/encoder_util"], 100, 5, False),
    ("gpufleet_gpu_decoder_utilization_ratio", ()): (["utilization/decoder_util"], 100, 5, False),
    ("gpufleet_gpu_memory_total_bytes", ()): (["fb_memory_usage/total"], 1 / MIB, None, False),
    ("gpufleet_gpu_memory_reserved_bytes", ()): (["fb_memory_usage/reserved"], 1 / MIB, None, False),
    ("gpufleet_gpu_memory_used_bytes", ()): (["fb_memory_usage/used"], 1 / MIB, 64, False),
    ("gpufleet_gpu_memory_free_bytes", ()): (["fb_memory_usage/free"], 1 / MIB, 64, False),
    ("gpufleet_gpu_temperature_celsius", ()): (["temperature/gpu_temp"], 1, 3, False),
    ("gpufleet_gpu_memory_temperature_celsius", ()): (["temperature/memory_temp"], 1, 3, False),
    ("gpufleet_gpu_slowdown_temperature_celsius", ()): (
        ["temperature/gpu_temp_slow_threshold"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_shutdown_temperature_celsius", ()): (
        ["temperature/gpu_temp_max_threshold"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_power_watts", ()): (
        [
            "gpu_power_readings/power_draw",
            "gpu_power_readings/average_power_draw",
            "gpu_power_readings/instant_power_draw",
            "power_readings/power_draw",
        ],
        1,
        0.25,
        True,
    ),
    ("gpufleet_gpu_power_limit_watts", ()): (
        [
            "gpu_power_readings/enforced_power_limit",
            "gpu_power_readings/current_power_limit",
            "power_readings/enforced_power_limit",
        ],
        1,
        0.01,
        True,
    ),
    ("gpufleet_gpu_sm_clock_hertz", ()): (["clocks/sm_clock"], 1e-6, 0.2, True),
    ("gpufleet_gpu_memory_clock_hertz", ()): (["clocks/mem_clock"], 1e-6, 0.05, True),
    ("gpufleet_gpu_pcie_link_generation", ()): (
        ["pci/pci_gpu_link_info/pcie_gen/current_link_gen"],
        1,
        0,
        False,
    ),
    ("gpufleet_gpu_pcie_link_max_generation", ()): (
        ["pci/pci_gpu_link_info/pcie_gen/max_link_gen"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_pcie_link_width", ()): (
        ["pci/pci_gpu_link_info/link_widths/current_link_width"],
        1,
        0,
        False,
    ),
    ("gpufleet_gpu_pcie_link_max_width", ()): (
        ["pci/pci_gpu_link_info/link_widths/max_link_width"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_pcie_replays_total", ()): (["pci/replay_counter"], 1, 0, False),
    ("gpufleet_gpu_pcie_transmit_bytes_per_second", ()): (["pci/tx_util"], 1 / 1024, None, None),
    ("gpufleet_gpu_pcie_receive_bytes_per_second", ()): (["pci/rx_util"], 1 / 1024, None, None),
    ("gpufleet_gpu_remapped_rows_total", ("correctable",)): (
        ["remapped_rows/remapped_row_corr"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_remapped_rows_total", ("uncorrectable",)): (
        ["remapped_rows/remapped_row_unc"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_row_remap_pending", ()): (["remapped_rows/remapped_row_pending"], 1, None, False),
    ("gpufleet_gpu_row_remap_failure", ()): (["remapped_rows/remapped_row_failure"], 1, None, False),
    ("gpufleet_gpu_ecc_errors_total", ("corrected", "volatile")): (
        ["ecc_errors/volatile/sram_correctable", "ecc_errors/volatile/single_bit/total"],
        1,
        None,
        None,
    ),
    ("gpufleet_gpu_ecc_errors_total", ("uncorrected", "volatile")): (
        ["ecc_errors/volatile/sram_uncorrectable", "ecc_errors/volatile/double_bit/total"],
        1,
        None,
        None,
    ),
    ("gpufleet_gpu_retired_pages_total", ("single_bit",)): (
        ["retired_pages/multiple_single_bit_retirement/retired_count"],
        1,
        None,
        False,
    ),
    ("gpufleet_gpu_retired_pages_total", ("double_bit",)): (
        ["retired_pages/double_bit_retirement/retired_count"],
        1,
        None,
        False,
    ),
}
YES_NO = {"Yes": 1.0, "No": 0.0}


def compare(ours: float | None, xml_text: str | None, factor: float, tol, relative) -> str:
    if ours is None and xml_text is None:
        return "unsupported (both)"
    if ours is None:
        return "agent reads nothing, nvidia-smi does"
    if xml_text is None:
        return "nvidia-smi N/A"
    theirs = YES_NO.get(xml_text, number(xml_text))
    if theirs is None:
        return f"unparsed nvidia-smi {xml_text!r}"
    mine = ours * factor
    if relative is None:  # same quantity, different definition or sampling window: shown, not judged
        return "shown (sampled separately)"
    if tol is None:
        ok = abs(mine - theirs) < 1e-6 * max(1.0, abs(theirs)) + 0.5
    elif relative:
        ok = abs(mine - theirs) <= tol * max(abs(theirs), 1.0)
    else:
        ok = abs(mine - theirs) <= tol
    return "agrees" if ok else "DIFFERS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to load and compare")
    ap.add_argument("--seconds", type=float, default=25.0, help="length of each workload")
    ap.add_argument("--no-workloads", action="store_true", help="only compare fields (no torch needed)")
    ap.add_argument(
        "--simulate", action="store_true", help="dry run of this script on a simulated GPU (no smi)"
    )
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    smi = None if args.simulate else shutil.which("nvidia-smi")
    lib = None
    if args.simulate:
        from gpufleet.agent.simulator import SimulatedNVML

        lib = SimulatedNVML(args.gpu + 1, seed=1, workload="busy")
        args.no_workloads = True
    src = GpuSource(Nvml(lib), "verify", watch_events=False, background=False, slow_interval=0.0)
    src.start()
    gpu = next(g for g in src.gpus if g.index == args.gpu)
    src.collect()
    time.sleep(1.0)
    fams = src.collect()
    xml = smi_xml(smi, args.gpu) if smi else None
    query_fields = (
        "index,uuid,name,driver_version,pci.bus_id,serial,utilization.gpu,memory.used,memory.total,"
        "temperature.gpu,power.draw,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current"
    )
    query = (
        subprocess.run(
            [smi, f"--query-gpu={query_fields}", "--format=csv,noheader,nounits", "-i", str(args.gpu)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        if smi
        else ""
    )

    values = {
        (f.name, tuple(v for k, v in sorted(lab.items()) if k in ("reason", "type", "scope", "cause"))): v
        for f in fams
        for lab, v in f.samples
        if lab.get("gpu") == str(args.gpu)
    }

    def ours(name, key):
        # our label order is the row's; the lookup above sorted label names, so rebuild from the row
        row = next((r for r in FIELDS if r.name == name), None)
        if row is None or not row.labels:
            return values.get((name, ()))
        want = dict(zip(row.labels, key, strict=True))
        return values.get((name, tuple(want[k] for k in sorted(want))))

    rows = []
    for f in FIELDS:
        if f.per_link:  # off by default (--nvlink-per-link); bench/nvlink_verify.py checks them
            continue
        keys = list(f.read) if isinstance(f.read, dict) else [()]
        for key in keys:
            v = ours(f.name, key)
            cmp = COMPARE.get((f.name, key))
            smi_text = first(xml, *cmp[0]) if (cmp and xml is not None) else None
            verdict = (
                compare(v, smi_text, cmp[1], cmp[2], cmp[3])
                if cmp
                else ("unsupported on this GPU" if v is None else "read (no nvidia-smi twin)")
            )
            if f.name == "gpufleet_gpu_clock_event_active" and xml is not None:
                reasons = smi_reasons(xml) or {}
                smi_text = {1.0: "Active", 0.0: "Not Active"}.get(reasons.get(key[0]))
                verdict = "agrees" if reasons.get(key[0]) == v else "DIFFERS" if v is not None else verdict
            rows.append(
                {
                    "series": f.name + (f"{{{','.join(key)}}}" if key else ""),
                    "unit": f.unit,
                    "gpufleet": v,
                    "nvidia_smi": smi_text,
                    "verdict": verdict,
                    "slow": f.slow,
                }
            )
    for g in GPM_FIELDS:
        v = values.get((g.name, ()))
        rows.append(
            {
                "series": g.name,
                "unit": g.unit,
                "gpufleet": v,
                "nvidia_smi": None,
                "verdict": "unsupported on this GPU" if v is None else "read (GPM, no nvidia-smi twin)",
                "slow": False,
            }
        )

    result: dict = {
        "gpu": {"index": gpu.index, "uuid": gpu.uuid, "model": gpu.model, "driver": src.driver},
        "nvidia_smi_query": {"fields": query_fields, "answer": query},
        "fields": rows,
    }
    if not args.no_workloads:
        import torch  # noqa: F401  (fail early with a clear ImportError if torch is missing)

        cuda_index = args.gpu  # CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA order NVML's
        result["matmul_bf16"] = run_workload("matmul", cuda_index, args.seconds, src, args.gpu)
        time.sleep(3)
        result["spin_one_thread"] = run_workload("spin", cuda_index, args.seconds, src, args.gpu)
        m, s = result["matmul_bf16"], result["spin_one_thread"]
        result["checks"] = {
            "matmul: sm_active >= 0.8": m.get("gpufleet_gpu_sm_active_ratio", 0) >= 0.8,
            "matmul: tensor_active >= 0.6": m.get("gpufleet_gpu_tensor_active_ratio", 0) >= 0.6,
            "spin: utilization >= 0.9": s.get("gpufleet_gpu_utilization_ratio", 0) >= 0.9,
            "spin: sm_active <= 0.05": s.get("gpufleet_gpu_sm_active_ratio", 1) <= 0.05,
        }
    src.close()

    (out / "gpu_verify.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"GPU {gpu.index}: {gpu.model} ({gpu.uuid}), driver {src.driver}",
        "",
        f"nvidia-smi --query-gpu={query_fields}: `{query}`",
        "",
        "| series | unit | gpufleet | nvidia-smi -q | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        val = "—" if r["gpufleet"] is None else f"{r['gpufleet']:.6g}"
        md.append(
            f"| {r['series']}{' (slow)' if r['slow'] else ''} | {r['unit']} | {val} | "
            f"{r['nvidia_smi'] or '—'} | {r['verdict']} |"
        )
    if "checks" in result:
        md += [
            "",
            "| workload | utilization | SM active | tensor active | SM occupancy | DRAM active | power W |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in ("matmul_bf16", "spin_one_thread"):
            w = result[name]
            md.append(
                f"| {name} | "
                + " | ".join(
                    str(w.get(k, "—"))
                    for k in (
                        "gpufleet_gpu_utilization_ratio",
                        "gpufleet_gpu_sm_active_ratio",
                        "gpufleet_gpu_tensor_active_ratio",
                        "gpufleet_gpu_sm_occupancy_ratio",
                        "gpufleet_gpu_dram_active_ratio",
                        "gpufleet_gpu_power_watts",
                    )
                )
                + " |"
            )
        md += [""] + [f"* {k}: {'PASS' if v else 'FAIL'}" for k, v in result["checks"].items()]
    (out / "gpu_verify.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
