"""A GPU's job label comes from what a real cluster says about the workload on it: on Kubernetes the labels
and owner of the pod holding it (the kubelet's /pods, read over HTTP as the agent reads it, joined to the
pod-resources gRPC API's assignment), on a Slurm node the job id in the cgroup of its processes (fixture
/proc trees under tests/fixtures/slurm_proc, the layouts Slurm's cgroup v1 and v2 plugins write)."""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpufleet.agent import attribution
from gpufleet.agent.attribution import (
    DEFAULT_JOB_LABEL_KEYS,
    DeviceLabels,
    PodAttribution,
    PodJobs,
    SlurmJobs,
    job_of_pod,
    slurm_job_of,
)
from gpufleet.agent.core import Agent
from gpufleet.agent.inference.config import Kubernetes
from gpufleet.agent.inference.discovery import KubeletPodLister
from gpufleet.agent.main import start_agent
from gpufleet.agent.nvml import Nvml
from gpufleet.agent.simulator import SimulatedNVML
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.cli.agent import agent_settings
from tests.conftest import free_port, wait_until
from tests.test_agent_k8s import Kubelet as PodResources
from tests.test_agent_k8s import api, socket_path  # noqa: F401 - fixtures
from tests.test_cli_errors import gpufleet
from tests.test_metric_contract import assert_emits_as_declared

SLURM_PROC = Path(__file__).parent / "fixtures" / "slurm_proc"
SEED = 31


def pod(name: str, namespace: str = "ml", labels: dict | None = None, owner: tuple | None = None) -> dict:
    """A PodList item as the kubelet's /pods writes it (the fields the agent reads, and a few it does not)."""
    meta: dict = {"name": name, "namespace": namespace, "uid": f"uid-{name}", "labels": labels or {}}
    if owner is not None:
        kind, owner_name = owner
        meta["ownerReferences"] = [
            {"apiVersion": "v1", "kind": kind, "name": owner_name, "uid": "u", "controller": True}
        ]
    return {"metadata": meta, "spec": {"nodeName": "gpu-node-1"}, "status": {"phase": "Running"}}


class KubeletPods:
    """The kubelet's /pods on a local port: ``pods`` is the PodList; ``status`` other than 200 answers an error."""

    def __init__(self) -> None:
        self.pods: list[dict] = []
        self.status = 200
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if outer.status != 200:
                    self.send_error(outer.status)
                    return
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "items": outer.pods}).encode()
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


@pytest.fixture
def kubelet():
    k = KubeletPods()
    yield k
    k.close()


def labels_by_gpu(agent: Agent, keys=("pod", "namespace", "job")) -> dict[str, dict[str, str]]:
    up = next(f for f in agent.sample().families if f.name == "gpufleet_gpu_up")
    return {lab["gpu"]: {k: lab[k] for k in keys if k in lab} for lab, _ in up.samples}


# ---- pod labels and owners -> job ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "job"),
    [
        # a JobSet's pods also carry their child Job's name: the JobSet is the job
        (
            {
                "jobset.sigs.k8s.io/jobset-name": "llama-pretrain",
                "jobset.sigs.k8s.io/replicatedjob-name": "workers",
                "batch.kubernetes.io/job-name": "llama-pretrain-workers-0",
                "job-name": "llama-pretrain-workers-0",
            },
            "llama-pretrain",
        ),
        (
            {"training.kubeflow.org/job-name": "bert-ft", "training.kubeflow.org/replica-type": "worker"},
            "bert-ft",
        ),
        (
            {"leaderworkerset.sigs.k8s.io/name": "vllm-405b", "leaderworkerset.sigs.k8s.io/group-index": "0"},
            "vllm-405b",
        ),
        ({"volcano.sh/job-name": "mpi-sweep", "volcano.sh/task-spec": "worker"}, "mpi-sweep"),
        (
            {"ray.io/cluster": "rayjob-x-raycluster-abcde", "ray.io/node-type": "worker"},
            "rayjob-x-raycluster-abcde",
        ),
        ({"batch.kubernetes.io/job-name": "eval-42", "job-name": "eval-42"}, "eval-42"),
        ({"job-name": "eval-41"}, "eval-41"),  # a Job from before Kubernetes 1.27
        ({"app.kubernetes.io/instance": "triton", "app.kubernetes.io/name": "triton"}, "triton"),
    ],
)
def test_the_default_keys_name_the_job_of_each_controllers_pods(labels, job):
    assert job_of_pod(pod("p-0", labels=labels), DEFAULT_JOB_LABEL_KEYS) == job


