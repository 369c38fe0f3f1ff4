"""The `gpufleet` command line. Subcommands import the agent or the collector only when they run,
so an agent-only install (pip install 'gpufleet[agent]') works without the collector's dependencies."""

from __future__ import annotations

import functools
import getpass
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import click

from gpufleet import __version__
from gpufleet.logs import FORMATS, LEVELS
from gpufleet.params import DatabaseURL, Duration, ListenAddress, check_rule_files
from gpufleet.progress import StatusLine

_LOG_FORMAT_KEY = "gpufleet.log_format"  # in the click context's meta: how _announce writes


def _logging_options(f):
    """--log-level, --log-format and -v of the long-running commands. Logging is set up before the command
    runs, with the tokens among its options blanked out of every line."""

    @functools.wraps(f)
    def command(*args, log_level: str, log_format: str, verbose: bool, **kw):
        from gpufleet.logs import configure

        secrets = [kw.get(k) or "" for k in ("token", "slack_token", "grafana_token")]
        secrets += [spec.rpartition("@")[0] or spec for spec in _tokens(kw.get("tokens"))]
        configure("debug" if verbose else log_level, log_format, secrets=secrets)
        click.get_current_context().meta[_LOG_FORMAT_KEY] = log_format
        return f(*args, **kw)

    options = [
        click.option("--log-level", type=click.Choice(LEVELS), default="info", envvar="GPUFLEET_LOG_LEVEL",
                     show_default=True, help="Log this level and above."),
        click.option("--log-format", type=click.Choice(FORMATS), default="text", envvar="GPUFLEET_LOG_FORMAT",
                     show_default=True, help="Log lines as text, or as JSON: one object a line with time, level, "
                                             "logger and message."),
        click.option("-v", "--verbose", is_flag=True, help="Same as --log-level debug."),
    ]
    for opt in reversed(options):
        command = opt(command)
    return command


