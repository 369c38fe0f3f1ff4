"""Detection benchmark: labelled fleet traces through `gpufleet alerts backtest`.

A fleet of simulated nodes (8 GPUs each) runs through the agent's own code path — ``SimulatedNVML`` behind
the NVML gateway, ``GpuSource`` and the agent's sampling loop — on an injected clock, so hours of fleet
time take a minute. Half the nodes run multi-GPU training, half run a mix of inference, training and idle
phases that change every 1–10 minutes (the realistic load changes the clean trace must stay quiet through).

No series gets a hand-made ``job`` label: each node's enrich stage is the agent's Kubernetes attribution
(``PodAttribution`` over a pod-resources answer, ``PodJobs`` reading a kubelet ``/pods`` double over HTTP
through ``KubeletPodLister``). Per four training nodes: a JobSet over two nodes, named only by its pods'
labels; one 8-GPU bare pod no label or controller names (its GPUs are peers as one pod); a one-node Kubeflow
PyTorchJob. The mixed nodes' GPUs are held by one single-GPU inference pod each.

Faults of each kind the rule pack covers are injected at known times, on distinct GPUs: through the
simulator where it models the fault (XIDs, a GPU falling off the bus, uncorrectable ECC, thermal slowdown,
power brake, hardware slowdown, a job holding memory while idle, PCIe replays: a slow background and
bursts on a bad link, an NVLink going down for ten minutes (at both GPUs of the NV18 pair it joins: the
simulator pairs GPUs 0-1, 2-3, ...), an NVLink replaying in a burst, a straggler at half the SM activity of its peers in the bare pod and in the two-node
JobSet, starting right after a sample so that its delay is the rule's own: ``for:`` plus one evaluation),
and into the trace where it does not (a straggler's SM activity at 35 % of its own,
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
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpufleet.agent.attribution import DeviceLabels, PodAttribution, PodJobs  # noqa: E402
from gpufleet.agent.core import Agent  # noqa: E402
from gpufleet.agent.fields import FI_PCIE_REPLAY_COUNTER, FIELDS, FieldValue  # noqa: E402
from gpufleet.agent.inference.config import Kubernetes  # noqa: E402
from gpufleet.agent.inference.discovery import KubeletPodLister  # noqa: E402
from gpufleet.agent.nvml import Nvml  # noqa: E402
from gpufleet.agent.podresources import (  # noqa: E402
    ContainerDevices,
    ContainerResources,
    ListPodResourcesResponse,
    PodResources,
)
from gpufleet.agent.simulator import SimulatedNVML  # noqa: E402
from gpufleet.agent.sources.gpu import GpuSource  # noqa: E402
from gpufleet.collector.rules.model import default_rules_path, load_pack  # noqa: E402

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
    "gpufleet_gpu_nvlink_errors_total",
    "gpufleet_gpu_nvlink_links",
    "gpufleet_gpu_nvlink_links_up",
    "gpufleet_gpu_info",  # its mig_mode: GpuNvlinkDown leaves GPUs in MIG mode out
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
    "straggler_pod": ({"GpuStraggler"}, "straggler, 8-GPU pod, no job", 2400, 2),
    "straggler_job": ({"GpuStraggler"}, "straggler, job on 2 nodes", 2400, 2),
    "memory_leak": ({"GpuMemoryLeak"}, "trend", 3000, 3),
    "pcie_replay_burst": ({"GpuPcieReplayRate"}, "anomaly", 600, 3),
    "nvlink_down": ({"GpuNvlinkDown"}, "NVLink link down", 600, 2),
    "nvlink_replay_burst": ({"GpuNvlinkErrors"}, "NVLink errors", 600, 2),
    "gpu_missing": ({"GpuMissingFromInventory"}, "stale", None, 1),
    "node_stale": ({"NodeTelemetryStale"}, "stale", 600, 1),
}
SIM_FAULT = {
    "thermal_slowdown": "thermal",
    "power_brake": "power_brake",
    "hw_slowdown": "hw_slowdown",
    "idle_allocated": "idle_memory",
    "straggler_pod": "straggler",
    "straggler_job": "straggler",
    "nvlink_down": "nvlink_down",
    "nvlink_replay_burst": "nvlink_replay",
}
# Faults of a link between two GPUs: the other end of the link (the GPU's pair) alerts too.
LINK_FAULTS = {"nvlink_down"}
# Faults that start right after a sample: the first sample after them shows a whole interval of the fault.
ALIGNED = {"straggler_pod", "straggler_job"}
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
    peer: str | None = None  # the GPU at the link's other end, for a link fault


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Pod:
    """A pod holding GPUs of one node, as pod-resources and the kubelet's /pods tell it."""

    name: str
    namespace: str
    gpus: tuple[int, ...]
    labels: dict[str, str]
    owner: tuple[str, str] | None = None  # (kind, name) of its controller

    def item(self) -> dict:
        meta: dict = {"name": self.name, "namespace": self.namespace, "labels": self.labels}
        if self.owner is not None:
            meta["ownerReferences"] = [{"kind": self.owner[0], "name": self.owner[1], "controller": True}]
        return {"metadata": meta, "status": {"phase": "Running"}}