def test_configured_label_keys_are_tried_in_their_order():
    p = pod("p-0", labels={"team.example.com/run": "run-7", "app.kubernetes.io/instance": "trainer"})
    assert job_of_pod(p, ("team.example.com/run", "app.kubernetes.io/instance")) == "run-7"
    assert job_of_pod(p, ("app.kubernetes.io/instance", "team.example.com/run")) == "trainer"
    assert job_of_pod(p, ("no.such/key",)) is None  # no key matches and no owner


@pytest.mark.parametrize(
    ("labels", "owner", "job"),
    [
        ({}, ("Job", "nightly-eval"), "nightly-eval"),
        ({}, ("StatefulSet", "llm-shard"), "llm-shard"),
        ({}, ("PyTorchJob", "resnet"), "resnet"),
        # a Deployment's pods are owned by the ReplicaSet of one rollout: the Deployment names the job
        ({"pod-template-hash": "7d9f6c5b8"}, ("ReplicaSet", "embedder-7d9f6c5b8"), "embedder"),
        ({}, ("Node", "gpu-node-1"), None),  # a static pod's mirror: its node is no workload
        ({}, None, None),  # a bare pod
    ],
)
def test_a_pod_without_a_job_label_is_named_by_its_controller(labels, owner, job):
    assert job_of_pod(pod("p-0", labels=labels, owner=owner)) == job


def test_an_owner_that_is_not_the_controller_names_no_job():
    p = pod("p-0")
    p["metadata"]["ownerReferences"] = [{"kind": "ConfigMap", "name": "cm", "controller": False}]
    assert job_of_pod(p) is None


def test_gpus_carry_the_job_of_the_pod_holding_them(api, socket_path, kubelet):  # noqa: F811
    sim = SimulatedNVML(4, seed=SEED)
    uuids = [g["uuid"] for g in sim.describe()]
    with PodResources(api, socket_path) as pod_resources:
        pod_resources.pods = [
            pod_resources.pod("trainer-workers-0-0", "ml", {"main": [("nvidia.com/gpu", uuids[:2])]}),
            # GPU 2 time-sliced between two teams' jobs: both are named
            pod_resources.pod("eval-a", "ml", {"c": [("nvidia.com/gpu", [uuids[2] + "::0"])]}),
            pod_resources.pod("eval-b", "ml", {"c": [("nvidia.com/gpu", [uuids[2] + "::1"])]}),
            pod_resources.pod("notebook", "research", {"jupyter": [("nvidia.com/gpu", [uuids[3]])]}),
        ]
        kubelet.pods = [
            pod(
                "trainer-workers-0-0",
                labels={"jobset.sigs.k8s.io/jobset-name": "trainer", "job-name": "trainer-workers-0"},
                owner=("Job", "trainer-workers-0"),
            ),
            pod("eval-a", labels={"batch.kubernetes.io/job-name": "eval-a"}),
            pod("eval-b", owner=("Job", "eval-b")),
            pod("notebook", namespace="research"),  # bare pod: its GPU has no job, only its pod
            pod("web", namespace="default", owner=("ReplicaSet", "web-5f")),  # holds no GPU
        ]
        jobs = PodJobs(KubeletPodLister(Kubernetes(kubelet=kubelet.url)), source=kubelet.url)
        pods = PodAttribution(socket_path, jobs=jobs.job_of)
        src = GpuSource(Nvml(sim), "gpu-node-1", watch_events=False, background=False)
        src.start()
        got = labels_by_gpu(Agent([src], node="gpu-node-1", enrichers=[DeviceLabels(pods)]))
        pods.close()
    assert got == {
        "0": {"pod": "trainer-workers-0-0", "namespace": "ml", "job": "trainer"},
        "1": {"pod": "trainer-workers-0-0", "namespace": "ml", "job": "trainer"},
        "2": {"pod": "eval-a,eval-b", "namespace": "ml", "job": "eval-a,eval-b"},
        "3": {"pod": "notebook", "namespace": "research"},
    }
    assert kubelet.requests == 1  # one /pods for all GPUs of the sample
    assert jobs.failures == 0