def _announce(text: str) -> None:
    """What a long-running command says once it runs: printed, or logged when the logs are JSON (so that every
    line a log pipeline reads is JSON)."""
    if click.get_current_context().meta.get(_LOG_FORMAT_KEY) == "json":
        logging.getLogger("gpufleet").info(text)
    else:
        click.echo(text)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def _tokens(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def _one_line(exc: BaseException) -> str:
    """An error's text on one line (database drivers' span several)."""
    return " ".join(str(exc).split())


class _Command(click.Command):
    """Every option shows its environment variable in --help and in its error messages."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _show_envvars(self.params)


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Groups too

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _show_envvars(self.params)


def _show_envvars(params: list[click.Parameter]) -> None:
    for p in params:
        if isinstance(p, click.Option):
            p.show_envvar = True


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpufleet")
def main() -> None:
    """gpufleet: monitoring for fleets of NVIDIA GPU nodes."""


# ---- agent ------------------------------------------------------------------------------------------
def _agent_options(f):
    options = [
        click.option("--listen", type=ListenAddress(), default="0.0.0.0:9445", envvar="GPUFLEET_LISTEN",
                     show_default=True, help="HOST:PORT for /metrics and /healthz."),
        click.option("--simulate", type=click.IntRange(0, 1024), default=0, envvar="GPUFLEET_SIMULATE",
                     help="Simulate N GPUs instead of reading NVML."),
        click.option("--node", default=None, envvar=["GPUFLEET_NODE", "NODE_NAME"],
                     help="Node name on every series [default: the host name]."),
        click.option("--cluster", default=None, envvar="GPUFLEET_CLUSTER", help="Cluster label on every series."),
        click.option("--interval", type=Duration(0.05), default=1.0, envvar="GPUFLEET_INTERVAL",
                     show_default=True, help="Time between samples: seconds, or a duration such as 500ms."),
        click.option("--push-interval", type=Duration(0.1), default=5.0, envvar="GPUFLEET_PUSH_INTERVAL",
                     show_default=True, help="Time between pushes, seconds or a duration (urgent events go at once)."),
        click.option("--token", default=None, envvar="GPUFLEET_TOKEN", help="Bearer token for the collector."),
        click.option("--metric-names", type=click.Choice(["gpufleet", "dcgm"]), default="gpufleet",
                     envvar="GPUFLEET_METRIC_NAMES", show_default=True,
                     help="Name metrics as gpufleet does or as dcgm-exporter does."),
        click.option("--pod-resources-socket", default=None, envvar="GPUFLEET_POD_RESOURCES_SOCKET",
                     help="Label GPUs with the pod/namespace/container holding them, from the kubelet "
                          "pod-resources API at this unix socket (usually /var/lib/kubelet/pod-resources/kubelet.sock)."),
        click.option("--process-metrics/--no-process-metrics", default=False, envvar="GPUFLEET_PROCESS_METRICS",
                     help="Per-process GPU memory and SM utilization with each process's container (more series)."),
        click.option("--proc-root", default="/proc", envvar="GPUFLEET_PROC_ROOT", show_default=True,
                     help="The host's /proc (mount it, e.g. /host/proc, when the agent runs in a container)."),
        click.option("--spool-dir", default="/var/lib/gpufleet/spool", envvar="GPUFLEET_SPOOL_DIR",
                     show_default=True, help="Folder for batches the collector cannot take yet ('' : memory only)."),
        click.option("--spool-max-bytes", default="512MiB", envvar="GPUFLEET_SPOOL_MAX_BYTES", show_default=True,
                     help="Spool size limit; the oldest batches are dropped (and counted) past it."),
        click.option("--spool-max-age", default="24h", envvar="GPUFLEET_SPOOL_MAX_AGE", show_default=True,
                     help="Spooled batches older than this duration (e.g. 90m, 2d; bare numbers are seconds) "
                          "are dropped (and counted)."),
        click.option("--ca-bundle", default=None, envvar="GPUFLEET_CA_BUNDLE", type=click.Path(exists=True),
                     help="CA file to verify an https collector [default: the system's CAs]."),
        click.option("--client-cert", default=None, envvar="GPUFLEET_CLIENT_CERT", type=click.Path(exists=True),
                     help="Client certificate (PEM) for a collector that requires mutual TLS."),
        click.option("--client-key", default=None, envvar="GPUFLEET_CLIENT_KEY", type=click.Path(exists=True),
                     help="Key of --client-cert (PEM)."),
        click.option("--sources", default="", envvar="GPUFLEET_SOURCES",
                     help="Comma-separated sources to run [default: all on by default]."),
    ]
    for opt in reversed(options + _inference_options()):
        f = opt(f)
    return f


def _inference_options() -> list:
    """Inference latency (docs/inference.md): the source runs only when one of these gives it work."""
    return [
        click.option("--inference-endpoint", "inference_endpoints", multiple=True, metavar="NAME=URL",
                     envvar="GPUFLEET_INFERENCE_ENDPOINTS",
                     help="Scrape an inference server's metrics page (vLLM, Triton, TGI; told apart by its metric "
                          "names). Repeatable; the variable takes a space-separated list."),
        click.option("--inference-config", type=click.Path(exists=True, dir_okay=False),
                     envvar="GPUFLEET_INFERENCE_CONFIG",
                     help="YAML file of endpoints, probes, Kubernetes discovery, receiver and SLOs."),
        click.option("--inference-kubelet", metavar="URL", envvar="GPUFLEET_INFERENCE_KUBELET",
                     help="Discover annotated inference pods on this node from the kubelet, "
                          "e.g. http://$NODE_IP:10255."),
        click.option("--inference-interval", type=Duration(0.1), default=10.0,
                     envvar="GPUFLEET_INFERENCE_INTERVAL", show_default=True,
                     help="Time between scrapes (seconds or a duration); quantiles and rates cover this interval."),
        click.option("--inference-slo", metavar="SECONDS:TARGET", envvar="GPUFLEET_INFERENCE_SLO",
                     help="Default latency objective per model, e.g. 2.5:0.99 (99% within 2.5 s)."),
        click.option("--inference-probe", "inference_probes", multiple=True, metavar="NAME=URL",
                     envvar="GPUFLEET_INFERENCE_PROBES",
                     help="Probe a URL: .../v1/chat/completions or .../v1/completions streams a tiny prompt "
                          "(time to first token, total time); anything else is an HTTP probe. Repeatable."),
        click.option("--inference-probe-interval", type=Duration(0.1), default=30.0,
                     envvar="GPUFLEET_INFERENCE_PROBE_INTERVAL", show_default=True,
                     help="Time between probes, seconds or a duration."),
        click.option("--inference-probe-timeout", type=Duration(0.1), default=10.0,
                     envvar="GPUFLEET_INFERENCE_PROBE_TIMEOUT", show_default=True,
                     help="A probe slower than this (seconds or a duration) fails with reason timeout."),
        click.option("--inference-probe-prompt", default=None, envvar="GPUFLEET_INFERENCE_PROBE_PROMPT",
                     help="Prompt of the OpenAI probes [default: Say OK.]."),
        click.option("--inference-probe-model", default=None, envvar="GPUFLEET_INFERENCE_PROBE_MODEL",
                     help="Model of the OpenAI probes [default: the first of the server's /v1/models]."),
        click.option("--inference-probe-max-tokens", type=click.IntRange(1), default=None,
                     envvar="GPUFLEET_INFERENCE_PROBE_MAX_TOKENS", help="max_tokens of the OpenAI probes [default: 8]."),
        click.option("--inference-receiver", metavar="ADDRESS", envvar="GPUFLEET_INFERENCE_RECEIVER",
                     help="Receive latencies from gpufleet.inference_client: udp://127.0.0.1:9447 or unix:///PATH."),
    ]


def _inference_settings(kw: dict):
    from gpufleet.agent.inference.config import ConfigError, settings_from_flags

    try:
        return settings_from_flags(
            endpoints=kw.get("inference_endpoints") or (), config=kw.get("inference_config"),
            kubelet=kw.get("inference_kubelet"), interval=kw.get("inference_interval", 10.0),
            slo=kw.get("inference_slo"), probes=kw.get("inference_probes") or (),
            probe_interval=kw.get("inference_probe_interval", 30.0), probe_timeout=kw.get("inference_probe_timeout", 10.0),
            probe_prompt=kw.get("inference_probe_prompt"), probe_model=kw.get("inference_probe_model"),
            probe_max_tokens=kw.get("inference_probe_max_tokens"), receiver=kw.get("inference_receiver"))
    except ConfigError as exc:  # a flag or the config file: a usage error, before anything starts
        raise click.UsageError(str(exc)) from None


def _agent_settings(**kw):
    from gpufleet.agent.main import AgentSettings

    s = AgentSettings(listen=kw["listen"], collector=kw.get("collector"), token=kw["token"], simulate=kw["simulate"],
                      cluster=kw["cluster"], interval=kw["interval"], push_interval=kw["push_interval"],
                      metric_names=kw["metric_names"], pod_resources_socket=kw["pod_resources_socket"],
                      process_metrics=kw["process_metrics"], proc_root=kw["proc_root"],
                      sources=tuple(x.strip() for x in kw["sources"].split(",") if x.strip()),
                      inference=_inference_settings(kw))
    if kw.get("node"):
        s.node = kw["node"]
    from gpufleet.agent.spool import parse_age, parse_size

    try:
        s.spool_max_bytes = parse_size(kw["spool_max_bytes"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--spool-max-bytes' (GPUFLEET_SPOOL_MAX_BYTES)") from None
    try:
        s.spool_max_age = parse_age(kw["spool_max_age"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--spool-max-age' (GPUFLEET_SPOOL_MAX_AGE)") from None
    s.spool_dir = kw["spool_dir"] or None
    s.ca_bundle, s.client_cert, s.client_key = kw["ca_bundle"], kw["client_cert"], kw["client_key"]
    if s.client_cert and not s.client_key:
        raise click.BadParameter("--client-cert needs --client-key (GPUFLEET_CLIENT_KEY)")
    return s


@main.command()
@click.option("--collector", default=None, envvar="GPUFLEET_COLLECTOR",
              help="Collector URL, e.g. http://collector:9446 (omit to only serve /metrics).")
@_agent_options
@_logging_options
def agent(**kw) -> None:
    """Run the node agent: sample GPUs, serve /metrics, push to the collector."""
    from gpufleet.agent.main import start_agent
    from gpufleet.agent.nvml import NvmlUnavailable

    settings = _agent_settings(**kw)
    try:
        running = start_agent(settings)
    except NvmlUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.listen}: {exc}") from None
    gpu = next((src for src in running.agent.sources if src.name == "gpu"), None)
    what = f"{settings.simulate} simulated GPUs" if settings.simulate else \
        f"{len(gpu.gpus) if gpu is not None else 0} GPUs through NVML"
    inference = next((src for src in running.agent.sources if src.name == "inference"), None)
    if inference is not None:
        what += (f"; inference: {len(inference.endpoints)} endpoint(s), {len(settings.inference.probes)} probe(s)"
                 + (", kubelet discovery" if settings.inference.kubernetes else "")
                 + (f", client API at {settings.inference.receiver}" if settings.inference.receiver else ""))
    _announce(f"gpufleet agent on {settings.node}: {what}; metrics at http://{settings.listen}/metrics"
              + (f"; pushing to {running.pusher.url}" if running.pusher else ""))
    _wait_for_signal()
    running.stop()


# ---- collector --------------------------------------------------------------------------------------
# Retention: a Prometheus duration, or a bare number of days as the flags took before they took durations.
_RETENTION = Duration(6 * 3600, unit_s=86400)


def _collector_options(f):
    options = [
        click.option("--db", type=DatabaseURL(), default="sqlite:///gpufleet.db", envvar="GPUFLEET_DB",
                     show_default=True, help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB."),
        click.option("--rules", "rules", multiple=True, type=click.Path(exists=True, path_type=Path),
                     callback=check_rule_files, envvar="GPUFLEET_RULES",
                     help="Rule files or folders [default: the built-in rule pack]."),
        click.option("--eval-interval", type=Duration(0.1), default=5.0, envvar="GPUFLEET_EVAL_INTERVAL",
                     show_default=True, help="Time between rule evaluations, seconds or a duration (events are "
                                             "evaluated at once)."),
        click.option("--slack-token", default=None, envvar="GPUFLEET_SLACK_TOKEN", help="Slack bot token (xoxb-…)."),
        click.option("--slack-channel", default=None, envvar="GPUFLEET_SLACK_CHANNEL", help="Slack channel ID."),
        click.option("--slack-base-url", default="https://slack.com/api/", envvar="GPUFLEET_SLACK_BASE_URL",
                     show_default=True, help="Slack Web API base URL."),
        click.option("--grafana-url", default=None, envvar="GPUFLEET_GRAFANA_URL",
                     help="Grafana URL: push dashboards and data sources on start, post alerts as annotations."),
        click.option("--grafana-token", default=None, envvar="GPUFLEET_GRAFANA_TOKEN",
                     help="Grafana service-account token (Editor role)."),
        click.option("--grafana-dashboard-url", default=None, envvar="GPUFLEET_GRAFANA_DASHBOARD_URL",
                     help="Grafana dashboard URL Slack messages link to, with the alert's time window and GPU."),
        click.option("--forward", "forward", multiple=True, envvar="GPUFLEET_FORWARD",
                     help="Remote-write URL to forward every stored batch to (repeatable), e.g. "
                          "http://prometheus:9090/api/v1/write."),
        click.option("--retention-raw", type=_RETENTION, default=15.0, envvar="GPUFLEET_RETENTION_RAW",
                     show_default=True, help="How long to keep raw samples: a duration (36h, 2w) or days."),
        click.option("--retention-1m", type=_RETENTION, default=90.0, envvar="GPUFLEET_RETENTION_1M",
                     show_default=True, help="How long to keep 1-minute rollups: a duration (13w, 1y) or days."),
        click.option("--retention-1h", type=_RETENTION, default=730.0, envvar="GPUFLEET_RETENTION_1H",
                     show_default=True, help="How long to keep 1-hour rollups: a duration (2y) or days."),
        click.option("--raw-layout", type=click.Choice(["chunks", "rows"]), default="chunks",
                     envvar="GPUFLEET_RAW_LAYOUT", show_default=True,
                     help="PostgreSQL raw samples: compressed chunks, or one row per sample (for comparisons)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _collector_settings(listen: str, db: str, rules, eval_interval: float, slack_token, slack_channel,
                        slack_base_url, tokens=(), console=False, grafana_url=None, grafana_token=None,
                        grafana_dashboard_url=None, forward=(), retention_raw=15.0, retention_1m=90.0,
                        retention_1h=730.0, raw_layout="chunks", **extra):
    from gpufleet.collector.service import CollectorSettings
    from gpufleet.collector.store.store import Retention

    day = 86_400_000
    return CollectorSettings(listen=listen, db=db, rules=list(rules), eval_interval=eval_interval,
                             tokens=list(tokens), console=console, slack_token=slack_token,
                             slack_channel=slack_channel, slack_base_url=slack_base_url,
                             grafana_url=grafana_url, grafana_token=grafana_token,
                             grafana_dashboard_url=grafana_dashboard_url, forward=list(forward),
                             retention=Retention(int(retention_raw * day), int(retention_1m * day),
                                                 int(retention_1h * day)),
                             raw_layout=raw_layout, **extra)

def _runbook_base_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from gpufleet.collector.rules.model import check_runbook_base_url

    try:
        return None if value is None else check_runbook_base_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _check_free(listen: str, flag: str) -> None:
    """Fail before opening the store when the address is taken: otherwise the web server finds out after the
    start-up line, in a log line of its own."""
    import socket

    from gpufleet.addresses import split_listen

    host, port = split_listen(listen)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
            s.bind((host, port))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen} ({exc.strerror or exc}): is another gpufleet "
                                   f"running there? Stop it or choose another {flag}") from None


def _security_options(f):
    options = [
        click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="GPUFLEET_TOKEN_FILE",
                     help="File of write tokens, one a line (SECRET or sha256:HEX, optionally @CLUSTER)."),
        click.option("--allow-open-writes", is_flag=True, envvar="GPUFLEET_ALLOW_OPEN_WRITES",
                     help="Accept writes without a token on a non-loopback address (not recommended)."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="GPUFLEET_TLS_CERT", help="PEM certificate (chain): serve HTTPS."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="GPUFLEET_TLS_KEY", help="PEM key of --tls-cert."),
        click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="GPUFLEET_TLS_CLIENT_CA", help="Require client certificates signed by this CA (mTLS)."),
        click.option("--max-body-bytes", type=click.IntRange(1024), default=16 << 20, envvar="GPUFLEET_MAX_BODY_BYTES",
                     show_default=True, help="Largest compressed remote-write body."),
        click.option("--max-uncompressed-bytes", type=click.IntRange(1024), default=64 << 20,
                     envvar="GPUFLEET_MAX_UNCOMPRESSED_BYTES", show_default=True,
                     help="Largest body once inflated (checked before inflating)."),
        click.option("--max-series", type=click.IntRange(1), default=100_000, envvar="GPUFLEET_MAX_SERIES",
                     show_default=True, help="Series per request."),
        click.option("--max-samples", type=click.IntRange(1), default=2_000_000, envvar="GPUFLEET_MAX_SAMPLES",
                     show_default=True, help="Samples per request."),
        click.option("--max-labels", type=click.IntRange(1), default=40, envvar="GPUFLEET_MAX_LABELS",
                     show_default=True, help="Labels per series."),
        click.option("--max-label-length", type=click.IntRange(1), default=2048, envvar="GPUFLEET_MAX_LABEL_LENGTH",
                     show_default=True, help="Characters per label value."),
        click.option("--max-inflight-writes", type=click.IntRange(1), default=64,
                     envvar="GPUFLEET_MAX_INFLIGHT_WRITES", show_default=True,
                     help="Writes stored at once; past it: 503 + Retry-After."),
        click.option("--name", default="", envvar="GPUFLEET_NAME", help="Replica name in logs [default: --listen]."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@main.command()
@click.option("--listen", type=ListenAddress(), default="0.0.0.0:9446", envvar="GPUFLEET_LISTEN", show_default=True,
              help="HOST:PORT of the API, the fleet page and /metrics.")
@click.option("--tokens", default=None, envvar="GPUFLEET_TOKENS",
              help="Comma-separated bearer tokens allowed to write; none: writes are open.")
@click.option("--console/--no-console", default=False, envvar="GPUFLEET_CONSOLE", help="Print notifications.")
@click.option("--report-cron", default=None, envvar="GPUFLEET_REPORT_CRON",
              help="Post the weekly efficiency digest to Slack on this crontab schedule (UTC), e.g. '0 9 * * mon'.")
@click.option("--report-channel", default=None, envvar="GPUFLEET_REPORT_CHANNEL",
              help="Slack channel ID for the digest [default: --slack-channel].")
@click.option("--public-url", default=None, envvar="GPUFLEET_PUBLIC_URL",
              help="This collector's URL as people reach it; the digest links to the full report there, alerts to "
                   "its /runbooks.")
@click.option("--runbook-base-url", default=None, envvar="GPUFLEET_RUNBOOK_BASE_URL", callback=_runbook_base_url,
              help="Where rules' runbook links point (BASE/NAME), e.g. your wiki [default: --public-url/runbooks, "
                   "else this collector's --listen address/runbooks].")
@_collector_options
@_security_options
@_logging_options
def collector(listen: str, tokens: str | None, console: bool, token_file, allow_open_writes: bool,
              tls_cert, tls_key, tls_client_ca, name: str, **kw) -> None:
    """Run the central collector: receive samples, store them, evaluate rules, notify."""
    from gpufleet.collector.app import Limits
    from gpufleet.collector.auth import TokenSet, parse_token
    from gpufleet.collector.rules.model import RuleError
    from gpufleet.collector.service import Collector
    from gpufleet.collector.store import StoreUnavailable
    from gpufleet.collector.store.migrate import SchemaTooNew

    limits = Limits(**{k: kw.pop(k) for k in list(kw) if k.startswith("max_")})
    try:
        token_list = [parse_token(t) for t in _tokens(tokens)]
        if token_file:
            token_list += TokenSet.from_file(token_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tokens / --token-file") from None
    except OSError as exc:
        raise click.BadParameter(f"cannot read {token_file}: {exc.strerror or exc}",
                                 param_hint="--token-file (GPUFLEET_TOKEN_FILE)") from None
    settings = _collector_settings(listen, tokens=token_list, console=console, limits=limits, tls_cert=tls_cert,
                                   tls_key=tls_key, tls_client_ca=tls_client_ca, name=name, **kw)
    if not settings.tokens:
        if not _is_loopback(listen) and not allow_open_writes:
            raise click.UsageError(
                f"no write tokens configured and --listen {listen} is reachable from other hosts: give "
                "--tokens / --token-file (GPUFLEET_TOKENS, GPUFLEET_TOKEN_FILE), listen on 127.0.0.1, or pass "
                "--allow-open-writes to accept writes from anyone")
        logging.getLogger("gpufleet").warning("no write tokens configured: anyone who reaches %s can write", listen)
    _check_free(listen, "--listen")
    try:
        c = Collector(settings)
    except (RuleError, StoreUnavailable, SchemaTooNew, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _announce(f"gpufleet collector on {c.scheme}://{listen} (store: {c.store.engine.url.render_as_string()}, "
              f"{len(c.rules)} rules, {len(settings.tokens)} write tokens"
              f"{', client certificates required' if tls_client_ca else ''})")
    c.serve()


@main.command("hash-token")
@click.argument("token", required=False)
def hash_token_cmd(token: str | None) -> None:
    """Print the sha256:HEX form of a write token (read from stdin when not given), for --tokens."""
    from gpufleet.collector.auth import hash_token

    secret = token if token is not None else sys.stdin.read().strip()
    if not secret:
        raise click.UsageError("give the token as an argument or on stdin")
    click.echo(f"sha256:{hash_token(secret)}")


# ---- up ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--simulate", type=click.IntRange(0, 1024), default=None, envvar="GPUFLEET_SIMULATE",
              help="Simulate N GPUs [default: real GPUs if NVML works, else 4 simulated].")
@click.option("--agent-listen", type=ListenAddress(), default="127.0.0.1:9445", envvar="GPUFLEET_AGENT_LISTEN",
              show_default=True, help="Agent HOST:PORT (/metrics).")
@click.option("--listen", type=ListenAddress(), default="127.0.0.1:9446", envvar="GPUFLEET_LISTEN",
              show_default=True, help="Collector HOST:PORT (the fleet page and the API).")
@click.option("--interval", type=Duration(0.05), default=1.0, envvar="GPUFLEET_INTERVAL", show_default=True,
              help="Time between samples, seconds or a duration.")
@click.option("--push-interval", type=Duration(0.1), default=2.0, envvar="GPUFLEET_PUSH_INTERVAL",
              show_default=True, help="Time between the agent's pushes, seconds or a duration.")
@click.option("--db", type=DatabaseURL(), default="sqlite:///gpufleet.db", envvar="GPUFLEET_DB", show_default=True,
              help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB.")
@click.option("--rules", "rules", multiple=True, type=click.Path(exists=True, path_type=Path),
              callback=check_rule_files, envvar="GPUFLEET_RULES",
              help="Rule files or folders [default: the built-in rule pack].")
@click.option("--eval-interval", type=Duration(0.1), default=2.0, envvar="GPUFLEET_EVAL_INTERVAL",
              show_default=True, help="Time between rule evaluations, seconds or a duration.")
@click.option("--slack-token", default=None, envvar="GPUFLEET_SLACK_TOKEN", help="Slack bot token (xoxb-…).")
@click.option("--slack-channel", default=None, envvar="GPUFLEET_SLACK_CHANNEL", help="Slack channel ID.")
@click.option("--slack-base-url", default="https://slack.com/api/", envvar="GPUFLEET_SLACK_BASE_URL",
              show_default=True, help="Slack Web API base URL.")
@click.option("--grafana-dashboard-url", default=None, envvar="GPUFLEET_GRAFANA_DASHBOARD_URL",
              help="Grafana dashboard URL Slack messages link to, with the alert's time window and GPU.")
@click.option("--runbook-base-url", default=None, envvar="GPUFLEET_RUNBOOK_BASE_URL", callback=_runbook_base_url,
              help="Where rules' runbook links point (BASE/NAME) [default: http://LISTEN/runbooks].")
@_logging_options
def up(simulate, agent_listen, listen, interval, push_interval, db, rules, eval_interval, slack_token,
       slack_channel, slack_base_url, grafana_dashboard_url, runbook_base_url) -> None:
    """Everything on one machine: collector + local agent + default rules. The first thing to run."""
    from gpufleet.agent.main import AgentSettings, start_agent
    from gpufleet.agent.nvml import Nvml, NvmlUnavailable
    from gpufleet.collector.service import Collector

    if simulate is None:
        try:
            probe = Nvml()
            probe.start()
            n = len(probe.gpus())
            probe.shutdown()
            simulate = 0 if n else 4
            why = f"{n} real GPU(s) found through NVML" if n else "NVML works but sees no GPU: simulating 4 GPUs"
        except NvmlUnavailable as exc:
            simulate = 4
            why = f"no NVIDIA GPU here ({str(exc).split(';')[0]}): simulating 4 GPUs"
    else:
        why = f"simulating {simulate} GPUs (--simulate)" if simulate else "real GPUs through NVML (--simulate 0)"
    settings = _collector_settings(listen, db, rules, eval_interval, slack_token, slack_channel, slack_base_url,
                                   console=True, grafana_dashboard_url=grafana_dashboard_url,
                                   runbook_base_url=runbook_base_url)
    _check_free(listen, "--listen")
    _check_free(agent_listen, "--agent-listen")
    try:
        c = Collector(settings).start()
    except Exception as exc:
        raise click.ClickException(f"collector did not start: {exc}") from None
    try:
        # simulated GPUs keep their UUIDs from one `up` to the next, as real ones do: otherwise the GPUs of
        # the last run would read as missing from this node's inventory
        running = start_agent(AgentSettings(listen=agent_listen, collector=f"http://{listen}", simulate=simulate,
                                            interval=interval, push_interval=push_interval,
                                            seed=1 if simulate else None))
    except (NvmlUnavailable, OSError) as exc:
        c.close()
        raise click.ClickException(f"agent did not start: {exc}") from None
    lines = [f"gpufleet up: {why}",
             f"  fleet page      http://{listen}/",
             f"  agent metrics   http://{agent_listen}/metrics",
             f"  GPUs            http://{listen}/api/v1/gpus",
             f"  alerts          http://{listen}/api/v1/alerts",
             f"  runbooks        http://{listen}/runbooks/",
             f"  store           {c.store.engine.url.render_as_string()}"]
    if simulate:
        lines.append(f"  inject a fault  gpufleet simulate inject --agent http://{agent_listen} --gpu 0 xid --xid 79")
    lines.append("  writes are open on loopback (no tokens); Ctrl-C stops")
    _announce("\n".join(lines))
    _wait_for_signal()
    _announce("stopping…")
    running.stop()
    c.close()


# ---- top and report ---------------------------------------------------------------------------------
@main.command()
@click.option("--collector", "collector_url", default="http://127.0.0.1:9446", envvar="GPUFLEET_COLLECTOR",
              show_default=True, help="Collector URL.")
@click.option("--interval", type=Duration(0.2), default=2.0, show_default=True,
              help="Time between refreshes, seconds or a duration.")
@click.option("--sort", "sort_key", type=click.Choice(["node", "sm", "util", "memory", "temperature", "power", "alerts"]),
              default="node", show_default=True)
@click.option("--cluster", default=None, help="Only GPUs of this cluster.")
@click.option("--node", default=None, help="Only GPUs whose node name contains this.")
@click.option("--pod", default=None, help="Only GPUs whose pod (namespace/pod) contains this.")
def top(collector_url: str, interval: float, sort_key: str, cluster, node, pod) -> None:
    """A live terminal view of every GPU in the fleet. Keys: s SM, u util, m memory, t temperature, p power,
    a alerts, n node; r reverses; / filters; q quits."""
    try:
        from gpufleet.top import Filters, run_top
    except ImportError as exc:
        raise click.ClickException(f"gpufleet top needs rich: pip install 'gpufleet[cli]' ({exc})") from None
    try:
        run_top(collector_url, interval=interval, sort_key=sort_key, filters=Filters(cluster, node, pod))
    except OSError as exc:
        raise click.ClickException(str(exc)) from None


def _unix_time(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither Unix seconds nor an ISO 8601 time") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


@main.command()
@click.option("--since", default="7d", show_default=True,
              help="How far back: a duration (7d, 24h, 1h30m), Unix seconds or an ISO 8601 time.")
@click.option("--until", default=None, help="End of the range, Unix seconds or ISO 8601 [default: now].")
@click.option("--format", "fmt", type=click.Choice(["markdown", "html"]), default="markdown", show_default=True)
@click.option("--db", type=DatabaseURL(), default=None, envvar="GPUFLEET_DB",
              help="Read the store directly (SQLAlchemy URL) [default: sqlite:///gpufleet.db].")
@click.option("--collector", "collector_url", default=None, envvar="GPUFLEET_COLLECTOR",
              help="Ask a running collector instead (its /api/v1/report).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file [default: standard output].")
def report(since: str, until: str | None, fmt: str, db: str | None, collector_url: str | None,
           output: Path | None) -> None:
    """Efficiency report: GPU-hours by state, wasted hours by pod, throttling, XID/ECC, energy, tokens per joule."""
    end = _unix_time(until)
    if collector_url:
        import contextlib
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        query = {"since": since, "format": fmt, **({"until": str(end)} if end is not None else {})}
        url = collector_url.rstrip("/") + "/api/v1/report?" + urllib.parse.urlencode(query)
        try:
            with StatusLine("report: ") as status:
                status(f"waiting for the collector at {collector_url}")
                with urllib.request.urlopen(url, timeout=300) as resp:
                    body = resp.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["detail"]
            raise click.ClickException(f"the collector refused the report: {detail}") from None
        except OSError as exc:
            raise click.ClickException(f"cannot reach the collector at {collector_url} ({exc})") from None
    else:
        from sqlalchemy.exc import SQLAlchemyError

        from gpufleet.collector.report import ReportError, build_report, parse_since, render
        from gpufleet.collector.store import Store, StoreUnavailable

        try:
            start, stop = parse_since(since, end)
        except ReportError as exc:
            raise click.BadParameter(str(exc), param_hint="'--since' / '--until'") from None
        try:  # a report only reads: it never creates a store (an empty SQLite file) where there was none
            store = Store.open(db or "sqlite:///gpufleet.db", migrate_schema=False, create=False)
        except StoreUnavailable as exc:
            raise click.ClickException(str(exc)) from None
        where = store.engine.url.render_as_string()
        try:
            with StatusLine("report: ") as status:
                status(f"connecting to {where}")
                try:
                    store.ping()
                except SQLAlchemyError as exc:
                    raise click.ClickException(f"cannot open the store at {where}: "
                                               f"{_one_line(getattr(exc, 'orig', None) or exc)}") from None
                body = render(build_report(store.engine, start, stop, progress=status), fmt)
        except SQLAlchemyError as exc:
            raise click.ClickException(f"cannot read the store at {where} "
                                       f"({_one_line(getattr(exc, 'orig', None) or exc)}); is it a gpufleet store? "
                                       "`gpufleet db upgrade --db URL` creates or upgrades one") from None
        finally:
            store.close()
    if output:
        output.write_text(body)
        click.echo(f"report written to {output}", err=True)
    else:
        click.echo(body, nl=False)


# ---- simulate ---------------------------------------------------------------------------------------
@main.group()
def simulate() -> None:
    """Drive the GPU simulator of a running agent (started with --simulate)."""


@simulate.command("inject")
@click.argument("kind", type=click.Choice(["xid", "lost", "thermal", "sw_thermal", "hw_slowdown", "power_brake",
                                           "idle_memory", "ecc", "recover"]))
@click.option("--agent", "agent_url", default="http://127.0.0.1:9445", envvar="GPUFLEET_AGENT", show_default=True,
              help="URL of the agent running with --simulate.")
@click.option("--gpu", type=click.IntRange(0), default=0, envvar="GPUFLEET_SIMULATE_GPU", show_default=True,
              help="Index of the simulated GPU.")
@click.option("--xid", type=int, default=None, envvar="GPUFLEET_SIMULATE_XID", help="XID code, for kind xid.")
@click.option("--duration", type=Duration(), default=120.0, envvar="GPUFLEET_SIMULATE_DURATION", show_default=True,
              help="How long lasting faults last: seconds or a duration such as 5m.")
def simulate_inject(kind, agent_url, gpu, xid, duration) -> None:
    """Inject a fault into a simulated GPU."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"gpu": gpu, "kind": kind, "xid": xid, "duration": duration}).encode()
    req = urllib.request.Request(agent_url.rstrip("/") + "/simulate/faults", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            click.echo(json.loads(resp.read())["injected"])
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"agent refused: {exc.read().decode(errors='replace')}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the agent at {agent_url} ({exc}); is it running with --simulate?") from None


# ---- alerts -----------------------------------------------------------------------------------------
@main.group()
def alerts() -> None:
    """Validate, test, backtest and export alert rules."""


@alerts.command("check")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def alerts_check(paths) -> None:
    """Validate rule files (default: the built-in rule pack); every problem with file, line and rule."""
    from gpufleet.collector.rules.model import RuleError, default_rules_path, load_rules

    try:
        rules = load_rules(list(paths) or [default_rules_path()])
    except RuleError as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(1)
    click.echo(f"{len(rules)} rules OK")


# ---- dashboards -------------------------------------------------------------------------------------
@main.group()
def dashboards() -> None:
    """Build the Grafana dashboards from code, or push them to a Grafana."""


@dashboards.command("build")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write into [default: the dashboards package, where they are committed].")
@click.option("--check", is_flag=True, help="Write nothing; fail if the files on disk differ from the code.")
def dashboards_build(out: Path | None, check: bool) -> None:
    """Generate dashboards/*.json (every dashboard, PostgreSQL and Prometheus flavours)."""
    from gpufleet import dashboards as dash
    from gpufleet.dashboards.render import dumps

    directory = out or dash.HERE
    if check:
        want = {name: dumps(model) for name, model in dash.build().items()}
        have = dash.committed(directory)
        differ = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        if differ:
            raise click.ClickException(f"{len(differ)} dashboard file(s) differ from the code: {', '.join(differ)}; "
                                       "run `gpufleet dashboards build` and commit the result")
        click.echo(f"{len(want)} dashboard files match the code")
        return
    for path in dash.write(directory):
        click.echo(f"wrote {path}")


@dashboards.command("push")
@click.option("--grafana-url", required=True, envvar="GPUFLEET_GRAFANA_URL", help="Grafana URL, e.g. http://grafana:3000")
@click.option("--grafana-token", default=None, envvar="GPUFLEET_GRAFANA_TOKEN",
              help="Grafana service-account token (Editor role).")
@click.option("--db", default=None, envvar="GPUFLEET_DB",
              help="The collector's PostgreSQL store as Grafana reaches it (PostgreSQL flavour).")
@click.option("--prometheus-url", default=None, envvar="GPUFLEET_PROMETHEUS_URL",
              help="A Prometheus scraping the agents, as Grafana reaches it (Prometheus flavour).")
def dashboards_push(grafana_url: str, grafana_token: str | None, db: str | None, prometheus_url: str | None) -> None:
    """Create or update the gpufleet folder, data sources and dashboards in Grafana (idempotent)."""
    from gpufleet.collector.grafana import collector_pusher, connect

    try:
        pusher = collector_pusher(connect(grafana_url, grafana_token), db or "", prometheus_url)
        report = pusher.push()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"pushing to Grafana at {grafana_url} failed: {exc}") from None
    click.echo(f"Grafana at {grafana_url}: {report}")


