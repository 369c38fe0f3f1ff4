"""Assembles and runs the agent from its settings: sources, sampling loop, /metrics server, pusher."""

from __future__ import annotations

import importlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpufleet.agent.core import Agent
from gpufleet.agent.exporter import AgentServer, json_response
from gpufleet.agent.inference.config import InferenceSettings
from gpufleet.agent.nvml import Nvml, NvmlUnavailable
from gpufleet.agent.push import Pusher
from gpufleet.agent.sources import SOURCES

from gpufleet.addresses import split_listen

log = logging.getLogger(__name__)


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
    metric_names: str = "gpufleet"
    seed: int | None = None
    # Kubernetes pod attribution through the kubelet pod-resources API; None: off.
    pod_resources_socket: str | None = None
    # Per-process GPU memory and SM utilization (multiplies series), and where to find host processes.
    process_metrics: bool = False
    proc_root: str = "/proc"
    # Seconds between reads of the slow GPU fields (energy counter, PCIe throughput, static values).
    slow_interval: float = 10.0
    # Simulated MIG layout: {GPU index: [profile, ...]} (only with simulate).
    simulate_mig: dict[int, list[str]] | None = None
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    spool_dir: str | None = None  # none: failed batches wait in memory only
    spool_max_bytes: int = 512 << 20
    spool_max_age: float = 24 * 3600.0
    ca_bundle: str | None = None  # CA file to verify an https collector [default: the system's]
    client_cert: str | None = None  # client certificate and key, for a collector that requires mutual TLS
    client_key: str | None = None