def test_a_pod_that_started_after_the_last_list_gets_its_job_at_once_with_one_more_fetch(kubelet):
    clock = SimpleNamespace(t=0.0)
    jobs = PodJobs(KubeletPodLister(Kubernetes(kubelet=kubelet.url)), refresh=30.0, clock=lambda: clock.t)
    kubelet.pods = [pod("a-0", labels={"job-name": "a"})]
    assert jobs.job_of("ml", "a-0") == "a"
    kubelet.pods.append(pod("b-0", labels={"job-name": "b"}))
    clock.t += 1
    assert jobs.job_of("ml", "a-0") == "a" and kubelet.requests == 1  # cached within the refresh
    assert jobs.job_of("ml", "b-0") == "b" and kubelet.requests == 2  # new pod: fetched once more
    for _ in range(3):  # a pod the kubelet does not list costs one fetch, not one per sample
        assert jobs.job_of("ml", "ghost") is None
    assert kubelet.requests == 3
    kubelet.pods = []
    clock.t += 30
    assert jobs.job_of("ml", "a-0") is None and kubelet.requests == 4  # the pod ended


def test_a_kubelet_that_does_not_answer_costs_the_job_label_not_the_pod_labels(
    api,  # noqa: F811
    socket_path,  # noqa: F811
    kubelet,
    caplog,
):
    clock = SimpleNamespace(t=0.0)
    sim = SimulatedNVML(1, seed=SEED)
    uuid = sim.describe()[0]["uuid"]
    kubelet.status = 503
    kubelet.pods = [pod("trainer-0", labels={"training.kubeflow.org/job-name": "trainer"})]
    jobs = PodJobs(
        KubeletPodLister(Kubernetes(kubelet=kubelet.url)),
        refresh=10.0,
        clock=lambda: clock.t,
        source=kubelet.url + "/pods",
    )
    with PodResources(api, socket_path) as pod_resources, caplog.at_level(logging.WARNING):
        pod_resources.pods = [pod_resources.pod("trainer-0", "ml", {"c": [("nvidia.com/gpu", [uuid])]})]
        pods = PodAttribution(socket_path, refresh=10.0, clock=lambda: clock.t, jobs=jobs.job_of)
        src = GpuSource(Nvml(sim), "n", watch_events=False, background=False)
        src.start()
        agent = Agent([src], node="n", enrichers=[DeviceLabels(pods)])
        assert labels_by_gpu(agent) == {"0": {"pod": "trainer-0", "namespace": "ml"}}
        clock.t += 10
        assert labels_by_gpu(agent) == {"0": {"pod": "trainer-0", "namespace": "ml"}}
        assert jobs.failures == 2 and jobs.last_error is not None and "503" in jobs.last_error
        warnings = [r for r in caplog.records if "cannot list pods" in r.getMessage()]
        assert len(warnings) == 1  # logged once per outage
        assert kubelet.url in warnings[0].getMessage() and "--kubelet" in warnings[0].getMessage()
        assert_emits_as_declared(jobs.collect(), attribution.KUBELET_PODS_METRICS, exactly=True)
        assert jobs.collect()[0].samples == [({}, 2.0)]
        kubelet.status = 200
        clock.t += 10
        assert labels_by_gpu(agent) == {"0": {"pod": "trainer-0", "namespace": "ml", "job": "trainer"}}
        pods.close()


