"""Assembles and runs the agent from its settings: sources, sampling loop, /metrics server, pusher."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpufleet.agent.attribution import DeviceLabels, PodAttribution, PodJobs, SlurmJobs
from gpufleet.agent.core import Agent
from gpufleet.agent.exporter import AgentServer, Route, json_response
from gpufleet.agent.nvml import Nvml, NvmlUnavailable
from gpufleet.agent.pipeline import Enricher, MetricsCollector, OwnMetrics
from gpufleet.agent.push import Pusher
from gpufleet.agent.settings import AgentSettings
from gpufleet.agent.sinks import LatestSnapshot, PushMetrics
from gpufleet.agent.sources import SourceContext, selected
from gpufleet.agent.sources.gpu import GpuSource
from gpufleet.core.addresses import split_listen

if TYPE_CHECKING:
    from gpufleet.agent.simulator import SimulatedNVML

log = logging.getLogger(__name__)


class RunningAgent:
    """An agent with its threads started; ``stop()`` ends them.

    Its pipeline: the sources chosen from agent/sources/ → the enrich stage (pod, MIG and job labels from
    the kubelet, when a pod-resources socket is given; else the Slurm job of each GPU's processes) → the
    sinks (the ``/metrics`` snapshot, the pusher).
    """

    def __init__(
        self, settings: AgentSettings, *, nvml_lib: Any | None = None, http: Any | None = None
    ) -> None:
        self.settings = settings
        self.simulator: SimulatedNVML | None = None
        if settings.simulate:
            from gpufleet.agent.simulator import SimulatedNVML

            self.simulator = nvml_lib = SimulatedNVML(
                settings.simulate, seed=settings.seed, mig=settings.simulate_mig
            )
        self.nvml = Nvml(nvml_lib)
        specs = selected(settings)
        # Pod labels name GPUs, so the kubelet is asked only when the GPU source runs.
        self.pod_attribution: PodAttribution | None = None
        self.pod_jobs: PodJobs | None = None
        enrichers: list[Enricher] = []
        gpus_sampled = any(spec.name == "gpu" for spec in specs)
        kubelet = settings.kubelet or settings.inference.kubernetes
        if settings.pod_resources_socket and gpus_sampled:
            if kubelet is not None:
                from gpufleet.agent.inference.discovery import KubeletPodLister

                lister = KubeletPodLister(kubelet)
                self.pod_jobs = PodJobs(
                    lister, keys=settings.job_label_keys, refresh=kubelet.refresh, source=lister.url
                )
            self.pod_attribution = PodAttribution(
                settings.pod_resources_socket, jobs=self.pod_jobs.job_of if self.pod_jobs else None
            )
            enrichers.append(DeviceLabels(self.pod_attribution))
        elif gpus_sampled:  # no Kubernetes: a Slurm node's GPU processes name their job in their cgroup
            enrichers.append(DeviceLabels(SlurmJobs(self._gpu_pids, settings.proc_root)))
        if settings.kubelet is not None and not settings.pod_resources_socket:
            log.warning(
                "--kubelet names the job of each GPU's pod, and only --pod-resources-socket says which pod "
                "holds a GPU: set both (GPUFLEET_KUBELET, GPUFLEET_POD_RESOURCES_SOCKET)"
            )
        self.agent = Agent([], node=settings.node, interval=settings.interval, enrichers=enrichers)
        context = SourceContext(
            settings,
            self.nvml,
            on_event=self.agent.wake,
            gpu_lookup=self._gpu_indices,
            gpus_for_pod=self.pod_attribution.gpus_of if self.pod_attribution else None,
        )
        sources = [spec.factory(context) for spec in specs]
        self._gpu = next((src for src in sources if isinstance(src, GpuSource)), None)
        for src in sources:
            src.start()
        self.agent.sources = sources
        self.exposition = LatestSnapshot()
        self.agent.add_sink(self.exposition)
        components: list[MetricsCollector] = [self.nvml]
        if self.pod_attribution is not None:
            components.append(self.pod_attribution)
        if self.pod_jobs is not None:
            components.append(self.pod_jobs)
        self.pusher: Pusher | None = None
        if settings.collector:
            spool = None
            if settings.spool_dir:
                from gpufleet.agent.spool import Spool, SpoolError

                try:
                    spool = Spool(
                        settings.spool_dir,
                        max_bytes=settings.spool_max_bytes,
                        max_age_s=settings.spool_max_age,
                    )
                except SpoolError as exc:  # a missing folder must not stop the agent: it degrades to memory
                    log.error("%s; until then batches the collector cannot take wait in memory only", exc)
            self.pusher = Pusher(
                settings.collector,
                interval=settings.push_interval,
                token=settings.token,
                http=http,
                spool=spool,
                ca_bundle=settings.ca_bundle,
                client_cert=settings.client_cert,
                client_key=settings.client_key,
            )
            self.agent.add_sink(self.pusher)
            components.append(PushMetrics(self.pusher))
            if spool is not None:
                components.append(spool)
        self.own_metrics = OwnMetrics(settings.node, components)
        host, port = split_listen(settings.listen)
        routes: dict[tuple[str, str], Route] = {}
        if self.simulator is not None:
            simulator = self.simulator
            routes[("POST", "/simulate/faults")] = self._inject
            routes[("GET", "/simulate/gpus")] = lambda env, sr: json_response(
                sr, "200 OK", simulator.describe()
            )
        rename = None
        if settings.metric_names in ("dcgm", "both"):
            from gpufleet.agent.dcgm_names import to_both, to_dcgm

            rename = to_dcgm if settings.metric_names == "dcgm" else to_both
        self.server = AgentServer(
            host,
            port,
            self.exposition,
            health=self.health,
            routes=routes,
            own=self.own_metrics,
            rename=rename,
        )
        self._threads: list[threading.Thread] = []

    def _gpu_pids(self) -> dict[str, list[int]]:
        return self._gpu.pids_by_device() if self._gpu is not None else {}

    def _gpu_indices(self) -> list[tuple[str, str]]:
        return [(str(g.index), g.uuid) for g in self._gpu.gpus] if self._gpu is not None else []

    def _inject(self, environ: dict, start_response: Callable) -> list[bytes]:
        assert self.simulator is not None  # the route exists only with a simulator
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(min(length, 65536)) or b"{}")
            what = self.simulator.inject(
                int(body.get("gpu", 0)),
                str(body.get("kind", "")),
                xid=body.get("xid"),
                duration=float(body.get("duration", 120)),
                count=int(body.get("count", 1)),
            )
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            return json_response(start_response, "400 Bad Request", {"error": str(exc)})
        log.warning("simulated fault injected: %s", what)
        self.agent.wake()
        return json_response(start_response, "200 OK", {"injected": what})

    def health(self) -> dict:
        body: dict[str, Any] = {
            "ok": True,
            "node": self.settings.node,
            "simulated": self.simulator is not None,
            "samples": self.agent.samples_taken,
        }
        if self._gpu is not None:
            body["gpus"] = len(self._gpu.gpus)
            body["driver"] = self._gpu.driver
        if self.pusher is not None:
            body["collector"] = self.pusher.url
            body["push_error"] = self.pusher.last_error
            if self.pusher.spool is not None:
                body["spool"] = {
                    "dir": str(self.pusher.spool.dir),
                    "batches": len(self.pusher.spool),
                    "bytes": self.pusher.spool.bytes,
                }
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