def _load_pack(paths):
    from gpufleet.collector.rules.model import RuleError, default_rules_path, load_pack

    try:
        return load_pack(list(paths) or [default_rules_path()])
    except RuleError as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(1)


@alerts.command("test")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def alerts_test(paths) -> None:
    """Run rule unit tests (default: the built-in pack's alerts/tests/), like `promtool test rules`."""
    from gpufleet.collector.rules.model import RuleError, default_rules_path
    from gpufleet.collector.rules.testing import run_tests

    try:
        total, failures = run_tests(list(paths) or [default_rules_path() / "tests"])
    except RuleError as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(1)
    for f in failures:
        click.echo(f"FAILED {f}", err=True)
    click.echo(f"{total - len({(f.file, f.test) for f in failures})}/{total} rule tests passed")
    sys.exit(1 if failures else 0)


@alerts.command("backtest")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rules", "rules", multiple=True, type=click.Path(exists=True, path_type=Path),
              callback=check_rule_files, help="Rule files or folders [default: the built-in rule pack].")
@click.option("--step", type=Duration(0.001), default=None,
              help="Time between evaluations, seconds or a duration [default: the trace's sampling interval].")
def alerts_backtest(trace, rules, step) -> None:
    """Replay TRACE (OpenMetrics text with timestamps) through the rule engine; print each notification
    it would send as a JSON line: alert, state, at (Unix seconds), labels. On a terminal, a status line on
    standard error says how far through the trace the replay is."""
    from gpufleet.collector.rules.backtest import TraceError, backtest_file

    pack = _load_pack(rules)
    try:
        with StatusLine("backtest: ") as status:
            n = backtest_file(trace, pack, status.above(sys.stdout), step_s=step, progress=status)
    except TraceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{n} notifications", err=True)


