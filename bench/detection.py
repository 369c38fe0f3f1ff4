"""Detection benchmark: labelled fleet traces through `gpufleet alerts backtest`.

A fleet of simulated nodes (8 GPUs each) runs through the agent's own code path — ``SimulatedNVML`` behind
the NVML gateway, ``GpuSource`` and the agent's sampling loop — on an injected clock, so hours of fleet
time take a minute. Half the nodes run multi-GPU training jobs (the peers of the straggler rule), half run
a mix of inference, training and idle phases that change every 1–10 minutes (the realistic load changes the
clean trace must stay quiet through).

Faults of each kind the rule pack covers are injected at known times, on distinct GPUs: through the
simulator where it models the fault (XIDs, a GPU falling off the bus, uncorrectable ECC, thermal slowdown,
power brake, hardware slowdown, a job holding memory while idle, PCIe replays: a slow background and
bursts on a bad link), and into the trace where it does not (a straggler's SM activity at 35 % of its own,
a steady memory leak, a node whose agent stops, a GPU that vanishes from its node's inventory). Both traces are written as OpenMetrics text
with timestamps and replayed by ``python -m gpufleet.cli alerts backtest``; its JSON lines are matched to
the faults.

Printed per fault kind: recall, detection delay (first notification − fault start), and false
notifications per 1,000 GPU-hours on the clean trace (by severity; "critical" are pages).

    python bench/detection.py [--hours 3] [--clean-hours 8] [--interval 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpufleet.agent.attribution import DeviceLabels  # noqa: E402
from gpufleet.agent.core import Agent  # noqa: E402
from gpufleet.agent.fields import FI_PCIE_REPLAY_COUNTER, FIELDS, FieldValue  # noqa: E402
from gpufleet.agent.nvml import Nvml  # noqa: E402
from gpufleet.agent.simulator import SimulatedNVML  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource  # noqa: E402

GPUS_PER_NODE = 8
# The agent's row for NVML's PCIe replay counter: the trace carries whatever name the agent exports.
PCIE_REPLAYS = next(f.name for f in FIELDS if f.sources() == [FieldValue(FI_PCIE_REPLAY_COUNTER)])
KEEP = {  # the families the rule pack reads (the rest of the agent's output is left out of the trace)
    "gpufleet_gpu_up",
    "gpufleet_gpu_xid_errors_total",
    "gpufleet_gpu_ecc_errors_total",
    "gpufleet_gpu_clock_event_active",
    "gpufleet_gpu_temperature_celsius",
    "gpufleet_gpu_slowdown_temperature_celsius",
    "gpufleet_gpu_sm_active_ratio",
    "gpufleet_gpu_memory_used_bytes",
    "gpufleet_gpu_memory_total_bytes",
    "gpufleet_agent_source_success",
    PCIE_REPLAYS,
}
REASONS = {"hw_thermal", "hw_power_brake", "hw_slowdown"}

# kind -> (alerts that detect it, class, duration s, how many per 8 nodes), each fault on its own GPU
KINDS = {
    "xid_critical": ({"GpuXidCritical"}, "hardware event", 0, 6),
    "fell_off_bus": ({"GpuFellOffBus", "GpuLost"}, "hardware event", 600, 3),
    "ecc_uncorrectable": ({"GpuEccUncorrectable"}, "hardware event", 0, 4),
    "app_xid": ({"GpuXidApplication"}, "application event", 0, 3),
    "thermal_slowdown": ({"GpuHardwareThermalSlowdown", "GpuTemperatureNearSlowdown"}, "throttling", 600, 5),
    "power_brake": ({"GpuPowerBrake"}, "throttling", 300, 4),
    "hw_slowdown": ({"GpuHardwareSlowdown"}, "throttling", 300, 4),
    "idle_allocated": ({"GpuIdleHoldingMemory"}, "idle-allocated", 900, 5),
    "straggler": ({"GpuStraggler"}, "straggler", 600, 6),
    "memory_leak": ({"GpuMemoryLeak"}, "trend", 3000, 3),
    "pcie_replay_burst": ({"GpuPcieReplayRate"}, "anomaly", 600, 3),
    "gpu_missing": ({"GpuMissingFromInventory"}, "stale", None, 1),
    "node_stale": ({"NodeTelemetryStale"}, "stale", 600, 1),
}
SIM_FAULT = {
    "thermal_slowdown": "thermal",
    "power_brake": "power_brake",
    "hw_slowdown": "hw_slowdown",
    "idle_allocated": "idle_memory",
}
CRITICAL_XIDS = [48, 62, 64, 74, 94, 95, 119, 120]
APP_XIDS = [13, 31, 43, 45, 68]


@dataclass
class Fault:
    kind: str
    node: str
    gpu: int
    uuid: str
    start: float
    end: float
    xid: int | None = None


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Node:
    def __init__(self, name: str, index: int, clock: Clock, seed: int, busy: bool, job: str | None) -> None:
        self.name = name
        self.sim = SimulatedNVML(GPUS_PER_NODE, clock=clock, seed=seed, workload="busy" if busy else "mixed")
        self.nvml = Nvml(self.sim)
        self.attribution = (
            (lambda uuid, job=job, name=name: {"job": job, "pod": f"{job}-{name}"})
            if job
            else (lambda uuid, name=name: {"pod": f"svc-{name}"})
        )
        # Slow rows (the PCIe replay counter) are read inline on the injected clock: a background reader
        # would wait in wall-clock seconds while the trace races through hours.
        self.source = GpuSource(self.nvml, name, cluster="bench", background=False, clock=clock)
        self.agent = Agent([self.source], node=name, clock=clock, enrichers=[DeviceLabels(self.attribution)])

    def start(self) -> None:
        self.source.start()

    def uuids(self) -> list[str]:
        return [g.uuid for g in self.source.gpus]

    def xid_count(self, uuid: str, xid: int) -> float:
        for fam in self.source.collect():
            if fam.name == "gpufleet_gpu_xid_errors_total":
                for labels, v in fam.samples:
                    if labels["uuid"] == uuid and labels["xid"] == str(xid):
                        return v
        return 0.0


def plan_faults(nodes: list[Node], hours: float, rng: random.Random, t0: float) -> list[Fault]:
    end = t0 + hours * 3600
    faults: list[Fault] = []
    busy = [(n, i) for n in nodes[: len(nodes) // 2] for i in range(GPUS_PER_NODE)]
    mixed = [(n, i) for n in nodes[len(nodes) // 2 : -1] for i in range(GPUS_PER_NODE)]
    rng.shuffle(busy)
    rng.shuffle(mixed)
    missing_node = nodes[-2]
    mixed = [(n, i) for n, i in mixed if not (n is missing_node and i == GPUS_PER_NODE - 1)]
    pool = busy[12:] + mixed  # the first 12 busy GPUs are kept for stragglers
    rng.shuffle(pool)
    stragglers = busy[:12]
    scale = max(1, len(nodes) // 8)
    for kind, (_, _, duration, count) in KINDS.items():
        scale_k = 1 if kind in ("gpu_missing", "node_stale") else scale
        for _ in range(count * scale_k):
            if kind == "node_stale":
                n, i = nodes[-1], 0
            elif kind == "gpu_missing":
                n, i = missing_node, GPUS_PER_NODE - 1
            elif kind == "straggler":
                n, i = stragglers.pop()
            else:
                n, i = pool.pop()
            span = duration or 0
            start = rng.uniform(t0 + 1800, end - max(span, 600) - 600)
            if kind == "memory_leak":
                start = rng.uniform(t0 + 1800, end - 3000)
            fend = end if duration is None else start + span
            xid = (
                rng.choice(CRITICAL_XIDS)
                if kind == "xid_critical"
                else rng.choice(APP_XIDS)
                if kind == "app_xid"
                else None
            )
            faults.append(Fault(kind, n.name, i, n.uuids()[i], start, fend, xid))
    return sorted(faults, key=lambda f: f.start)


def build_trace(
    path: Path,
    nodes: list[Node],
    clock: Clock,
    t0: float,
    hours: float,
    interval: float,
    faults: list[Fault],
    seed: int,
) -> int:
    rng = random.Random(seed)
    series: dict[tuple[str, tuple], list[tuple[float, float]]] = defaultdict(list)
    kinds: dict[str, str] = {}
    started: set[int] = set()
    ended: set[int] = set()
    by_node = {n.name: n for n in nodes}
    steps = int(hours * 3600 / interval)
    for k in range(steps + 1):
        t = t0 + k * interval
        # faults the simulator models start (and lost GPUs recover) between two samples, like real ones
        for idx, f in enumerate(faults):
            node = by_node[f.node]
            if idx not in started and f.start <= t:
                started.add(idx)
                clock.t = f.start
                if f.kind in SIM_FAULT:
                    node.sim.inject(f.gpu, SIM_FAULT[f.kind], duration=f.end - f.start)
                elif f.kind in ("xid_critical", "app_xid", "fell_off_bus"):
                    xid = 79 if f.kind == "fell_off_bus" else f.xid
                    before = node.xid_count(f.uuid, xid)
                    node.sim.inject(f.gpu, "lost" if f.kind == "fell_off_bus" else "xid", xid=xid)
                    deadline = time.monotonic() + 5
                    while node.xid_count(f.uuid, xid) <= before and time.monotonic() < deadline:
                        time.sleep(0.005)  # the agent's NVML event thread counts it
                elif f.kind == "ecc_uncorrectable":
                    node.sim.inject(f.gpu, "ecc")
            if f.kind == "fell_off_bus" and idx in started and idx not in ended and f.end <= t:
                ended.add(idx)
                clock.t = f.end
                node.sim.inject(f.gpu, "recover")
        clock.t = t
        for node in nodes:
            for g in node.source.gpus:  # PCIe replays: a slow background, and bursts on a bad link
                burst = any(
                    f.kind == "pcie_replay_burst" and f.uuid == g.uuid and f.start <= t < f.end
                    for f in faults
                )
                replays = _poisson(rng, (2.0 if burst else 0.005) * interval)
                if replays:
                    node.sim.inject(g.index, "pcie_replay", count=replays)
            snap = node.agent.sample()
            if any(f.kind == "node_stale" and f.node == node.name and f.start <= t < f.end for f in faults):
                continue  # the agent is down: nothing reaches the collector
            for fam in snap.families:
                if fam.name not in KEEP:
                    continue
                kinds[fam.name] = fam.kind
                for labels, value in fam.samples:
                    if fam.name == "gpufleet_gpu_clock_event_active" and labels.get("reason") not in REASONS:
                        continue
                    if fam.name == "gpufleet_gpu_ecc_errors_total" and labels.get("scope") != "volatile":
                        continue
                    uuid = labels.get("uuid")
                    value = _trace_faults(fam.name, uuid, t, value, faults)
                    if value is None:
                        continue
                    series[(fam.name, tuple(sorted(labels.items())))].append((t, value))
    n = 0
    with open(path, "w") as out:
        by_family: dict[str, list] = defaultdict(list)
        for (name, labels), pts in series.items():
            by_family[name].append((labels, pts))
        for name, items in by_family.items():
            kind = kinds[name]
            family = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
            out.write(f"# TYPE {family} {kind}\n")
            for labels, pts in items:
                lab = ",".join(f'{k}="{v}"' for k, v in labels)
                for t, v in pts:
                    out.write(f"{name}{{{lab}}} {v:.10g} {t:.3f}\n")
                    n += 1
        out.write("# EOF\n")
    return n


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 30:
        return max(0, round(rng.gauss(lam, lam**0.5)))
    k, p, limit = 0, 1.0, pow(2.718281828459045, -lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _trace_faults(name: str, uuid: str | None, t: float, value: float, faults: list[Fault]) -> float | None:
    for f in faults:
        if f.uuid != uuid:
            continue
        if f.kind == "gpu_missing" and t >= f.start:
            return None
        if not f.start <= t < f.end:
            continue
        if f.kind == "straggler" and name == "gpufleet_gpu_sm_active_ratio":
            return value * 0.35
        if f.kind == "memory_leak" and name == "gpufleet_gpu_memory_used_bytes":
            return min(value + 30 * (1 << 30) * (t - f.start) / 3600, 80 * (1 << 30) - (1 << 28))
    return value


def backtest(trace: Path) -> list[dict]:
    r = subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "alerts", "backtest", str(trace)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    trace.with_suffix(".notifications.jsonl").write_text(r.stdout)
    return [json.loads(line) for line in r.stdout.splitlines()]


def make_fleet(n_nodes: int, clock: Clock, seed: int) -> list[Node]:
    nodes = []
    for i in range(n_nodes):
        busy = i < n_nodes // 2
        job = f"train-{chr(ord('a') + i // 2)}" if busy else None
        nodes.append(Node(f"node-{i:02d}", i, clock, seed * 100 + i, busy, job))
    for n in nodes:
        n.start()
    return nodes


def score(faults: list[Fault], notes: list[dict], interval: float) -> tuple[dict, list[dict]]:
    firing = [x for x in notes if x["state"] == "firing" and not x.get("repeat")]
    per_kind: dict[str, dict] = {}
    explained: set[int] = set()
    for f in faults:
        alerts = KINDS[f.kind][0]
        hits = []
        for i, x in enumerate(firing):
            lab = x["labels"]
            same = lab.get("node") == f.node if f.kind == "node_stale" else lab.get("uuid") == f.uuid
            if same and x["alert"] in alerts and f.start <= x["at"] <= f.end + 180:
                hits.append(x["at"] - f.start)
                explained.add(i)
        for i, x in enumerate(
            firing
        ):  # whatever else a fault sets off on its GPU is not a false alarm either
            lab = x["labels"]
            if (
                lab.get("uuid") == f.uuid or (f.kind == "node_stale" and lab.get("node") == f.node)
            ) and f.start - interval <= x["at"] <= f.end + 600:
                explained.add(i)
        k = per_kind.setdefault(f.kind, {"class": KINDS[f.kind][1], "faults": 0, "detected": 0, "delays": []})
        k["faults"] += 1
        if hits:
            k["detected"] += 1
            k["delays"].append(min(hits))
    unexplained = [x for i, x in enumerate(firing) if i not in explained]
    return per_kind, unexplained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--hours", type=float, default=3.0, help="simulated hours of the fault trace")
    ap.add_argument("--clean-hours", type=float, default=8.0, help="simulated hours of the clean trace")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.ERROR
    )  # the agent logs each injected XID and lost GPU; the table says it
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    gpus = args.nodes * GPUS_PER_NODE

    w0 = time.perf_counter()
    clock = Clock(t0)
    nodes = make_fleet(args.nodes, clock, args.seed)
    faults = plan_faults(nodes, args.hours, random.Random(args.seed), t0)
    fault_trace = args.out / "fault-trace.om"
    n_fault = build_trace(fault_trace, nodes, clock, t0, args.hours, args.interval, faults, args.seed)
    for n in nodes:
        n.source.close()
    clock2 = Clock(t0)
    clean_nodes = make_fleet(args.nodes, clock2, args.seed + 1)
    clean_trace = args.out / "clean-trace.om"
    n_clean = build_trace(
        clean_trace, clean_nodes, clock2, t0, args.clean_hours, args.interval, [], args.seed + 1
    )
    for n in clean_nodes:
        n.source.close()
    w1 = time.perf_counter()
    fault_notes = backtest(fault_trace)
    w2 = time.perf_counter()
    clean_notes = backtest(clean_trace)
    w3 = time.perf_counter()

    per_kind, unexplained = score(faults, fault_notes, args.interval)
    clean_firing = [x for x in clean_notes if x["state"] == "firing" and not x.get("repeat")]
    clean_gpu_hours = gpus * args.clean_hours
    fault_gpu_hours = gpus * args.hours
    by_sev = defaultdict(int)
    for x in clean_firing:
        by_sev[x["labels"].get("severity", "?")] += 1
    unexplained_sev = defaultdict(int)
    for x in unexplained:
        unexplained_sev[x["labels"].get("severity", "?")] += 1

    rows = []
    for kind, k in sorted(per_kind.items(), key=lambda kv: list(KINDS).index(kv[0])):
        d = k["delays"]
        rows.append(
            {
                "kind": kind,
                "class": k["class"],
                "faults": k["faults"],
                "detected": k["detected"],
                "recall": k["detected"] / k["faults"],
                "delay_median_s": statistics.median(d) if d else None,
                "delay_max_s": max(d) if d else None,
            }
        )
    result = {
        "fleet": {
            "nodes": args.nodes,
            "gpus": gpus,
            "interval_s": args.interval,
            "fault_hours": args.hours,
            "clean_hours": args.clean_hours,
            "fault_trace_samples": n_fault,
            "clean_trace_samples": n_clean,
        },
        "per_kind": rows,
        "clean": {
            "gpu_hours": clean_gpu_hours,
            "firing_by_severity": dict(by_sev),
            "per_1000_gpu_hours": {s: v * 1000 / clean_gpu_hours for s, v in by_sev.items()},
            "alerts": sorted({x["alert"] for x in clean_firing}),
        },
        "fault_trace_unexplained": {
            "gpu_hours": fault_gpu_hours,
            "by_severity": dict(unexplained_sev),
            "alerts": sorted({x["alert"] for x in unexplained}),
        },
        "wall_s": {
            "generate": round(w1 - w0, 1),
            "backtest_fault": round(w2 - w1, 1),
            "backtest_clean": round(w3 - w2, 1),
            "replay_speedup_vs_real_time": round(args.hours * 3600 / max(w2 - w1, 1e-9)),
        },
    }
    (args.out / "detection.json").write_text(json.dumps(result, indent=2))
    (args.out / "faults.json").write_text(json.dumps([f.__dict__ for f in faults], indent=1))
    lines = [
        f"Fleet: {gpus} GPUs ({args.nodes} nodes), sample interval {args.interval:g} s; fault trace "
        f"{args.hours:g} h ({n_fault:,} samples), clean trace {args.clean_hours:g} h ({n_clean:,} samples)",
        "",
        "| fault kind | class | faults | recall | delay median (s) | delay max (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        med = "-" if r["delay_median_s"] is None else f"{r['delay_median_s']:.0f}"
        mx = "-" if r["delay_max_s"] is None else f"{r['delay_max_s']:.0f}"
        lines.append(f"| {r['kind']} | {r['class']} | {r['faults']} | {r['recall']:.2f} | {med} | {mx} |")
    lines += [
        "",
        f"Clean trace ({clean_gpu_hours:g} GPU-hours): false notifications per 1,000 GPU-hours: "
        + (", ".join(f"{s} {v * 1000 / clean_gpu_hours:.2f}" for s, v in sorted(by_sev.items())) or "none")
        + f" (critical pages: {by_sev.get('critical', 0) * 1000 / clean_gpu_hours:.2f})",
        f"Fault trace: notifications no injected fault explains: {dict(unexplained_sev) or 'none'} "
        f"{sorted({x['alert'] for x in unexplained})}",
        f"Wall time: generate {w1 - w0:.0f} s, backtest {w2 - w1:.0f} s + {w3 - w2:.0f} s "
        f"({result['wall_s']['replay_speedup_vs_real_time']}x real time)",
    ]
    text = "\n".join(lines)
    (args.out / "detection.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