def workload(index: int, n_nodes: int) -> tuple[str, list[Pod]]:
    """What node ``index`` runs: (kind, its pods). Per four training nodes a JobSet over two nodes, a bare
    8-GPU pod and a one-node PyTorchJob; the mixed nodes one single-GPU inference pod per GPU."""
    every = tuple(range(GPUS_PER_NODE))
    if index >= n_nodes // 2:
        pods = []
        for g in every:
            name, rs = f"svc-{index:02d}-{g}", f"svc-{index:02d}-{g}-5c8d7f9b6"
            labels = {"app.kubernetes.io/name": "vllm", "pod-template-hash": "5c8d7f9b6"}
            pods.append(Pod(f"{rs}-x{g}", "serving", (g,), {**labels, "app": name}, ("ReplicaSet", rs)))
        return "mixed", pods
    slot, k = index % 4, index // 4
    if slot in (0, 1):
        child = f"pretrain-{k}-workers-0"
        labels = {
            "jobset.sigs.k8s.io/jobset-name": f"pretrain-{k}",
            "jobset.sigs.k8s.io/replicatedjob-name": "workers",
            "batch.kubernetes.io/job-name": child,
            "job-name": child,
        }
        return "jobset", [Pod(f"{child}-{slot}", "ml", every, labels, ("Job", child))]
    if slot == 2:
        return "pod", [Pod(f"finetune-{k}", "research", every, {})]
    labels = {"training.kubeflow.org/job-name": f"bert-{k}", "training.kubeflow.org/replica-type": "worker"}
    return "pytorchjob", [Pod(f"bert-{k}-worker-0", "ml", every, labels, ("PyTorchJob", f"bert-{k}"))]