@alerts.command("export")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["prometheus", "prometheusrule"]), default="prometheus",
              show_default=True, help="A Prometheus rule file, or a PrometheusRule object (Prometheus Operator).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write [default: standard output].")
@click.option("--name", default="gpufleet-gpu", show_default=True, help="PrometheusRule metadata.name.")
@click.option("--namespace", default=None, help="PrometheusRule metadata.namespace.")
@click.option("--runbook-base-url", default=None, envvar="GPUFLEET_RUNBOOK_BASE_URL", callback=_runbook_base_url,
              help="Where runbook links point (BASE/NAME): your collector's public URL + /runbooks, or a wiki "
                   "[default: http://localhost:9446/runbooks].")
def alerts_export(paths, fmt, output, name, namespace, runbook_base_url) -> None:
    """Write the rules PromQL can express (default: the built-in pack) for Prometheus / Alertmanager."""
    from gpufleet.collector.rules.export import DEFAULT_RUNBOOK_BASE_URL, export

    if runbook_base_url is None:
        click.echo(f"runbook links point at {DEFAULT_RUNBOOK_BASE_URL}/NAME; pass --runbook-base-url with the URL "
                   "people reach your collector by (+ /runbooks) or your wiki's", err=True)
    text, skipped = export(_load_pack(paths), fmt, name=name, namespace=namespace,
                           runbook_base_url=runbook_base_url or DEFAULT_RUNBOOK_BASE_URL)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)
    for s in skipped:
        click.echo(f"not exported: {s}", err=True)