class RunningAgent:
    """An agent with its threads started; ``stop()`` ends them."""

    def __init__(self, settings: AgentSettings, *, nvml_lib: Any | None = None, http: Any | None = None) -> None:
        self.settings = settings
        self.simulator = None
        self.pod_attribution: Any = None
        if settings.simulate:
            from gpufleet.agent.simulator import SimulatedNVML

            self.simulator = nvml_lib = SimulatedNVML(settings.simulate, seed=settings.seed, mig=settings.simulate_mig)
        self.nvml = Nvml(nvml_lib)
        wanted = set(settings.sources) or {s.name for s in SOURCES if s.default_on}
        if not settings.sources and settings.inference.configured():
            wanted.add("inference")
        unknown = wanted - {s.name for s in SOURCES}
        if unknown:
            raise ValueError(f"unknown source(s) {sorted(unknown)}; known: {[s.name for s in SOURCES]}")
        self.agent = Agent([], node=settings.node, interval=settings.interval)
        sources = []
        for spec in SOURCES:
            if spec.name in wanted:
                sources.append(self._make_source(spec.name))
        for src in sources:
            src.start()
        self.agent.sources = sources
        self.pusher = None
        if settings.collector:
            spool = None
            if settings.spool_dir:
                from gpufleet.agent.spool import Spool, SpoolError

                try:
                    spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes,
                                  max_age_s=settings.spool_max_age)
                except SpoolError as exc:  # a missing folder must not stop the agent: it degrades to memory
                    log.error("%s; until then batches the collector cannot take wait in memory only", exc)
            self.pusher = Pusher(settings.collector, interval=settings.push_interval, token=settings.token, http=http,
                                 spool=spool, ca_bundle=settings.ca_bundle, client_cert=settings.client_cert,
                                 client_key=settings.client_key)
            self.agent.add_sink(self.pusher)
        host, port = split_listen(settings.listen)
        routes = {}
        if self.simulator is not None:
            routes[("POST", "/simulate/faults")] = self._inject
            routes[("GET", "/simulate/gpus")] = lambda env, sr: json_response(sr, "200 OK", self.simulator.describe())
        rename = render = None
        if settings.metric_names == "dcgm":
            from gpufleet.agent.dcgm_names import render_text, to_dcgm

            rename, render = to_dcgm, render_text
        self.server = AgentServer(host, port, self.agent, health=self.health, routes=routes,
                                  extra=self._own_metrics, rename=rename, render=render)
        self._threads: list[threading.Thread] = []

    def _make_source(self, name: str) -> Any:
        s = self.settings
        if name == "gpu":
            from gpufleet.agent.sources.gpu import GpuSource

            attribution = None
            if s.pod_resources_socket:
                from gpufleet.agent.attribution import PodAttribution

                attribution = self.pod_attribution = PodAttribution(s.pod_resources_socket)
            return GpuSource(self.nvml, s.node, cluster=s.cluster, on_event=self._on_gpu_event,
                             attribution=attribution, slow_interval=s.slow_interval,
                             process_metrics=s.process_metrics, proc_root=s.proc_root)
        if name == "inference":
            from gpufleet.agent.sources.inference import InferenceSource

            attribution = getattr(self, "pod_attribution", None)  # the GPU source, made first, sets it
            return InferenceSource(s.inference, s.node, cluster=s.cluster, gpu_lookup=self._gpu_indices,
                                   gpus_for_pod=attribution.gpus_of if attribution is not None else None)
        module = importlib.import_module(f"gpufleet.agent.sources.{name}")
        cls = next(v for k, v in vars(module).items() if k.endswith("Source") and isinstance(v, type))
        return cls(s.node, cluster=s.cluster)

    def _gpu_indices(self) -> list[tuple[str, str]]:
        gpu = next((src for src in self.agent.sources if src.name == "gpu"), None)
        return [(str(g.index), g.uuid) for g in gpu.gpus] if gpu is not None else []

    def _on_gpu_event(self) -> None:
        self.agent.wake()

    def _inject(self, environ: dict, start_response: Callable) -> list[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(min(length, 65536)) or b"{}")
            what = self.simulator.inject(int(body.get("gpu", 0)), str(body.get("kind", "")),
                                         xid=body.get("xid"), duration=float(body.get("duration", 120)),
                                         count=int(body.get("count", 1)))
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return json_response(start_response, "400 Bad Request", {"error": str(exc)})
        log.warning("simulated fault injected: %s", what)
        self.agent.wake()
        return json_response(start_response, "200 OK", {"injected": what})

    def _own_metrics(self) -> list:
        from gpufleet.agent.families import Family

        labels = {"node": self.settings.node}
        fams = [Family("gpufleet_agent_simulated", "gauge", "1 when the GPUs are simulated, not real.")]
        fams[0].add(labels, 1.0 if self.simulator is not None else 0.0)
        if self.pod_attribution is not None:
            f = Family("gpufleet_agent_pod_resources_failures_total", "counter",
                       "Failed calls to the kubelet pod-resources API (GPU pod labels may be stale or missing).")
            f.add(labels, self.pod_attribution.failures)
            fams.append(f)
        if self.pusher is not None:
            p = self.pusher
            for name, kind, help_text, value in (
                ("gpufleet_agent_push_samples_total", "counter", "Samples the collector acknowledged.", p.sent_samples),
                ("gpufleet_agent_push_failures_total", "counter", "Pushes that failed and were kept for retry.",
                 p.failed_pushes),
                ("gpufleet_agent_push_dropped_samples_total", "counter",
                 "Samples dropped: refused by the collector, or over the pending limit.", p.dropped_samples),
                ("gpufleet_agent_push_pending_samples", "gauge", "Samples waiting to be pushed.", p.pending_samples()),
            ):
                f = Family(name, kind, help_text)
                f.add(labels, value)
                fams.append(f)
            if p.spool is not None:
                sp = p.spool
                for name, help_text, value in (
                        ("gpufleet_agent_spool_bytes", "Bytes of batches waiting in the on-disk spool.", sp.bytes),
                        ("gpufleet_agent_spool_batches", "Batches waiting in the on-disk spool.", len(sp)),
                        ("gpufleet_agent_spool_samples", "Samples waiting in the on-disk spool.", sp.samples)):
                    f = Family(name, "gauge", help_text)
                    f.add(labels, value)
                    fams.append(f)
                f = Family("gpufleet_agent_spool_dropped_samples_total", "counter",
                           "Samples the spool dropped, by reason: size and age limits, or refused by the collector.")
                for reason, n in sorted(sp.dropped_samples.items()):
                    f.add({**labels, "reason": reason}, n)
                fams.append(f)
        return fams

    def health(self) -> dict:
        body: dict[str, Any] = {"ok": True, "node": self.settings.node, "simulated": self.simulator is not None,
                                "samples": self.agent.samples_taken}
        gpu = next((s for s in self.agent.sources if s.name == "gpu"), None)
        if gpu is not None:
            body["gpus"] = len(gpu.gpus)
            body["driver"] = gpu.driver
        if self.pusher is not None:
            body["collector"] = self.pusher.url
            body["push_error"] = self.pusher.last_error
            if self.pusher.spool is not None:
                body["spool"] = {"dir": str(self.pusher.spool.dir), "batches": len(self.pusher.spool),
                                 "bytes": self.pusher.spool.bytes}
        return body

    def start(self) -> RunningAgent:
        self.agent.sample()
        t = threading.Thread(target=self.agent.run, name="sampler", daemon=True)
        t.start()
        self._threads.append(t)
        if self.pusher is not None:
            self.pusher.start()
        self.server.start()
        return self

    def stop(self) -> None:
        self.agent.stop()
        if self.pusher is not None:
            self.pusher.stop()
        self.server.stop()
        if self.pod_attribution is not None:
            self.pod_attribution.close()
        self.nvml.shutdown()


def start_agent(settings: AgentSettings, **kwargs: Any) -> RunningAgent:
    """Build and start an agent. Raises :class:`NvmlUnavailable` with a next step when NVML cannot start."""
    return RunningAgent(settings, **kwargs).start()


__all__ = ["AgentSettings", "NvmlUnavailable", "RunningAgent", "start_agent", "split_listen"]
