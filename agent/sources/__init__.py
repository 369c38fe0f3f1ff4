"""The agent's metric sources: one module each, listed here with whether they run by default.

Each source has ``name``, ``start()``, ``collect() -> list[Family]`` and ``close()``.
The agent times every source and reports ``gpufleet_agent_source_success`` and
``gpufleet_agent_source_duration_seconds``; one failing source never fails a sample.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceSpec:
    name: str
    module: str
    default_on: bool
    help: str


SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec("gpu", "gpufleet.agent.sources.gpu", True, "NVIDIA GPUs through NVML: field table, GPM, XID events"),
    SourceSpec("host", "gpufleet.agent.sources.host", True, "the node's CPU, memory and load through psutil"),
    # Off unless something is configured to scrape, probe or receive (AgentSettings.inference.configured()):
    # an agent with no inference server costs nothing.
    SourceSpec("inference", "gpufleet.agent.sources.inference", False,
               "inference servers' latency per model (vLLM, Triton, TGI, generic), probes, client API"),
)
