"""What an agent is told to do: its flags and environment variables, as one dataclass."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from gpufleet.agent.attribution import DEFAULT_JOB_LABEL_KEYS
from gpufleet.agent.inference.config import InferenceSettings, Kubernetes


@dataclass
class AgentSettings:
    listen: str = "0.0.0.0:9445"
    collector: str | None = None
    token: str | None = None
    simulate: int = 0
    node: str = field(default_factory=socket.gethostname)
    cluster: str | None = None
    interval: float = 1.0
    push_interval: float = 5.0
    sources: tuple[str, ...] = ()  # empty: every source that is on by default
    # /metrics names: gpufleet, dcgm (dcgm-exporter's names) or both; the push to the collector is gpufleet's.
    metric_names: str = "gpufleet"
    seed: int | None = None
    # Kubernetes pod attribution through the kubelet pod-resources API; None: off.
    pod_resources_socket: str | None = None
    # The kubelet whose /pods gives each GPU pod's labels and owner, which name its job; None: the inference
    # discovery's kubelet, if any. Without pod_resources_socket, GPUs get the Slurm job of their processes.
    kubelet: Kubernetes | None = None
    # Pod label keys whose value names a pod's job, first match wins; then the pod's controlling owner.
    job_label_keys: tuple[str, ...] = DEFAULT_JOB_LABEL_KEYS
    # Per-process GPU memory and SM utilization (multiplies series), and where to find host processes.
    process_metrics: bool = False
    proc_root: str = "/proc"
    # NVLink error counters and state per link as well as per GPU (series multiply by the links: 18 on Hopper).
    nvlink_per_link: bool = False
    # Seconds between reads of the slow GPU fields (energy counter, throttle time, PCIe throughput, static
    # values): on an H100 one read of them costs the driver about 10 ms of CPU, 30 samples' worth.
    slow_interval: float = 30.0
    # Simulated MIG layout: {GPU index: [profile, ...]} (only with simulate).
    simulate_mig: dict[int, list[str]] | None = None
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    spool_dir: str | None = None  # none: failed batches wait in memory only
    spool_max_bytes: int = 512 << 20
    spool_max_age: float = 24 * 3600.0
    ca_bundle: str | None = None  # CA file to verify an https collector [default: the system's]
    client_cert: str | None = None  # client certificate and key, for a collector that requires mutual TLS
    client_key: str | None = None
