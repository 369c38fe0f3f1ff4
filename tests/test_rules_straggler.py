"""GpuStraggler on GPUs nobody labelled by hand: peers are the GPUs of one job (named by the agent from the
pod's labels or owner, or from the Slurm job's cgroup), on every node the job runs on, or, with no job, the
GPUs of one pod. Simulated nodes run through the agent's GPU source and enrich stage into the rule engine;
the exported PromQL runs the same case in promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import yaml

from gpufleet.agent.attribution import DeviceLabels, PodAttribution, PodJobs, SlurmJobs
from gpufleet.agent.core import Agent
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.podresources import (
    ContainerDevices,
    ContainerResources,
    ListPodResourcesResponse,
    PodResources,
)
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.collector.rules.backtest import replay
from gpufleet.collector.rules.model import default_rules_path, load_pack
from tests.test_rules_cli import promtool, run  # noqa: F401 - fixture

SLURM_PROC = Path(__file__).parent / "fixtures" / "slurm_proc"
STEP_S = 10
FOR_S = 120  # GpuStraggler's for:
SM = "gpufleet_gpu_sm_active_ratio"


class Node:
    """A node of 8 busy simulated GPUs, sampled by the agent's GPU source and labelled by its enrich stage."""

    def __init__(self, name: str, clock: SimpleNamespace, seed: int) -> None:
        self.name = name
        self.sim = SimulatedNVML(8, clock=lambda: clock.t, seed=seed, workload="busy")
        self.src = GpuSource(
            Nvml(self.sim), name, cluster="c1", watch_events=False, background=False, clock=lambda: clock.t
        )
        self.src.start()
        self.uuids = [g.uuid for g in self.src.gpus]
        self.clock = clock
        self.agent: Agent | None = None

    def kubernetes(self, pods: list[tuple[str, str, list[int], dict]]) -> Node:
        """Pods (name, namespace, GPU indices, PodList metadata beyond name and namespace), as pod-resources and
        the kubelet's /pods tell them."""
        response = ListPodResourcesResponse(
            pod_resources=[
                PodResources(
                    name=name,
                    namespace=ns,
                    containers=[
                        ContainerResources(
                            name="main",
                            devices=[
                                ContainerDevices(
                                    resource_name="nvidia.com/gpu", device_ids=[self.uuids[i] for i in gpus]
                                )
                            ],
                        )
                    ],
                )
                for name, ns, gpus, _ in pods
            ]
        )
        listed = [{"metadata": {"name": name, "namespace": ns, **meta}} for name, ns, _, meta in pods]
        jobs = PodJobs(lambda: listed, clock=lambda: self.clock.t)
        attribution = PodAttribution(
            "/unused", list_pods=lambda: response, jobs=jobs.job_of, clock=lambda: self.clock.t
        )
        self.agent = Agent([self.src], node=self.name, enrichers=[DeviceLabels(attribution)])
        return self

    def slurm(self) -> Node:
        """No Kubernetes: the simulated processes' cgroups are the fixture files, as on a Slurm node."""
        jobs = SlurmJobs(self.src.pids_by_device, SLURM_PROC, clock=lambda: self.clock.t)
        self.agent = Agent([self.src], node=self.name, enrichers=[DeviceLabels(jobs)])
        return self


