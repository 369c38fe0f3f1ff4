"""Who holds a GPU: Kubernetes pod/namespace/container from the kubelet, and a process's container from /proc.

:class:`PodAttribution` asks the kubelet's pod-resources API (gRPC ``v1.PodResourcesLister/List`` on a unix
socket) which container each device was given to, at most every ``refresh`` seconds, and answers
``attribution(uuid) -> {"pod": …, "namespace": …, "container": …}``. Device ids are GPU
or MIG UUIDs as the NVIDIA device plugin reports them (its default ``uuid`` strategy); time-sliced
replicas (``GPU-…::3``) count for their GPU, and a GPU shared by several containers lists them all,
comma-separated.

:class:`DeviceLabels` is the pipeline's enrich stage: it puts those labels on every series that names a GPU
or MIG instance, whichever source produced it.

:func:`container_of` reads ``<proc root>/<pid>/cgroup`` to find the container and pod of a process.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gpufleet.agent.families import Family
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

    def enrich(self, families: list[Family]) -> list[Family]:
        holders: dict[str, dict[str, str]] = {}  # one lookup per device and sample, however many series
        out: list[Family] = []
        for fam in families:
            samples: list[tuple[dict[str, str], float]] = []
            for labels, value in fam.samples:
                device = labels.get("mig_uuid") if "compute_instance" in labels else labels.get("uuid")
                if device is None:
                    samples.append((labels, value))
                    continue
                held_by = holders.get(device)
                if held_by is None:
                    held_by = holders[device] = self._attribution(device)
                samples.append(({**labels, **held_by} if held_by else labels, value))
            out.append(Family(fam.name, fam.kind, fam.help, samples))
        return out


class PodAttribution:
    """GPU UUID -> pod labels, from the kubelet pod-resources API. Pass ``list_pods`` to replace the gRPC call."""

    def __init__(
        self,
        socket_path: str,
        *,
        refresh: float = 10.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        list_pods: Callable[[], Any] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._refresh = refresh
        self._timeout = timeout
        self._clock = clock
        self._list = list_pods or self._grpc_list
        self._channel: Any = None
        self._by_device: dict[str, dict[str, str]] = {}
        self._pods_by_device: dict[str, set[tuple[str, str]]] = {}  # device -> {(namespace, pod)}
        self._at: float | None = None
        self.failures = 0
        self.last_error: str | None = None

    def __call__(self, uuid: str) -> dict[str, str]:
        if self._at is None or self._clock() - self._at >= self._refresh:
            self.update()
        return dict(self._by_device.get(uuid, {}))

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