class Kubelets:
    """Every node's kubelet ``/pods`` on one local port: ``URL/<node>/pods`` answers that node's PodList."""

    def __init__(self) -> None:
        self.pods: dict[str, list[dict]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                node, _, rest = self.path.strip("/").partition("/")
                if rest != "pods" or node not in outer.pods:
                    self.send_error(404)
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "items": outer.pods[node]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Node:
    def __init__(
        self, name: str, index: int, clock: Clock, seed: int, n_nodes: int, kubelets: Kubelets
    ) -> None:
        self.name = name
        self.workload, self.pods = workload(index, n_nodes)
        busy = self.workload != "mixed"
        self.sim = SimulatedNVML(GPUS_PER_NODE, clock=clock, seed=seed, workload="busy" if busy else "mixed")
        self.nvml = Nvml(self.sim)
        # The agent's Kubernetes attribution as `gpufleet agent --pod-resources-socket … --kubelet …` builds it:
        # the pod-resources answer says which pod holds each GPU, the kubelet's /pods (over HTTP) its job.
        uuids = [g["uuid"] for g in self.sim.describe()]
        answer = ListPodResourcesResponse(
            pod_resources=[
                PodResources(
                    name=p.name,
                    namespace=p.namespace,
                    containers=[
                        ContainerResources(
                            name="main",
                            devices=[
                                ContainerDevices(
                                    resource_name="nvidia.com/gpu", device_ids=[uuids[g] for g in p.gpus]
                                )
                            ],
                        )
                    ],
                )
                for p in self.pods
            ]
        )
        kubelets.pods[name] = [p.item() for p in self.pods]
        kube = Kubernetes(kubelet=f"{kubelets.url}/{name}")
        lister = KubeletPodLister(kube)
        jobs = PodJobs(lister, refresh=kube.refresh, clock=clock, source=lister.url)
        self.attribution = PodAttribution(
            f"/bench/{name}/kubelet.sock", list_pods=lambda: answer, jobs=jobs.job_of, clock=clock
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


def plan_faults(
    nodes: list[Node], hours: float, rng: random.Random, t0: float, interval: float
) -> list[Fault]:
    end = t0 + hours * 3600
    faults: list[Fault] = []
    scale = max(1, len(nodes) // 8)
    busy = [(n, i) for n in nodes[: len(nodes) // 2] for i in range(GPUS_PER_NODE)]
    mixed = [(n, i) for n in nodes[len(nodes) // 2 : -1] for i in range(GPUS_PER_NODE)]
    rng.shuffle(busy)
    rng.shuffle(mixed)
    missing_node = nodes[-2]
    mixed = [(n, i) for n, i in mixed if not (n is missing_node and i == GPUS_PER_NODE - 1)]
    # GPUs kept for stragglers: of a bare pod, of a two-node JobSet, and of any training job (35 % of its
    # own SM activity, into the trace); other faults take the rest.
    in_pods = [(n, i) for n, i in busy if n.workload == "pod"]
    in_jobsets = [(n, i) for n, i in busy if n.workload == "jobset"]
    reserved = {
        "straggler_pod": in_pods[: KINDS["straggler_pod"][3] * scale],
        "straggler_job": in_jobsets[: KINDS["straggler_job"][3] * scale],
    }
    others = [g for g in busy if g not in reserved["straggler_pod"] and g not in reserved["straggler_job"]]
    stragglers = [g for g in others if g[0].workload != "pod"][: KINDS["straggler"][3] * scale]
    pool = [g for g in others if g not in stragglers] + mixed
    rng.shuffle(pool)
    for kind, (_, _, duration, count) in KINDS.items():
        scale_k = 1 if kind in ("gpu_missing", "node_stale") else scale
        for _ in range(count * scale_k):
            if kind == "node_stale":
                n, i = nodes[-1], 0
            elif kind == "gpu_missing":
                n, i = missing_node, GPUS_PER_NODE - 1
            elif kind == "straggler":
                n, i = stragglers.pop()
            elif kind in reserved:
                n, i = reserved[kind].pop()
            elif kind == "memory_leak":
                # a leak grows inside one long-running process: a training job's, not on a GPU whose mixed
                # load starts another process every few minutes
                n, i = pool.pop(max(j for j, (node, _) in enumerate(pool) if node.workload != "mixed"))
            else:
                n, i = pool.pop()
            span = duration or 0
            start = rng.uniform(t0 + 1800, end - max(span, 600) - 600)
            if kind == "memory_leak":
                start = rng.uniform(t0 + 1800, end - 3000)
            if kind in ALIGNED:
                start = t0 + math.ceil((start - t0) / interval) * interval
            fend = end if duration is None else start + span
            xid = (
                rng.choice(CRITICAL_XIDS)
                if kind == "xid_critical"
                else rng.choice(APP_XIDS)
                if kind == "app_xid"
                else None
            )
            peer = n.uuids()[i ^ 1] if kind in LINK_FAULTS else None
            faults.append(Fault(kind, n.name, i, n.uuids()[i], start, fend, xid, peer))
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


def peer_groups(nodes: list[Node]) -> dict[str, int]:
    """GPUs per peer group of the straggler rule as the agent's attribution labels them (groups of one left
    out): a job in its namespace, else a pod."""
    out: dict[str, int] = defaultdict(int)
    for n in nodes:
        for uuid in n.uuids():
            lab = n.attribution(uuid)
            if "job" in lab:
                out[f"job {lab['namespace']}/{lab['job']}"] += 1
            elif "pod" in lab:
                out[f"pod {lab['namespace']}/{lab['pod']} (no job)"] += 1
    return {k: v for k, v in sorted(out.items()) if v > 1}


def make_fleet(n_nodes: int, clock: Clock, seed: int, kubelets: Kubelets) -> list[Node]:
    nodes = [Node(f"node-{i:02d}", i, clock, seed * 100 + i, n_nodes, kubelets) for i in range(n_nodes)]
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
                lab.get("uuid") in (f.uuid, f.peer) or (f.kind == "node_stale" and lab.get("node") == f.node)
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
    kubelets = Kubelets()
    clock = Clock(t0)
    nodes = make_fleet(args.nodes, clock, args.seed, kubelets)
    faults = plan_faults(nodes, args.hours, random.Random(args.seed), t0, args.interval)
    groups = peer_groups(nodes)
    fault_trace = args.out / "fault-trace.om"
    n_fault = build_trace(fault_trace, nodes, clock, t0, args.hours, args.interval, faults, args.seed)
    for n in nodes:
        n.source.close()
    clock2 = Clock(t0)
    clean_nodes = make_fleet(args.nodes, clock2, args.seed + 1, kubelets)
    clean_trace = args.out / "clean-trace.om"
    n_clean = build_trace(
        clean_trace, clean_nodes, clock2, t0, args.clean_hours, args.interval, [], args.seed + 1
    )
    for n in clean_nodes:
        n.source.close()
    kubelets.close()
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

    straggler_for = next(r.for_s for r in load_pack([default_rules_path()]).rules if r.name == "GpuStraggler")
    bound = straggler_for + args.interval  # `for:` plus one evaluation (the backtest evaluates every sample)
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
    result: dict[str, Any] = {
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
        "straggler_peer_groups": groups,
        "straggler_without_hand_made_job": {
            kind: {
                "faults": per_kind[kind]["faults"],
                "detected": per_kind[kind]["detected"],
                "delays_s": per_kind[kind]["delays"],
                "bound_s": bound,
                "within_bound": per_kind[kind]["detected"] == per_kind[kind]["faults"]
                and all(d <= bound for d in per_kind[kind]["delays"]),
            }
            for kind in sorted(ALIGNED)
            if kind in per_kind
        },
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
        "Straggler peer groups as the agent labelled them (no series got a hand-made job label): "
        + ", ".join(f"{k}: {v} GPUs" for k, v in groups.items()),
    ]
    for kind, x in result["straggler_without_hand_made_job"].items():
        lines.append(
            f"{kind}: {x['detected']}/{x['faults']} caught, delays {[round(d) for d in x['delays_s']]} s; "
            f"bound `for:` {straggler_for:g} s + one evaluation {args.interval:g} s = {bound:g} s: "
            + ("met" if x["within_bound"] else "MISSED")
        )
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
