"""What the agent costs a GPU node, measured in one process against the same GPUs.

* one full sample of every GPU (every fast row, GPM, MIG, the cached slow rows) versus one
  ``nvidia-smi --query-gpu`` call asking for the same fields (what nvidia_gpu_exporter runs per scrape),
  as a ratio; the slow-row refresh is timed too and shown per second at its cadence;
* the running agent's CPU share at 1 Hz over ``--seconds`` (sampler, slow reader, event thread,
  /metrics server scraped every 5 s), as a share of one core;
* the process's resident memory after that run.

Real GPUs:        python3 bench/agent_cost.py
Without a GPU:    python3 bench/agent_cost.py --simulate 8
Results go to $OUT (default ./out) as agent_cost.json and agent_cost.md. Goals: >= 50x cheaper than
nvidia-smi per sample, < 0.5 % of a core at 1 Hz, < 80 MiB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from gpufleet.agent.main import AgentSettings, start_agent  # noqa: E402
from gpufleet.agent.nvml import Nvml  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource  # noqa: E402

# The same fields the agent reads every sample, as nvidia-smi names them (filtered by --help-query-gpu).
SMI_FIELDS = [
    "index",
    "uuid",
    "name",
    "utilization.gpu",
    "utilization.memory",
    "utilization.encoder",
    "utilization.decoder",
    "memory.used",
    "memory.free",
    "memory.total",
    "memory.reserved",
    "temperature.gpu",
    "temperature.memory",
    "power.draw",
    "power.limit",
    "enforced.power.limit",
    "clocks.sm",
    "clocks.mem",
    "clocks_event_reasons.active",
    "clocks_throttle_reasons.active",
    "ecc.errors.corrected.volatile.total",
    "ecc.errors.uncorrected.volatile.total",
    "ecc.errors.corrected.aggregate.total",
    "ecc.errors.uncorrected.aggregate.total",
    "pcie.link.gen.gpucurrent",
    "pcie.link.gen.current",
    "pcie.link.width.current",
    "mig.mode.current",
]


def smi_fields(smi: str) -> list[str]:
    helptext = subprocess.run([smi, "--help-query-gpu"], capture_output=True, text=True, timeout=60).stdout
    known = [f for f in SMI_FIELDS if f'"{f}"' in helptext]
    # one of the two names of the throttle reasons is enough
    if "clocks_event_reasons.active" in known and "clocks_throttle_reasons.active" in known:
        known.remove("clocks_throttle_reasons.active")
    if "pcie.link.gen.gpucurrent" in known and "pcie.link.gen.current" in known:
        known.remove("pcie.link.gen.current")
    return known


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", type=int, default=0, help="simulate N GPUs instead of real NVML")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the 1 Hz CPU-share run")
    ap.add_argument("--samples", type=int, default=200, help="samples timed for the per-sample cost")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    proc = psutil.Process()
    result: dict = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} CPUs)",
        "python": platform.python_version(),
        "mode": f"simulated x{args.simulate}" if args.simulate else "real NVML",
    }

    # ---- 1. the 1 Hz agent: CPU share and RSS (first, so the timing loops below do not inflate RSS) ----------
    port = free_port()
    agent = start_agent(
        AgentSettings(listen=f"127.0.0.1:{port}", simulate=args.simulate, interval=1.0, node="bench", seed=1)
    )
    gpus = agent.agent.sources[0].gpus if agent.agent.sources else []
    result["gpus"] = len(gpus)
    result["model"] = gpus[0].model if gpus else ""
    time.sleep(2.0)  # first samples, GPM pairs, slow reader started
    scrapes = 0
    cpu0, wall0 = proc.cpu_times(), time.monotonic()
    while time.monotonic() - wall0 < args.seconds:
        time.sleep(5.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            resp.read()
        scrapes += 1
    cpu1, wall1 = proc.cpu_times(), time.monotonic()
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    result["cpu_share_of_one_core_percent"] = round(100 * cpu_s / (wall1 - wall0), 3)
    result["cpu_run_seconds"] = round(wall1 - wall0, 1)
    result["samples_in_run"] = agent.agent.samples_taken
    result["scrapes_in_run"] = scrapes
    result["rss_mib"] = round(proc.memory_info().rss / 2**20, 1)
    agent.stop()

    # ---- 2. one full sample vs one nvidia-smi call with the same fields --------------------------------------
    if args.simulate:
        from gpufleet.agent.simulator import SimulatedNVML

        lib = SimulatedNVML(args.simulate, seed=1, workload="busy")
    else:
        lib = None
    src = GpuSource(Nvml(lib), "bench", watch_events=False, background=False, slow_interval=1e9)
    src.start()
    for _ in range(3):
        src.collect()
    sample_ms = median_ms(src.collect, args.samples)
    slow_ms = median_ms(src.refresh_slow, 5)
    src.close()
    result["agent_sample_ms"] = round(sample_ms, 4)
    result["agent_sample_ms_per_gpu"] = round(sample_ms / max(1, len(src.gpus)), 4)
    result["slow_refresh_ms"] = round(slow_ms, 3)
    result["slow_refresh_ms_per_second_at_10s"] = round(slow_ms / 10, 4)
    smi = shutil.which("nvidia-smi")
    if smi and not args.simulate:
        fields = smi_fields(smi)
        cmd = [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        subprocess.run(cmd, capture_output=True, check=True, timeout=60)
        smi_ms = median_ms(lambda: subprocess.run(cmd, capture_output=True, check=True, timeout=60), 15)
        result["baseline"] = "nvidia-smi --query-gpu (same fields)"
        result["baseline_fields"] = fields
        result["baseline_ms"] = round(smi_ms, 3)
    else:
        # No nvidia-smi here: the floor any per-scrape nvidia-smi exporter pays is one process spawn.
        true = shutil.which("true") or "/bin/true"
        smi_ms = median_ms(lambda: subprocess.run([true], check=True), 30)
        result["baseline"] = (
            "process spawn of /bin/true (lower bound of any nvidia-smi call; no nvidia-smi here)"
        )
        result["baseline_ms"] = round(smi_ms, 3)
    result["ratio_baseline_over_agent_sample"] = round(smi_ms / sample_ms, 1)
    result["goals"] = {
        "ratio >= 50 (vs nvidia-smi)": (result["ratio_baseline_over_agent_sample"] >= 50)
        if "nvidia-smi" in result["baseline"].split(" (")[0]
        else None,
        "cpu < 0.5 % of a core": result["cpu_share_of_one_core_percent"] < 0.5,
        "rss < 80 MiB": result["rss_mib"] < 80,
    }

    (out / "agent_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"Agent cost — {result['mode']}, {result['gpus']} GPU(s) {result['model']}, on {result['machine']}",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| one full agent sample (all GPUs, median of {args.samples}) | {result['agent_sample_ms']} ms "
        f"({result['agent_sample_ms_per_gpu']} ms per GPU) |",
        f"| baseline: {result['baseline']} (median) | {result['baseline_ms']} ms |",
        f"| ratio baseline / agent sample | {result['ratio_baseline_over_agent_sample']}x |",
        f"| slow-row refresh (every 10 s, off the sampling path) | {result['slow_refresh_ms']} ms |",
        f"| agent CPU at 1 Hz over {result['cpu_run_seconds']} s ({result['scrapes_in_run']} scrapes) | "
        f"{result['cpu_share_of_one_core_percent']} % of one core |",
        f"| process RSS after the run | {result['rss_mib']} MiB |",
        "",
        "Goals: "
        + ", ".join(
            f"{k}: {'n/a' if v is None else 'met' if v else 'NOT met'}" for k, v in result["goals"].items()
        ),
    ]
    (out / "agent_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
