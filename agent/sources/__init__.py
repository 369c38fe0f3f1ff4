"""The agent's metric sources: one module each, listed here with a factory and whether they run by default.

Each source satisfies :class:`gpufleet.agent.pipeline.Source`. The agent times every source and reports
``gpufleet_agent_source_success`` and ``gpufleet_agent_source_duration_seconds``; one failing source never
fails a sample. Adding a source is a module and a row in :data:`SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.agent.nvml import Nvml
from gpufleet.agent.pipeline import Source
from gpufleet.agent.settings import AgentSettings


@dataclass(frozen=True)
class SourceContext:
    """What a factory may build a source from: the settings and what sources share or tell each other."""

    settings: AgentSettings
    nvml: Nvml
    on_event: Callable[[], None]  # an urgent event happened (an XID): sample now
    gpu_lookup: Callable[[], list[tuple[str, str]]]  # (index, uuid) of every GPU the agent samples
    gpus_for_pod: Callable[[str, str], list[str]] | None  # GPU UUIDs of (namespace, pod); None off Kubernetes


SourceFactory = Callable[[SourceContext], Source]


@dataclass(frozen=True)
class SourceSpec:
    name: str
    factory: SourceFactory
    default_on: bool
    help: str


# Factories import their module when called, so an agent pays only for the sources it runs.
def _gpu(ctx: SourceContext) -> Source:
    from gpufleet.agent.sources.gpu import GpuSource

    s = ctx.settings
    return GpuSource(
        ctx.nvml,
        s.node,
        cluster=s.cluster,
        on_event=ctx.on_event,
        slow_interval=s.slow_interval,
        process_metrics=s.process_metrics,
        proc_root=s.proc_root,
        nvlink_per_link=s.nvlink_per_link,
    )


def _host(ctx: SourceContext) -> Source:
    from gpufleet.agent.sources.host import HostSource

    return HostSource(ctx.settings.node, cluster=ctx.settings.cluster, proc_root=ctx.settings.proc_root)


def _inference(ctx: SourceContext) -> Source:
    from gpufleet.agent.sources.inference import InferenceSource

    s = ctx.settings
    return InferenceSource(
        s.inference, s.node, cluster=s.cluster, gpu_lookup=ctx.gpu_lookup, gpus_for_pod=ctx.gpus_for_pod
    )


SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec("gpu", _gpu, True, "NVIDIA GPUs through NVML: field table, GPM, XID events"),
    SourceSpec(
        "host", _host, True, "the node's CPU, memory and load from /proc (psutil where there is none)"
    ),
    # Off unless something is configured to scrape, probe or receive (AgentSettings.inference.configured()):
    # an agent with no inference server costs nothing.
    SourceSpec(
        "inference",
        _inference,
        False,
        "inference servers' latency per model (vLLM, Triton, TGI, generic), probes, client API",
    ),
)


def selected(settings: AgentSettings) -> list[SourceSpec]:
    """The sources to run, in table order: those named in ``settings.sources``, else those on by default
    (and inference when it is configured). Raises ValueError naming the known ones for an unknown name."""
    known = [spec.name for spec in SOURCES]
    wanted = set(settings.sources) or {spec.name for spec in SOURCES if spec.default_on}
    if not settings.sources and settings.inference.configured():
        wanted.add("inference")
    unknown = wanted - set(known)
    if unknown:
        raise ValueError(f"unknown source(s) {sorted(unknown)}; known: {known}")
    return [spec for spec in SOURCES if spec.name in wanted]


__all__ = ["SOURCES", "SourceContext", "SourceFactory", "SourceSpec", "selected"]