# ---- silence ----------------------------------------------------------------------------------------
@main.group()
def silence() -> None:
    """Mute alerts for a while: add, list and expire silences on a collector."""


def _api(collector_url: str, method: str, path: str, token: str | None, body: dict | None = None):
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(collector_url.rstrip("/") + path, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise click.ClickException(f"the collector refused ({exc.code}): {detail}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the collector at {collector_url} ({exc}); "
                                   "set --collector (GPUFLEET_COLLECTOR)") from None


def _os_user(environ: Mapping[str, str] = os.environ, getuser: Callable[[], str] = getpass.getuser) -> str:
    """Who runs the command: $USER, else the login name the system knows (cron jobs and containers often
    run without $USER), else "unknown"."""
    if environ.get("USER"):
        return environ["USER"]
    try:
        return getuser() or "unknown"
    except (OSError, KeyError, ImportError):  # a uid without a passwd entry: KeyError, OSError on 3.13+
        return "unknown"


def _collector_api_options(f):
    f = click.option("--token", default=None, envvar="GPUFLEET_TOKEN", help="Bearer token for the collector.")(f)
    return click.option("--collector", "collector_url", default="http://127.0.0.1:9446", envvar="GPUFLEET_COLLECTOR",
                        show_default=True, help="Collector URL.")(f)


@silence.command("add")
@click.argument("matchers", nargs=-1, required=True)
@click.option("--duration", default="2h", show_default=True, help="How long: a duration such as 30m, 2h, 1d12h.")
@click.option("--author", default=_os_user, show_default="$USER, else the login name",
              help="Who silences.")
@click.option("--comment", required=True, help="Why (a ticket, the maintenance window).")
@_collector_api_options
def silence_add(matchers, duration, author, comment, collector_url, token) -> None:
    """Silence alerts matching every MATCHER (name=value, name!=value, name=~regex, name!~regex)."""
    from gpufleet.collector.rules.dispatch import Matcher
    from gpufleet.collector.rules.model import parse_duration

    try:
        parsed = [Matcher.parse(m) for m in matchers]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="MATCHERS") from None
    try:
        if parse_duration(duration) <= 0:
            raise ValueError(f"{duration!r} is no time at all: a silence must last a while, e.g. 2h")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--duration'") from None
    resp = _api(collector_url, "POST", "/api/v1/silences", token,
                {"matchers": [m.to_api() for m in parsed], "duration": duration, "createdBy": author,
                 "comment": comment})
    click.echo(resp["silenceID"])