def test_an_agent_given_the_kubelet_flags_exports_each_gpus_job(api, socket_path, kubelet):  # noqa: F811
    """The settings come from the command line's options as `gpufleet agent` converts them."""
    uuids = [g["uuid"] for g in SimulatedNVML(3, seed=SEED).describe()]
    port = free_port()
    settings = agent_settings(
        {
            "listen": f"127.0.0.1:{port}",
            "simulate": 3,
            "node": "gpu-node-1",
            "interval": 0.2,
            "pod_resources_socket": socket_path,
            "kubelet": kubelet.url,
            "job_label_keys": "team.example.com/run, batch.kubernetes.io/job-name",
        },
        seed=SEED,
    )
    assert settings.job_label_keys == ("team.example.com/run", "batch.kubernetes.io/job-name")
    kubelet.pods = [
        pod("sweep-3", labels={"team.example.com/run": "sweep", "batch.kubernetes.io/job-name": "sweep-3"}),
        pod("eval-1", labels={"batch.kubernetes.io/job-name": "eval"}),
    ]
    with PodResources(api, socket_path) as pod_resources:
        pod_resources.pods = [
            pod_resources.pod("sweep-3", "ml", {"c": [("nvidia.com/gpu", uuids[:2])]}),
            pod_resources.pod("eval-1", "ml", {"c": [("nvidia.com/gpu", [uuids[2]])]}),
        ]
        running = start_agent(settings)
        try:
            text = wait_until(lambda: _scrape(port) if "job=" in _scrape(port) else None)
        finally:
            running.stop()
    jobs = {lab["gpu"]: lab.get("job") for lab in _series(text, "gpufleet_gpu_up")}
    assert jobs == {"0": "sweep", "1": "sweep", "2": "eval"}
    assert [lab["node"] for lab in _series(text, "gpufleet_agent_kubelet_pods_failures_total")] == [
        "gpu-node-1"
    ]


def test_a_bad_job_label_key_is_one_line_naming_the_flag_and_the_fix(tmp_path):
    r = gpufleet("agent", "--simulate", "1", cwd=tmp_path, env={"GPUFLEET_JOB_LABEL_KEYS": "job name,ok/key"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'job name' is not a pod label key" in r.stderr and "GPUFLEET_JOB_LABEL_KEYS" in r.stderr
    r = gpufleet("agent", "--simulate", "1", "--kubelet", "10.0.0.1:10250", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is not a URL" in r.stderr


def test_agent_help_names_the_kubelet_and_label_key_options_with_their_variables(tmp_path):
    out = re.sub(r"\s+", " ", gpufleet("agent", "--help", cwd=tmp_path).stdout)
    assert "--kubelet URL" in out and "GPUFLEET_KUBELET" in out
    assert "--job-label-keys KEY,..." in out and "GPUFLEET_JOB_LABEL_KEYS" in out
    assert ",".join(DEFAULT_JOB_LABEL_KEYS) in out.replace(" ", "")  # the defaults are shown, in order


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _series(text: str, name: str) -> list[dict[str, str]]:
    return [
        dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].rsplit("}", 1)[0]))
        for line in text.splitlines()
        if line.startswith(name + "{")
    ]


# ---- Slurm: the job of a GPU's processes from their cgroup -------------------------------------------
@pytest.mark.parametrize(
    ("pid", "job"),
    [
        (41000, "1234"),  # cgroup v1: /slurm/uid_1000/job_1234/step_0/task_0, among other controllers
        (41100, "1234"),  # cgroup v2: /system.slice/slurmstepd.scope/job_1234/step_0/user/task_1
        (41200, "s5K1KKYAYG5D00"),  # cgroup v2 from Slurm 26.05: the job's SLUID
        (41300, "77"),  # cgroup v2, several slurmd per host: gpu-node-7_slurmstepd.scope
        (41400, "1234"),  # cgroup v2 read from the agent's own cgroup namespace: /../../../system.slice/…
        (41500, "88"),  # cgroup v1, several slurmd per host: /slurm_gpu-node-7/uid_0/job_88/…
        (41600, None),  # a Kubernetes container
        (41700, None),  # a login session
        (49999, None),  # a process that ended
    ],
)
def test_the_slurm_job_of_a_process_is_read_from_its_cgroup(pid, job):
    assert slurm_job_of(pid, SLURM_PROC) == job


def test_on_a_slurm_node_each_gpu_carries_the_job_of_its_processes():
    clock = SimpleNamespace(t=1000.0)
    sim = SimulatedNVML(8, seed=SEED, workload="busy", clock=lambda: clock.t)
    pids = {g["gpu"]: g["pid"] for g in sim.describe()}
    src = GpuSource(Nvml(sim), "gpu-node-7", watch_events=False, background=False, clock=lambda: clock.t)
    src.start()
    clock.t += 30  # busy GPUs hold memory: NVML lists their job process
    jobs = SlurmJobs(src.pids_by_device, SLURM_PROC)
    got = labels_by_gpu(Agent([src], node="gpu-node-7", enrichers=[DeviceLabels(jobs)]))
    assert pids == {i: 41000 + 100 * i for i in range(8)}  # the fixtures are named after these
    assert got == {
        "0": {"job": "1234"},
        "1": {"job": "1234"},
        "2": {"job": "s5K1KKYAYG5D00"},
        "3": {"job": "77"},
        "4": {"job": "1234"},
        "5": {"job": "88"},
        "6": {},
        "7": {},
    }


