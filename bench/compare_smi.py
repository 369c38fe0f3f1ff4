"""Compare the agent's /metrics with `nvidia-smi --query-gpu` taken at the same moments, idle and under load.

Run on a machine with NVIDIA GPUs, from the repository root:

    OUT=out python3 bench/compare_smi.py [--seconds 20]

Starts `gpufleet agent` (real NVML) on a private port, reads /metrics and nvidia-smi side by side while the
GPUs idle and while a bf16 matrix-product loop (PyTorch) keeps GPU 0 busy, and writes
$OUT/compare_smi.md and $OUT/compare_smi.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMI_FIELDS = [
    "uuid",
    "utilization.gpu",
    "utilization.memory",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
    "clocks.sm",
]
# nvidia-smi field -> (agent metric, factor from the agent's base unit to nvidia-smi's unit)
PAIRS = {
    "utilization.gpu": ("gpufleet_gpu_utilization_ratio", 100.0),
    "utilization.memory": ("gpufleet_gpu_memory_bandwidth_utilization_ratio", 100.0),
    "memory.used": ("gpufleet_gpu_memory_used_bytes", 1 / 2**20),
    "memory.total": ("gpufleet_gpu_memory_total_bytes", 1 / 2**20),
    "temperature.gpu": ("gpufleet_gpu_temperature_celsius", 1.0),
    "power.draw": ("gpufleet_gpu_power_watts", 1.0),
    "clocks.sm": ("gpufleet_gpu_sm_clock_hertz", 1e-6),
}


def smi() -> dict[str, dict[str, float]]:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {}
    for line in out.strip().splitlines():
        vals = [v.strip() for v in line.split(",")]
        rows[vals[0]] = {
            k: float(v) for k, v in zip(SMI_FIELDS[1:], vals[1:], strict=False) if v not in ("[N/A]", "N/A")
        }
    return rows


def scrape(port: int) -> dict[str, dict[str, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    per_gpu: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or 'uuid="' not in line:
            continue
        name = line.split("{", 1)[0]
        uuid = line.split('uuid="', 1)[1].split('"', 1)[0]
        per_gpu.setdefault(uuid, {})[name] = float(line.rsplit(" ", 1)[1])
    return per_gpu


def load_worker(seconds: float) -> subprocess.Popen:
    code = (
        "import torch,time\n"
        "a=torch.randn(8192,8192,device='cuda',dtype=torch.bfloat16);b=torch.randn_like(a)\n"
        f"end=time.time()+{seconds}\n"
        "while time.time()<end:\n"
        "    for _ in range(20): c=a@b\n"
        "    torch.cuda.synchronize()\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--port", type=int, default=19445)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpufleet.cli",
            "agent",
            "--listen",
            f"127.0.0.1:{args.port}",
            "--interval",
            "0.5",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rows = []
    try:
        for _ in range(100):
            try:
                scrape(args.port)
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(2)
        for phase in ("idle", "load"):
            worker = load_worker(args.seconds + 5) if phase == "load" else None
            if worker:  # wait until the load shows (CUDA start-up takes seconds), then let power settle
                deadline = time.time() + 60
                while time.time() < deadline and all(
                    v.get("utilization.gpu", 0) < 90 for v in smi().values()
                ):
                    time.sleep(0.5)
                time.sleep(3)
            end = time.time() + args.seconds
            while time.time() < end:
                a = scrape(args.port)
                s = smi()
                for uuid, smi_vals in s.items():
                    for field, (metric, factor) in PAIRS.items():
                        if field in smi_vals and metric in a.get(uuid, {}):
                            rows.append(
                                {
                                    "phase": phase,
                                    "uuid": uuid,
                                    "field": field,
                                    "nvidia_smi": smi_vals[field],
                                    "agent": round(a[uuid][metric] * factor, 3),
                                }
                            )
                time.sleep(2)
            if worker:
                worker.wait()
    finally:
        agent.terminate()
        log = agent.communicate(timeout=10)[0]
    (out_dir / "compare_smi.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| phase | field | reads | mean nvidia-smi | mean agent | mean abs diff | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for phase in ("idle", "load"):
        for field in PAIRS:
            r = [x for x in rows if x["phase"] == phase and x["field"] == field]
            if not r:
                continue
            d = [abs(x["agent"] - x["nvidia_smi"]) for x in r]
            lines.append(
                f"| {phase} | {field} | {len(r)} | {sum(x['nvidia_smi'] for x in r) / len(r):.1f} | "
                f"{sum(x['agent'] for x in r) / len(r):.1f} | {sum(d) / len(d):.2f} | {max(d):.2f} |"
            )
    report = "\n".join(lines)
    (out_dir / "compare_smi.md").write_text(report + "\n\nagent log:\n```\n" + log[-3000:] + "\n```\n")
    print(report)
    print(log[-1500:])


if __name__ == "__main__":
    main()
