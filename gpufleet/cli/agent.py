"""`gpufleet agent`: the node agent. Its options are declared here once; `up` runs the same agent and takes the
sampling ones from here too. The options are named as AgentSettings' fields, and the settings are built from
those fields, so AgentSettings is the one description of what an agent can be told."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from gpufleet.agent.attribution import DEFAULT_JOB_LABEL_KEYS
from gpufleet.agent.fields import COSTLY_EVERY
from gpufleet.cli.common import Command, Decorator, announce, apply, logging_options, wait_for_signal
from gpufleet.cli.params import Duration, ListenAddress

if TYPE_CHECKING:
    from gpufleet.agent.inference.config import InferenceSettings, Kubernetes
    from gpufleet.agent.settings import AgentSettings

SIMULATE_MAX = 1024


def simulate_option(
    *, default: int | None = 0, help: str = "Simulate N GPUs instead of reading NVML."
) -> Decorator:  # noqa: A002
    return click.option(
        "--simulate",
        type=click.IntRange(0, SIMULATE_MAX),
        default=default,
        envvar="GPUFLEET_SIMULATE",
        help=help,
    )


def sampling_options(*, push_interval: float = 5.0) -> Decorator:
    """What the agent samples and how often: shared by `agent` and `up` (the agent `up` starts on this machine)."""
    options: list[Decorator] = [
        click.option(
            "--node",
            default=None,
            envvar=["GPUFLEET_NODE", "NODE_NAME"],
            help="Node name on every series [default: the host name].",
        ),
        click.option(
            "--cluster", default=None, envvar="GPUFLEET_CLUSTER", help="Cluster label on every series."
        ),
        click.option(
            "--interval",
            type=Duration(0.05),
            default=1.0,
            envvar="GPUFLEET_INTERVAL",
            show_default=True,
            help="Time between samples: seconds, or a duration such as 500ms.",
        ),
        click.option(
            "--push-interval",
            type=Duration(0.1),
            default=push_interval,
            envvar="GPUFLEET_PUSH_INTERVAL",
            show_default=True,
            help="Time between pushes, seconds or a duration (urgent events go at once).",
        ),
        click.option(
            "--slow-interval",
            type=Duration(1.0),
            default=30.0,
            envvar="GPUFLEET_SLOW_INTERVAL",
            show_default=True,
            help="Time between reads of the slow GPU rows (limits, NVLink state and errors, PCIe link), seconds "
            f"or a duration; the costliest (energy, throttle time, PCIe throughput) are read every {COSTLY_EVERY}th "
            "time.",
        ),
        click.option(
            "--metric-names",
            type=click.Choice(["gpufleet", "dcgm", "both"]),
            default="gpufleet",
            envvar="GPUFLEET_METRIC_NAMES",
            show_default=True,
            help="Name /metrics series as gpufleet does, as dcgm-exporter does, or both (each series under "
            "both names, for a migration). The push to the collector keeps gpufleet's names.",
        ),
        click.option(
            "--pod-resources-socket",
            default=None,
            envvar="GPUFLEET_POD_RESOURCES_SOCKET",
            help="Label GPUs with the pod/namespace/container holding them, from the kubelet "
            "pod-resources API at this unix socket (usually /var/lib/kubelet/pod-resources/kubelet.sock). "
            "Without it, GPUs get the Slurm job id of their processes' cgroup as their job label.",
        ),
        click.option(
            "--kubelet",
            metavar="URL",
            default=None,
            envvar="GPUFLEET_KUBELET",
            help="The kubelet of this node, e.g. http://$NODE_IP:10255 or https://$NODE_IP:10250 (with the "
            "pod's service-account token): its /pods gives the labels and owner of each GPU's pod, which "
            "name the GPU's job label (with --pod-resources-socket) [default: the kubelet of inference "
            "discovery, if any].",
        ),
        click.option(
            "--job-label-keys",
            metavar="KEY,...",
            default=",".join(DEFAULT_JOB_LABEL_KEYS),
            envvar="GPUFLEET_JOB_LABEL_KEYS",
            show_default=True,
            help="Pod label keys whose value names a pod's job, first match wins; a pod with none of them "
            "is named by its controller (Job, StatefulSet, Deployment, ...).",
        ),
        click.option(
            "--process-metrics/--no-process-metrics",
            default=False,
            envvar="GPUFLEET_PROCESS_METRICS",
            help="Per-process GPU memory and SM utilization with each process's container (more series).",
        ),
        click.option(
            "--nvlink-per-link/--no-nvlink-per-link",
            default=False,
            envvar="GPUFLEET_NVLINK_PER_LINK",
            help="NVLink error counters and link state per link as well as per GPU (more series: up to 108 "
            "per GPU with 18 links).",
        ),
        click.option(
            "--proc-root",
            default="/proc",
            envvar="GPUFLEET_PROC_ROOT",
            show_default=True,
            help="The host's /proc (mount it, e.g. /host/proc, when the agent runs in a container).",
        ),
        click.option(
            "--sources",
            default="",
            envvar="GPUFLEET_SOURCES",
            help="Comma-separated sources to run [default: all on by default].",
        ),
    ]
    return apply(options + inference_options())


def _transport_options() -> Decorator:
    """Where the agent serves and how it reaches a collector: the agent's own (`up` wires its agent itself)."""
    options: list[Decorator] = [
        click.option(
            "--collector",
            default=None,
            envvar="GPUFLEET_COLLECTOR",
            help="Collector URL, e.g. http://collector:9446 (omit to only serve /metrics).",
        ),
        click.option(
            "--listen",
            type=ListenAddress(),
            default="0.0.0.0:9445",
            envvar="GPUFLEET_LISTEN",
            show_default=True,
            help="HOST:PORT for /metrics and /healthz.",
        ),
        simulate_option(),
        click.option(
            "--token", default=None, envvar="GPUFLEET_TOKEN", help="Bearer token for the collector."
        ),
        click.option(
            "--spool-dir",
            default="/var/lib/gpufleet/spool",
            envvar="GPUFLEET_SPOOL_DIR",
            show_default=True,
            help="Folder for batches the collector cannot take yet ('' : memory only).",
        ),
        click.option(
            "--spool-max-bytes",
            default="512MiB",
            envvar="GPUFLEET_SPOOL_MAX_BYTES",
            show_default=True,
            help="Spool size limit; the oldest batches are dropped (and counted) past it.",
        ),
        click.option(
            "--spool-max-age",
            default="24h",
            envvar="GPUFLEET_SPOOL_MAX_AGE",
            show_default=True,
            help="Spooled batches older than this duration (e.g. 90m, 2d; bare numbers are seconds) "
            "are dropped (and counted).",
        ),
        click.option(
            "--ca-bundle",
            default=None,
            envvar="GPUFLEET_CA_BUNDLE",
            type=click.Path(exists=True),
            help="CA file to verify an https collector [default: the system's CAs].",
        ),
        click.option(
            "--client-cert",
            default=None,
            envvar="GPUFLEET_CLIENT_CERT",
            type=click.Path(exists=True),
            help="Client certificate (PEM) for a collector that requires mutual TLS.",
        ),
        click.option(
            "--client-key",
            default=None,
            envvar="GPUFLEET_CLIENT_KEY",
            type=click.Path(exists=True),
            help="Key of --client-cert (PEM).",
        ),
    ]
    return apply(options)