@silence.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include expired silences.")
@_collector_api_options
def silence_list(show_all, collector_url, token) -> None:
    """List silences: id, state, until, author, matchers, comment."""
    import time as _time

    from gpufleet.collector.rules.dispatch import Matcher

    rows = _api(collector_url, "GET", "/api/v1/silences", token)["silences"]
    for s in rows:
        state = s["status"]["state"]
        if state == "expired" and not show_all:
            continue
        until = _time.strftime("%Y-%m-%d %H:%M UTC", _time.gmtime(s["endsAt"]))
        matchers = " ".join(str(Matcher.from_api(m)) for m in s["matchers"])
        click.echo(f"{s['id']}  {state:8} until {until}  by {s['createdBy']}  {matchers}  # {s['comment']}")


@silence.command("expire")
@click.argument("silence_ids", nargs=-1, required=True)
@_collector_api_options
def silence_expire(silence_ids, collector_url, token) -> None:
    """Expire silences now."""
    for sid in silence_ids:
        _api(collector_url, "DELETE", f"/api/v1/silences/{sid}", token)
        click.echo(f"expired {sid}")


# ---- db ---------------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Manage the collector's database schema."""


@db.command("upgrade")
@click.option("--db", "url", type=DatabaseURL(), default="sqlite:///gpufleet.db", envvar="GPUFLEET_DB",
              show_default=True, help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB.")
def db_upgrade(url: str) -> None:
    """Create the schema, or migrate it to this version of gpufleet (on a terminal, each step shows)."""
    from gpufleet.collector.store import Store, StoreUnavailable
    from gpufleet.collector.store.migrate import SchemaTooNew, current_revision

    store = Store.open(url, migrate_schema=False)  # connects only to upgrade, below
    try:
        with StatusLine("db upgrade: ") as status:
            status(f"connecting to {store.engine.url.render_as_string()}")
            store.upgrade_schema(progress=status)
        click.echo(f"schema at revision {current_revision(store.engine)}")
    except (StoreUnavailable, SchemaTooNew) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
