"""Who holds a GPU: Kubernetes pod/namespace/container from the kubelet, and a process's container from /proc.

:class:`PodAttribution` asks the kubelet's pod-resources API (gRPC ``v1.PodResourcesLister/List`` on a unix
socket) which container each device was given to, at most every ``refresh`` seconds, and answers
``attribution(uuid) -> {"pod": …, "namespace": …, "container": …}``. Device ids are GPU
or MIG UUIDs as the NVIDIA device plugin reports them (its default ``uuid`` strategy); time-sliced
replicas (``GPU-…::3``) count for their GPU, and a GPU shared by several containers lists them all,
comma-separated.

The ``job`` label names the workload a GPU serves, so the GPUs of one job can be compared with each other:

* on Kubernetes, :class:`PodJobs` reads the pods' labels and owners from the kubelet's ``/pods`` and maps
  each pod to a job through an ordered list of label keys (:data:`DEFAULT_JOB_LABEL_KEYS`: the labels
  JobSet, the Kubeflow training operator, LeaderWorkerSet, Volcano, KubeRay and Kubernetes Jobs put on their
  pods, then ``app.kubernetes.io/instance``), else through the pod's controller (its Job, StatefulSet,
  Deployment, …);
* on a Slurm node, :class:`SlurmJobs` reads the job id from the cgroup of the processes on each GPU
  (:func:`slurm_job_of`).

:class:`DeviceLabels` is the pipeline's enrich stage: it puts those labels on every series that names a GPU
or MIG instance, whichever source produced it.

:func:`container_of` reads ``<proc root>/<pid>/cgroup`` to find the container and pod of a process.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from gpufleet.agent.families import Family, PerSeries
from gpufleet.core.metricspec import MetricSpec

log = logging.getLogger(__name__)

GPU_RESOURCE_PREFIX = "nvidia.com/"


class Attribution(Protocol):
    """Who holds a device (GPU or MIG UUID): labels such as ``pod``, ``namespace``, ``container``, ``job``."""

    def __call__(self, device: str, /) -> dict[str, str]: ...


class DeviceLabels:
    """Enrich stage: each GPU series gets the labels of who holds its GPU (``uuid``), and each MIG instance's
    series those of who holds the instance (``mig_uuid``): the kubelet hands out MIG instances one by one.

    A MIG instance's own series are the ones with ``compute_instance``; a process on a MIG instance carries
    ``mig_uuid`` too, yet is attributed through its GPU, as the process table is read per GPU.
    """

    def __init__(self, attribution: Attribution) -> None:
        self._attribution = attribution
        # (the holder's labels, a series' labels) -> the two joined: while a device's holder stays, its series
        # get the same joined dict every sample, which the sinks know by its identity (see Family).
        self._joined: PerSeries[dict[str, str]] = PerSeries()

    def enrich(self, families: list[Family]) -> list[Family]:
        holders: dict[str, tuple[tuple[str, str], ...]] = {}  # one lookup per device and sample
        out: list[Family] = []
        for fam in families:
            samples: list[tuple[dict[str, str], float]] | None = None  # made when a sample changes
            for i, (labels, value) in enumerate(fam.samples):
                device = labels.get("mig_uuid") if "compute_instance" in labels else labels.get("uuid")
                if device is None:
                    continue
                held_by = holders.get(device)
                if held_by is None:
                    held_by = holders[device] = tuple(self._attribution(device).items())
                if not held_by:
                    continue
                if samples is None:
                    samples = list(fam.samples)
                joined = self._joined.get(held_by, labels, lambda: {**labels, **dict(held_by)})  # noqa: B023
                samples[i] = (joined, value)
            # a family none of whose series is held goes on as it came (families are read-only downstream)
            out.append(fam if samples is None else Family(fam.name, fam.kind, fam.help, samples))
        self._joined.rotate()
        return out


class PodAttribution:
    """GPU UUID -> pod labels, from the kubelet pod-resources API. Pass ``list_pods`` to replace the gRPC call.

    With ``jobs`` (``(namespace, pod) -> job or None``, e.g. :meth:`PodJobs.job_of`) a device also gets the
    ``job`` of the pods holding it; a GPU time-sliced between pods of several jobs lists them all.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        refresh: float = 10.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        list_pods: Callable[[], Any] | None = None,
        jobs: Callable[[str, str], str | None] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._refresh = refresh
        self._timeout = timeout
        self._clock = clock
        self._list = list_pods or self._grpc_list
        self._jobs = jobs
        self._channel: Any = None
        self._by_device: dict[str, dict[str, str]] = {}
        self._pods_by_device: dict[str, set[tuple[str, str]]] = {}  # device -> {(namespace, pod)}
        self._at: float | None = None
        self.failures = 0
        self.last_error: str | None = None

    def __call__(self, uuid: str) -> dict[str, str]:
        if self._at is None or self._clock() - self._at >= self._refresh:
            self.update()
        labels = dict(self._by_device.get(uuid, {}))
        if self._jobs is not None and labels:
            jobs = {self._jobs(ns, pod) for ns, pod in self._pods_by_device.get(uuid, ())}
            named = sorted(job for job in jobs if job)
            if named:
                labels["job"] = ",".join(named)
        return labels

    def collect(self) -> list[Family]:
        failures = Family(
            "gpufleet_agent_pod_resources_failures_total",
            "counter",
            "Failed calls to the kubelet pod-resources API (GPU pod labels may be stale or missing).",
        )
        failures.add({}, self.failures)
        return [failures]

    def gpus_of(self, namespace: str, pod: str) -> list[str]:
        """The GPUs (and MIG instances), by UUID, that the kubelet assigned to a pod's containers: what an
        inference server discovered in that pod runs on."""
        if self._at is None or self._clock() - self._at >= self._refresh:
            self.update()
        # By (namespace, pod) pair: a GPU time-sliced between pod P of another namespace and some pod of
        # this namespace is not P's here.
        return sorted(device for device, pods in self._pods_by_device.items() if (namespace, pod) in pods)

    def update(self) -> None:
        """Ask the kubelet now. On failure the last known assignment stays and the failure is logged once."""
        self._at = self._clock()
        try:
            response = self._list()
        except Exception as exc:  # grpc.RpcError, OSError: the kubelet is a state to report, not a crash
            self.failures += 1
            # A fresh channel next time: the kubelet recreates its socket on restart, and a channel in
            # reconnect backoff would keep failing fast after it is back.
            self.close()
            error = str(getattr(exc, "details", lambda: None)() or exc)
            if self.last_error is None:
                log.warning(
                    "cannot list pods from the kubelet pod-resources API at unix://%s (%s); GPUs carry no "
                    "pod/namespace/container labels until it answers. Mount /var/lib/kubelet/pod-resources "
                    "into the agent's pod or set --pod-resources-socket",
                    self.socket_path,
                    error,
                )
            self.last_error = error
            return
        if self.last_error is not None:
            log.info("the kubelet pod-resources API answers again")
        self.last_error = None
        holders = device_holders(response)
        self._by_device = holder_labels(holders)
        self._pods_by_device = {device: {(ns, pod) for pod, ns, _ in hs} for device, hs in holders.items()}

    def _grpc_list(self) -> Any:
        import grpc

        from gpufleet.agent.podresources import LIST_METHOD, ListPodResourcesRequest, ListPodResourcesResponse

        if self._channel is None:
            self._channel = grpc.insecure_channel(
                f"unix://{self.socket_path}", options=[("grpc.max_receive_message_length", 16 << 20)]
            )
        call = self._channel.unary_unary(
            LIST_METHOD,
            request_serializer=ListPodResourcesRequest.SerializeToString,
            response_deserializer=ListPodResourcesResponse.FromString,
        )
        return call(ListPodResourcesRequest(), timeout=self._timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def devices_to_pods(response: Any) -> dict[str, dict[str, str]]:
    """``ListPodResourcesResponse`` -> {device id: {"pod", "namespace", "container"}} for NVIDIA devices."""
    return holder_labels(device_holders(response))


def device_holders(response: Any) -> dict[str, list[tuple[str, str, str]]]:
    """``ListPodResourcesResponse`` -> {device id: sorted [(pod, namespace, container)]} for NVIDIA devices."""
    holders: dict[str, list[tuple[str, str, str]]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            for dev in container.devices:
                if not dev.resource_name.startswith(GPU_RESOURCE_PREFIX):
                    continue
                for device_id in dev.device_ids:
                    uuid = device_id.split("::", 1)[0]  # time-slicing replicas: GPU-…::N
                    holder = (pod.name, pod.namespace, container.name)
                    if holder not in holders.setdefault(uuid, []):
                        holders[uuid].append(holder)
    for hs in holders.values():
        hs.sort()
    return holders


def holder_labels(holders: dict[str, list[tuple[str, str, str]]]) -> dict[str, dict[str, str]]:
    """The labels of each device's holders; a GPU time-sliced between pods lists them all, comma-joined."""
    out = {}
    for uuid, hs in holders.items():
        out[uuid] = {
            "pod": ",".join(h[0] for h in hs),
            "namespace": ",".join(sorted({h[1] for h in hs})),
            "container": ",".join(h[2] for h in hs),
        }
    return out


# Pod label keys that name the workload a pod belongs to, most specific first: a controller that runs its
# pods through Jobs (JobSet, and Kubeflow Trainer through JobSet) leaves each child Job's name on the pods
# too, yet the whole set is the job whose GPUs wait for each other.
DEFAULT_JOB_LABEL_KEYS: tuple[str, ...] = (
    "jobset.sigs.k8s.io/jobset-name",  # JobSet
    "training.kubeflow.org/job-name",  # Kubeflow training operator: PyTorchJob, TFJob, MPIJob, …
    "leaderworkerset.sigs.k8s.io/name",  # LeaderWorkerSet
    "volcano.sh/job-name",  # Volcano Job
    "ray.io/cluster",  # KubeRay: the RayCluster (a RayJob runs one)
    "batch.kubernetes.io/job-name",  # Kubernetes Job
    "job-name",  # Kubernetes Job, the label releases before 1.27 set
    "app.kubernetes.io/instance",  # a Helm release or other instance of an application
)
# A mirror (static) pod's controller is its Node, which names no workload.
_NOT_A_JOB = frozenset({"Node"})


def job_of_pod(pod: Mapping[str, Any], keys: Sequence[str] = DEFAULT_JOB_LABEL_KEYS) -> str | None:
    """The job a pod (an item of the kubelet's PodList) belongs to: the value of the first of ``keys`` among its
    labels, else the name of its controlling owner (a Job, StatefulSet, …; a ReplicaSet by its Deployment's
    name), else None."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    for key in keys:
        value = labels.get(key)
        if isinstance(value, str) and value:
            return value
    owner = next(
        (o for o in meta.get("ownerReferences") or [] if isinstance(o, dict) and o.get("controller")), None
    )
    if owner is None or owner.get("kind") in _NOT_A_JOB or not owner.get("name"):
        return None
    name = str(owner["name"])
    template_hash = labels.get("pod-template-hash")
    if owner.get("kind") == "ReplicaSet" and template_hash and name.endswith("-" + str(template_hash)):
        name = name[: -len(str(template_hash)) - 1]  # the Deployment outlives each rollout's ReplicaSet
    return name


class PodJobs:
    """(namespace, pod) -> job, from the labels and owners of this node's pods (the kubelet's ``/pods``,
    through ``list_pods``, e.g. :class:`gpufleet.agent.inference.discovery.KubeletPodLister`).

    The list is fetched at most every ``refresh`` seconds, and once more when a pod is asked for that the
    last list lacked (it started since): one fetch per refresh however many GPUs ask. When the kubelet does
    not answer, the last list stays, and the failure is counted and logged once.
    """

    def __init__(
        self,
        list_pods: Callable[[], list[dict[str, Any]]],
        *,
        keys: Sequence[str] = DEFAULT_JOB_LABEL_KEYS,
        refresh: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        source: str = "the kubelet's /pods",
    ) -> None:
        self._list = list_pods
        self.keys = tuple(keys)
        self._refresh = refresh
        self._clock = clock
        self._source = source
        self._jobs: dict[tuple[str, str], str | None] = {}  # every listed pod, job or not
        self._missed: set[tuple[str, str]] = set()  # asked for, not listed: fetched once more for each
        self._at: float | None = None
        self.failures = 0
        self.last_error: str | None = None

    def job_of(self, namespace: str, pod: str) -> str | None:
        key = (namespace, pod)
        if self._at is None or self._clock() - self._at >= self._refresh:
            self.update()
        elif key not in self._jobs and key not in self._missed:
            self._missed.add(key)
            self.update()
        return self._jobs.get(key)

    def update(self) -> None:
        """Fetch the pod list now."""
        self._at = self._clock()
        try:
            pods = self._list()
        except Exception as exc:  # URLError, OSError, a body no PodList: a state to report, not a crash
            self.failures += 1
            if self.last_error is None:
                log.warning(
                    "cannot list pods from %s (%s); GPUs carry no job label from their pods' labels until it "
                    "answers. Check --kubelet (GPUFLEET_KUBELET) and that the agent may read the kubelet's "
                    "/pods (nodes/proxy or nodes/pods on the kubelet's https port)",
                    self._source,
                    exc,
                )
            self.last_error = str(exc)
            return
        if self.last_error is not None:
            log.info("%s answers again", self._source)
        self.last_error = None
        jobs: dict[tuple[str, str], str | None] = {}
        for pod in pods:
            meta = pod.get("metadata") or {}
            name = meta.get("name")
            if isinstance(name, str):
                jobs[(str(meta.get("namespace") or "default"), name)] = job_of_pod(pod, self.keys)
        self._jobs = jobs
        self._missed -= set(jobs)

    def collect(self) -> list[Family]:
        failures = Family(
            "gpufleet_agent_kubelet_pods_failures_total",
            "counter",
            "Failed reads of the kubelet's /pods (GPU job labels from pod labels may be stale or missing).",
        )
        failures.add({}, self.failures)
        return [failures]


# A container id (64 hex) as the last part of a cgroup path, in the forms container runtimes write:
# /docker/<id>, /kubepods/burstable/pod<uid>/<id>, …/cri-containerd-<id>.scope, …/crio-<id>.scope, docker-<id>.scope
_CONTAINER = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")
# The pod UID: pod<uid> with dashes (cgroupfs driver) or underscores (systemd driver).
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


def container_of(pid: int, proc_root: str | Path = "/proc") -> tuple[str, str, str]:
    """(command, container id, pod UID) of a process; empty strings for what cannot be known.

    With the agent in a container, point ``proc_root`` at the host's /proc (and run with hostPID), since
    NVML reports host PIDs.
    """
    base = Path(proc_root) / str(pid)
    try:
        command = (base / "comm").read_text().strip()
    except OSError:
        command = ""
    try:
        cgroup = (base / "cgroup").read_text()
    except OSError:
        return command, "", ""
    container = pod = ""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1].strip()
        if not container:
            m = _CONTAINER.search(path)
            if m:
                container = m.group(1)
        if not pod:
            m = _POD.search(path)
            if m:
                pod = m.group(1).replace("_", "-")
    return command, container, pod


# The cgroup of a Slurm job's processes, as slurmd's cgroup plugins name it:
#   cgroup/v1  /slurm/uid_<uid>/job_<id>/step_<step>/task_<n>  (/slurm_<node>/… with several slurmd per host)
#   cgroup/v2  /system.slice/slurmstepd.scope/job_<id>/step_<step>/user/task_<n>  (<node>_slurmstepd.scope
#              with several slurmd); from Slurm 26.05 the job's directory is its SLUID (s + 13 Crockford
#              base-32 characters, unique in the Slurm realm) unless cgroup.conf sets CgroupJobIdPaths=yes.
# A containerised agent in its own cgroup namespace sees the same path below a few "/.." parts.
_SLURM_ROOT = re.compile(r"slurm.*|.+_slurmstepd\.scope")
_SLURM_JOB = re.compile(r"job_(\d+)|(s[0-9A-HJKMNP-TV-Z]{13})")


def slurm_job_in(cgroup: str) -> str | None:
    """The Slurm job id in the text of a ``/proc/<pid>/cgroup`` file, or None for a process outside a job."""
    for line in cgroup.splitlines():
        parts = line.split(":", 2)[-1].strip().split("/")
        root = next((i for i, part in enumerate(parts) if _SLURM_ROOT.fullmatch(part)), None)
        if root is None:
            continue
        for part in parts[root + 1 :]:
            m = _SLURM_JOB.fullmatch(part)
            if m:
                return m.group(1) or m.group(2)
    return None


def slurm_job_of(pid: int, proc_root: str | Path = "/proc") -> str | None:
    """The Slurm job a process runs in, from ``<proc root>/<pid>/cgroup``; None outside Slurm or when the
    process is gone."""
    try:
        cgroup = (Path(proc_root) / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    return slurm_job_in(cgroup)


class SlurmJobs:
    """Device UUID -> ``{"job": <Slurm job id>}``, from the cgroups of the processes on each GPU and MIG
    instance: the attribution of a Slurm node, which has no pod-resources API.

    ``processes`` answers ``{device UUID: [pid, …]}`` as NVML lists the compute processes
    (:meth:`gpufleet.agent.sources.gpu.GpuSource.pids_by_device`); it is asked at most every ``refresh``
    seconds, and each process's cgroup is read once. NVML reports host PIDs: with the agent in a container,
    ``proc_root`` is the host's /proc. A GPU shared by processes of several jobs lists them all.
    """

    def __init__(
        self,
        processes: Callable[[], Mapping[str, Sequence[int]]],
        proc_root: str | Path = "/proc",
        *,
        refresh: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._processes = processes
        self._proc_root = Path(proc_root)
        self._refresh = refresh
        self._clock = clock
        self._job_of_pid: dict[int, str | None] = {}
        self._by_device: dict[str, dict[str, str]] = {}
        self._at: float | None = None

    def __call__(self, device: str) -> dict[str, str]:
        if self._at is None or self._clock() - self._at >= self._refresh:
            self.update()
        return dict(self._by_device.get(device, {}))

    def update(self) -> None:
        self._at = self._clock()
        seen: dict[int, str | None] = {}
        by_device: dict[str, dict[str, str]] = {}
        for device, pids in self._processes().items():
            jobs = set()
            for pid in pids:
                if pid not in seen:
                    seen[pid] = (
                        self._job_of_pid[pid]
                        if pid in self._job_of_pid
                        else slurm_job_of(pid, self._proc_root)
                    )
                job = seen[pid]
                if job:
                    jobs.add(job)
            if jobs:
                by_device[device] = {"job": ",".join(sorted(jobs))}
        self._job_of_pid = seen  # processes that ended are forgotten: their PIDs may come back as others
        self._by_device = by_device


# PodAttribution.collect()'s series (the agent adds ``node``); on Kubernetes only.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_agent_pod_resources_failures_total",
        "counter",
        "",
        "Failed calls to the kubelet pod-resources API (GPU pod labels may be stale or missing).",
        ("node",),
        "on Kubernetes (pod-resources socket)",
    ),
)
# PodJobs.collect()'s series; on Kubernetes with --kubelet (or inference discovery's kubelet).
KUBELET_PODS_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_agent_kubelet_pods_failures_total",
        "counter",
        "",
        "Failed reads of the kubelet's /pods (GPU job labels from pod labels may be stale or missing).",
        ("node",),
        "on Kubernetes (kubelet /pods)",
    ),
)