def record(nodes: list[Node], clock: SimpleNamespace, faults: dict[tuple[str, int], int], minutes: int):
    """Samples of the SM activity of every GPU, every STEP_S; ``faults`` {(node, gpu): at s}: the simulator's
    straggler fault (half the SM activity) starts right after the sample at that time."""
    t0 = clock.t
    samples = []
    for step in range(minutes * 60 // STEP_S + 1):
        clock.t = t0 + step * STEP_S
        for node in nodes:
            assert node.agent is not None
            for fam in node.agent.sample().families:
                if fam.name == SM:
                    samples += [
                        (int(clock.t * 1000), {"__name__": fam.name, **labels}, value)
                        for labels, value in fam.samples
                    ]
        for (name, gpu), at in faults.items():
            if step * STEP_S == at:
                next(n for n in nodes if n.name == name).sim.inject(gpu, "straggler", duration=3600)
    return t0, samples


def stragglers(samples) -> list[dict]:
    pack = load_pack([default_rules_path()])
    return [
        r
        for r in replay(samples, pack, step_ms=STEP_S * 1000)
        if r["alert"] == "GpuStraggler" and r["state"] == "firing"
    ]


def test_a_pod_without_a_job_and_a_job_across_two_nodes_each_catch_their_straggler():
    clock = SimpleNamespace(t=10_000.0)
    jobset = {"labels": {"jobset.sigs.k8s.io/jobset-name": "train", "job-name": "train-workers-0"}}
    nodes = [
        # one 8-GPU pod no controller names: its GPUs are each other's peers
        Node("node-a", clock, 1).kubernetes([("finetune", "research", list(range(8)), {})]),
        # one JobSet over two nodes, named only by its pods' labels
        Node("node-b", clock, 2).kubernetes([("train-workers-0-0", "ml", list(range(8)), jobset)]),
        Node("node-c", clock, 3).kubernetes([("train-workers-0-1", "ml", list(range(8)), jobset)]),
        # a 2-GPU pod (fewer than min_peers), and a job of the same name in another namespace on 2 GPUs:
        # job names are per namespace, so they are no peers of ml's "train"
        Node("node-d", clock, 4).kubernetes(
            [("pair", "ml", [0, 1], {}), ("train-workers-0-0", "other-team", [2, 3], jobset)]
        ),
        # Slurm: job 1234 holds GPUs 0, 1, 4 of both nodes (6 peers); the SLUID job holds GPU 2 of each (2)
        Node("node-e", clock, 5).slurm(),
        Node("node-f", clock, 6).slurm(),
    ]
    inject_at = 60
    faults = {
        ("node-a", 3): inject_at,
        ("node-c", 5): inject_at,
        ("node-d", 1): inject_at,
        ("node-d", 3): inject_at,
        ("node-f", 4): inject_at,
        ("node-e", 2): inject_at,
    }
    t0, samples = record(nodes, clock, faults, minutes=5)
    assert not any("job" in labels for _, labels, _ in samples if labels["node"] in ("node-a",))
    fired = stragglers(samples)
    assert sorted((r["labels"]["node"], r["labels"]["gpu"]) for r in fired) == [
        ("node-a", "3"),
        ("node-c", "5"),
        ("node-f", "4"),
    ]
    by_node = {r["labels"]["node"]: r for r in fired}
    assert by_node["node-a"]["labels"]["pod"] == "finetune" and "job" not in by_node["node-a"]["labels"]
    assert by_node["node-c"]["labels"]["job"] == "train" and by_node["node-c"]["labels"]["namespace"] == "ml"
    assert by_node["node-f"]["labels"]["job"] == "1234" and "namespace" not in by_node["node-f"]["labels"]
    for r in fired:
        # the fault shows from the next sample on; the alert fires `for:` later, at that evaluation
        assert r["at"] - (t0 + inject_at) <= FOR_S + STEP_S, r
        assert 0.4 < r["value"] < 0.6  # half its peers' median


# ---- the exported rule in Prometheus ------------------------------------------------------------------
def _groups() -> list[tuple[dict[str, str], float]]:
    """GPU series of the case above as Prometheus stores them (a missing label is no label), with their SM
    activity: 0.4 for the slow ones, 0.8 for their peers."""
    out = []
    for i in range(8):  # one pod, no job
        out.append(
            ({"node": "a", "gpu": str(i), "namespace": "research", "pod": "finetune"}, 0.4 if i == 3 else 0.8)
        )
    for node in ("b", "c"):  # one job over two nodes
        for i in range(8):
            labels = {"node": node, "gpu": str(i), "namespace": "ml", "pod": f"train-{node}", "job": "train"}
            out.append((labels, 0.4 if (node, i) == ("c", 5) else 0.8))
    for i in range(2):  # fewer than min_peers
        out.append(({"node": "d", "gpu": str(i), "namespace": "ml", "pod": "pair"}, 0.4 if i == 1 else 0.8))
    for i in range(2):  # same job name, other namespace
        labels = {"node": "d", "gpu": str(2 + i), "namespace": "other-team", "pod": "t", "job": "train"}
        out.append((labels, 0.4 if i == 1 else 0.8))
    for node in ("e", "f"):  # a Slurm job over two nodes: no namespace, no pod
        for i in range(3):
            out.append(({"node": node, "gpu": str(i), "job": "1234"}, 0.4 if (node, i) == ("f", 2) else 0.8))
    for i in range(4):  # GPUs nobody holds
        out.append(({"node": "g", "gpu": str(i)}, 0.1 if i == 0 else 0.8))
    return [({"cluster": "c1", "uuid": f"GPU-{lab['node']}{lab['gpu']}", **lab}, v) for lab, v in out]


SLOW = ["GPU-a3", "GPU-c5", "GPU-f2"]


def test_the_native_rule_fires_for_the_same_gpus_as_the_exported_one():
    samples = [
        (t * 60_000, {"__name__": SM, **labels}, value) for t in range(7) for labels, value in _groups()
    ]
    fired = [
        r
        for r in replay(samples, load_pack([default_rules_path()]), step_ms=60_000)
        if r["alert"] == "GpuStraggler" and r["state"] == "firing"
    ]
    assert sorted(r["labels"]["uuid"] for r in fired) == SLOW


def test_the_exported_straggler_rule_fires_in_promtool_for_a_pod_and_for_a_job_across_nodes(
    tmp_path,
    promtool,  # noqa: F811
):
    rules = tmp_path / "gpufleet.rules.yml"
    run("alerts", "export", "-o", str(rules))
    exported = next(
        r
        for g in yaml.safe_load(rules.read_text())["groups"]
        for r in g["rules"]
        if r["alert"] == "GpuStraggler"
    )
    series = [
        {"series": SM + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": f"{value}x6"}
        for labels, value in _groups()
    ]
    expected = []
    for labels, value in _groups():
        if labels["uuid"] in SLOW:
            expected.append(
                {
                    "exp_labels": {**labels, "severity": "warning"},
                    "exp_annotations": {
                        "summary": f"GPU {labels['gpu']} on {labels['node']} runs at {value} of its peers' "
                        "median SM activity",
                        "description": "A straggler holds back every other GPU of its job "
                        f"(job '{labels.get('job', '')}', pod '{labels.get('pod', '')}').",
                        "runbook_url": "http://localhost:9446/runbooks/straggler",
                        "gpufleet_export_note": exported["annotations"]["gpufleet_export_note"],
                    },
                }
            )
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "GpuStraggler", "exp_alerts": []},  # pending: for 2m
                    {"eval_time": "5m", "alertname": "GpuStraggler", "exp_alerts": expected},
                ],
            }
        ],
    }
    f = tmp_path / "test.yml"
    f.write_text(yaml.safe_dump(test))
    r = subprocess.run([promtool, "test", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