def inference_options() -> list[Decorator]:
    """Inference latency (docs/inference.md): the source runs only when one of these gives it work."""
    return [
        click.option(
            "--inference-endpoint",
            "inference_endpoints",
            multiple=True,
            metavar="NAME=URL",
            envvar="GPUFLEET_INFERENCE_ENDPOINTS",
            help="Scrape an inference server's metrics page (vLLM, Triton, TGI; told apart by its metric "
            "names). Repeatable; the variable takes a space-separated list.",
        ),
        click.option(
            "--inference-config",
            type=click.Path(exists=True, dir_okay=False),
            envvar="GPUFLEET_INFERENCE_CONFIG",
            help="YAML file of endpoints, probes, Kubernetes discovery, receiver and SLOs.",
        ),
        click.option(
            "--inference-kubelet",
            metavar="URL",
            envvar="GPUFLEET_INFERENCE_KUBELET",
            help="Discover annotated inference pods on this node from the kubelet, "
            "e.g. http://$NODE_IP:10255.",
        ),
        click.option(
            "--inference-interval",
            type=Duration(0.1),
            default=10.0,
            envvar="GPUFLEET_INFERENCE_INTERVAL",
            show_default=True,
            help="Time between scrapes (seconds or a duration); quantiles and rates cover this interval.",
        ),
        click.option(
            "--inference-slo",
            metavar="SECONDS:TARGET",
            envvar="GPUFLEET_INFERENCE_SLO",
            help="Default latency objective per model, e.g. 2.5:0.99 (99% within 2.5 s).",
        ),
        click.option(
            "--inference-probe",
            "inference_probes",
            multiple=True,
            metavar="NAME=URL",
            envvar="GPUFLEET_INFERENCE_PROBES",
            help="Probe a URL: .../v1/chat/completions or .../v1/completions streams a tiny prompt "
            "(time to first token, total time); anything else is an HTTP probe. Repeatable.",
        ),
        click.option(
            "--inference-probe-interval",
            type=Duration(0.1),
            default=30.0,
            envvar="GPUFLEET_INFERENCE_PROBE_INTERVAL",
            show_default=True,
            help="Time between probes, seconds or a duration.",
        ),
        click.option(
            "--inference-probe-timeout",
            type=Duration(0.1),
            default=10.0,
            envvar="GPUFLEET_INFERENCE_PROBE_TIMEOUT",
            show_default=True,
            help="A probe slower than this (seconds or a duration) fails with reason timeout.",
        ),
        click.option(
            "--inference-probe-prompt",
            default=None,
            envvar="GPUFLEET_INFERENCE_PROBE_PROMPT",
            help="Prompt of the OpenAI probes [default: Say OK.].",
        ),
        click.option(
            "--inference-probe-model",
            default=None,
            envvar="GPUFLEET_INFERENCE_PROBE_MODEL",
            help="Model of the OpenAI probes [default: the first of the server's /v1/models].",
        ),
        click.option(
            "--inference-probe-max-tokens",
            type=click.IntRange(1),
            default=None,
            envvar="GPUFLEET_INFERENCE_PROBE_MAX_TOKENS",
            help="max_tokens of the OpenAI probes [default: 8].",
        ),
        click.option(
            "--inference-receiver",
            metavar="ADDRESS",
            envvar="GPUFLEET_INFERENCE_RECEIVER",
            help="Receive latencies from gpufleet.inference_client: udp://127.0.0.1:9447 or unix:///PATH.",
        ),
    ]