def test_on_a_slurm_node_each_mig_instance_carries_the_job_of_its_own_processes():
    clock = SimpleNamespace(t=1000.0)
    sim = SimulatedNVML(1, seed=SEED, workload="busy", mig={0: ["3g.40gb", "3g.40gb"]}, clock=lambda: clock.t)
    migs = [m["uuid"] for m in sim.describe()[0]["mig"]]
    src = GpuSource(Nvml(sim), "n", watch_events=False, background=False, clock=lambda: clock.t)
    src.start()
    clock.t += 30
    agent = Agent([src], node="n", enrichers=[DeviceLabels(SlurmJobs(src.pids_by_device, SLURM_PROC))])
    families = agent.sample().families
    info = [lab for f in families if f.name == "gpufleet_mig_info" for lab, _ in f.samples]
    assert {lab["mig_uuid"]: lab.get("job") for lab in info} == {migs[0]: "555", migs[1]: "556"}
    up = next(f for f in families if f.name == "gpufleet_gpu_up")
    assert [lab.get("job") for lab, _ in up.samples] == ["555,556"]  # the GPU serves both jobs


def test_slurm_jobs_follow_the_gpus_processes_as_jobs_come_and_go(tmp_path):
    proc = tmp_path / "proc"
    clock = SimpleNamespace(t=0.0)
    on_gpu = {"GPU-a": [101]}

    def cgroup(pid: int, job: int) -> None:
        (proc / str(pid)).mkdir(parents=True, exist_ok=True)
        (proc / str(pid) / "cgroup").write_text(
            f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0\n"
        )

    cgroup(101, 5)
    jobs = SlurmJobs(lambda: on_gpu, proc, refresh=10.0, clock=lambda: clock.t)
    assert jobs("GPU-a") == {"job": "5"}
    on_gpu["GPU-a"] = [202]
    cgroup(202, 6)
    clock.t += 5
    assert jobs("GPU-a") == {"job": "5"}  # asked again only after the refresh
    clock.t += 5
    assert jobs("GPU-a") == {"job": "6"}
    on_gpu["GPU-a"] = []
    clock.t += 10
    assert jobs("GPU-a") == {} and jobs("GPU-b") == {}


def test_an_agent_without_kubernetes_labels_gpus_with_their_slurm_jobs():
    port = free_port()
    running = start_agent(
        agent_settings(
            {"listen": f"127.0.0.1:{port}", "simulate": 8, "node": "gpu-node-7", "interval": 0.2},
            seed=SEED,
            proc_root=str(SLURM_PROC),
        )
    )
    expected = {"0": "1234", "1": "1234", "2": "s5K1KKYAYG5D00", "3": "77", "4": "1234", "5": "88"}
    try:
        labelled = wait_until(
            lambda: {
                lab["gpu"]: lab["job"] for lab in _series(_scrape(port), "gpufleet_gpu_up") if lab.get("job")
            },
            timeout=30,  # the processes' cgroups are read every 10 s; the first read may find no process yet
        )
    finally:
        running.stop()
    # the simulator's mixed load: a GPU has a process (and a job) while it holds memory; /metrics writes an
    # absent label as an empty one, which Prometheus reads as absent
    assert labelled and all(expected[gpu] == job for gpu, job in labelled.items())


def test_a_kubelet_without_the_pod_resources_socket_is_named_in_a_warning(kubelet, caplog):
    port = free_port()
    settings = agent_settings(
        {"listen": f"127.0.0.1:{port}", "simulate": 1, "node": "n", "kubelet": kubelet.url}, seed=SEED
    )
    with caplog.at_level(logging.WARNING):
        running = start_agent(settings)
        running.stop()
    assert any(
        "--pod-resources-socket" in r.getMessage() and "GPUFLEET_KUBELET" in r.getMessage()
        for r in caplog.records
    )
    assert running.pod_jobs is None and kubelet.requests == 0  # no pod says which GPU it holds: not asked