def inference_settings(params: Mapping[str, Any]) -> InferenceSettings:
    from gpufleet.agent.inference.config import ConfigError, settings_from_flags

    try:
        return settings_from_flags(
            endpoints=params.get("inference_endpoints") or (),
            config=params.get("inference_config"),
            kubelet=params.get("inference_kubelet"),
            interval=params.get("inference_interval", 10.0),
            slo=params.get("inference_slo"),
            probes=params.get("inference_probes") or (),
            probe_interval=params.get("inference_probe_interval", 30.0),
            probe_timeout=params.get("inference_probe_timeout", 10.0),
            probe_prompt=params.get("inference_probe_prompt"),
            probe_model=params.get("inference_probe_model"),
            probe_max_tokens=params.get("inference_probe_max_tokens"),
            receiver=params.get("inference_receiver"),
        )
    except ConfigError as exc:  # a flag or the config file: a usage error, before anything starts
        raise click.UsageError(str(exc)) from None


# A Kubernetes label key: an optional DNS-subdomain prefix and a slash, then a name of at most 63 characters.
_LABEL_KEY = re.compile(
    r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)


def _label_keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in keys if not _LABEL_KEY.fullmatch(k)]
    if bad:
        raise click.BadParameter(
            f"{', '.join(map(repr, bad))} is not a pod label key; write keys such as "
            "batch.kubernetes.io/job-name,app.kubernetes.io/instance",
            param_hint="'--job-label-keys' (GPUFLEET_JOB_LABEL_KEYS)",
        )
    return keys


def _kubelet(url: str | None) -> Kubernetes | None:
    from gpufleet.agent.inference.config import ConfigError, kubelet_from_flag

    if not url:
        return None
    try:
        return kubelet_from_flag(url, "--kubelet (GPUFLEET_KUBELET)")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def agent_settings(params: Mapping[str, Any], **fixed: Any) -> AgentSettings:
    """AgentSettings from the command line: every option named as a field sets that field; the few that are
    written differently on the command line (lists, sizes, ages) are converted here. ``fixed`` sets fields
    the command decides itself (`up`: where its agent listens and pushes)."""
    from gpufleet.agent.settings import AgentSettings
    from gpufleet.agent.spool import parse_age, parse_size

    values = {f.name: params[f.name] for f in dataclasses.fields(AgentSettings) if f.name in params}
    if not values.get("node"):  # not given: the field's default, the host name
        values.pop("node", None)
    if "sources" in values:
        values["sources"] = tuple(x.strip() for x in params["sources"].split(",") if x.strip())
    if "spool_dir" in values:
        values["spool_dir"] = params["spool_dir"] or None
    if "kubelet" in values:
        values["kubelet"] = _kubelet(params["kubelet"])
    if "job_label_keys" in values:
        values["job_label_keys"] = _label_keys(params["job_label_keys"])
    if "spool_max_bytes" in values:
        try:
            values["spool_max_bytes"] = parse_size(params["spool_max_bytes"])
        except ValueError as exc:
            raise click.BadParameter(
                str(exc), param_hint="'--spool-max-bytes' (GPUFLEET_SPOOL_MAX_BYTES)"
            ) from None
    if "spool_max_age" in values:
        try:
            values["spool_max_age"] = parse_age(params["spool_max_age"])
        except ValueError as exc:
            raise click.BadParameter(
                str(exc), param_hint="'--spool-max-age' (GPUFLEET_SPOOL_MAX_AGE)"
            ) from None
    values["inference"] = inference_settings(params)
    values.update(fixed)
    settings = AgentSettings(**values)
    if settings.client_cert and not settings.client_key:
        raise click.BadParameter("--client-cert needs --client-key (GPUFLEET_CLIENT_KEY)")
    return settings


@click.command(cls=Command)
@_transport_options()
@sampling_options()
@logging_options
def agent(**params: Any) -> None:
    """Run the node agent: sample GPUs, serve /metrics, push to the collector."""
    from gpufleet.agent.main import start_agent
    from gpufleet.agent.nvml import NvmlUnavailable
    from gpufleet.agent.sources.gpu import GpuSource
    from gpufleet.agent.sources.inference import InferenceSource

    settings = agent_settings(params)
    try:
        running = start_agent(settings)
    except NvmlUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.listen}: {exc}") from None
    gpu = next((src for src in running.agent.sources if isinstance(src, GpuSource)), None)
    what = (
        f"{settings.simulate} simulated GPUs"
        if settings.simulate
        else f"{len(gpu.gpus) if gpu is not None else 0} GPUs through NVML"
    )
    inference = next((src for src in running.agent.sources if isinstance(src, InferenceSource)), None)
    if inference is not None:
        what += (
            f"; inference: {len(inference.endpoints)} endpoint(s), {len(settings.inference.probes)} probe(s)"
            + (", kubelet discovery" if settings.inference.kubernetes else "")
            + (f", client API at {settings.inference.receiver}" if settings.inference.receiver else "")
        )
    announce(
        f"gpufleet agent on {settings.node}: {what}; metrics at http://{settings.listen}/metrics"
        + (f"; pushing to {running.pusher.url}" if running.pusher else "")
    )
    wait_for_signal()
    running.stop()
