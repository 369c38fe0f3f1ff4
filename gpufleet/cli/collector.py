"""`gpufleet collector` and `gpufleet hash-token`. The collector's options are declared here once; `up` runs the
same collector and takes its store, rule and notification options from here. Options are named as
CollectorSettings' fields, and the settings are built from those fields."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gpufleet.cli.common import (
    Command,
    Decorator,
    announce,
    apply,
    check_free,
    is_loopback,
    logging_options,
    runbook_base_url,
    split_tokens,
)
from gpufleet.cli.params import DatabaseURL, Duration, ListenAddress, check_rule_files

if TYPE_CHECKING:
    from gpufleet.collector.auth import Token
    from gpufleet.collector.service import CollectorSettings

# Retention: a Prometheus duration, or a bare number of days as the flags took before they took durations.
_RETENTION = Duration(6 * 3600, unit_s=86400)
_DAY_MS = 86_400_000
DEFAULT_DB = "sqlite:///gpufleet.db"


def listen_option(*, default: str, help: str) -> Decorator:  # noqa: A002
    return click.option(
        "--listen",
        type=ListenAddress(),
        default=default,
        envvar="GPUFLEET_LISTEN",
        show_default=True,
        help=help,
    )


def db_option(
    *,
    default: str | None = DEFAULT_DB,
    envvar: str = "GPUFLEET_DB",
    help: str = "SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB.",  # noqa: A002
    name: str = "db",
) -> Decorator:
    return click.option(
        "--db",
        name,
        type=DatabaseURL(),
        default=default,
        envvar=envvar,
        show_default=default is not None,
        help=help,
    )


def collector_options(
    *,
    eval_interval: float = 5.0,
    runbook_default: str = "--public-url/runbooks, else this collector's --listen address/runbooks",
) -> Decorator:
    """What the collector stores, evaluates and tells people: shared by `collector` and `up`."""
    options: list[Decorator] = [
        db_option(),
        click.option(
            "--rules",
            "rules",
            multiple=True,
            type=click.Path(exists=True, path_type=Path),
            callback=check_rule_files,
            envvar="GPUFLEET_RULES",
            help="Rule files or folders [default: the built-in rule pack].",
        ),
        click.option(
            "--eval-interval",
            type=Duration(0.1),
            default=eval_interval,
            envvar="GPUFLEET_EVAL_INTERVAL",
            show_default=True,
            help="Time between rule evaluations, seconds or a duration (events are evaluated at once).",
        ),
        click.option(
            "--slack-token", default=None, envvar="GPUFLEET_SLACK_TOKEN", help="Slack bot token (xoxb-…)."
        ),
        click.option(
            "--slack-channel", default=None, envvar="GPUFLEET_SLACK_CHANNEL", help="Slack channel ID."
        ),
        click.option(
            "--slack-base-url",
            default="https://slack.com/api/",
            envvar="GPUFLEET_SLACK_BASE_URL",
            show_default=True,
            help="Slack Web API base URL.",
        ),
        click.option(
            "--report-cron",
            default=None,
            envvar="GPUFLEET_REPORT_CRON",
            help="Post the weekly efficiency digest to Slack on this crontab schedule (UTC), e.g. "
            "'0 9 * * mon'.",
        ),
        click.option(
            "--report-channel",
            default=None,
            envvar="GPUFLEET_REPORT_CHANNEL",
            help="Slack channel ID for the digest [default: --slack-channel].",
        ),
        click.option(
            "--public-url",
            default=None,
            envvar="GPUFLEET_PUBLIC_URL",
            help="This collector's URL as people reach it; the digest links to the full report there, "
            "alerts to its /runbooks, and Slack's silence commands name it as --collector "
            "[default: the --listen address].",
        ),
        click.option(
            "--runbook-base-url",
            default=None,
            envvar="GPUFLEET_RUNBOOK_BASE_URL",
            callback=runbook_base_url,
            help=f"Where rules' runbook links point (BASE/NAME), e.g. your wiki [default: {runbook_default}].",
        ),
        click.option(
            "--grafana-url",
            default=None,
            envvar="GPUFLEET_GRAFANA_URL",
            help="Grafana URL: push dashboards and data sources on start, post alerts as annotations.",
        ),
        click.option(
            "--grafana-token",
            default=None,
            envvar="GPUFLEET_GRAFANA_TOKEN",
            help="Grafana service-account token (Editor role).",
        ),
        click.option(
            "--grafana-dashboard-url",
            default=None,
            envvar="GPUFLEET_GRAFANA_DASHBOARD_URL",
            help="Grafana dashboard URL Slack messages link to, with the alert's time window and GPU.",
        ),
        click.option(
            "--forward",
            "forward",
            multiple=True,
            envvar="GPUFLEET_FORWARD",
            help="Remote-write URL to forward every stored batch to (repeatable), e.g. "
            "http://prometheus:9090/api/v1/write.",
        ),
        click.option(
            "--forward-when-full",
            type=click.Choice(["block", "drop"]),
            default="block",
            envvar="GPUFLEET_FORWARD_WHEN_FULL",
            show_default=True,
            help="A --forward target's queue is full: block = refuse writes (503 + Retry-After; agents keep "
            "their batches), drop = store them and drop the batches for that target (counted).",
        ),
        click.option(
            "--forward-max-queue-samples",
            type=click.IntRange(1),
            default=5_000_000,
            envvar="GPUFLEET_FORWARD_MAX_QUEUE_SAMPLES",
            show_default=True,
            help="Samples waiting for one --forward target, at most.",
        ),
        click.option(
            "--forward-max-queue-bytes",
            type=click.IntRange(1024),
            default=256 << 20,
            envvar="GPUFLEET_FORWARD_MAX_QUEUE_BYTES",
            show_default=True,
            help="Compressed request bytes waiting for one --forward target (memory), at most.",
        ),
        click.option(
            "--forward-shards",
            type=click.IntRange(1, 64),
            default=4,
            envvar="GPUFLEET_FORWARD_SHARDS",
            show_default=True,
            help="Concurrent connections sending to each --forward target (each series keeps its order).",
        ),
        click.option(
            "--retention-raw",
            type=_RETENTION,
            default=15.0,
            envvar="GPUFLEET_RETENTION_RAW",
            show_default=True,
            help="How long to keep raw samples: a duration (36h, 2w) or days.",
        ),
        click.option(
            "--retention-1m",
            type=_RETENTION,
            default=90.0,
            envvar="GPUFLEET_RETENTION_1M",
            show_default=True,
            help="How long to keep 1-minute rollups: a duration (13w, 1y) or days.",
        ),
        click.option(
            "--retention-1h",
            type=_RETENTION,
            default=730.0,
            envvar="GPUFLEET_RETENTION_1H",
            show_default=True,
            help="How long to keep 1-hour rollups: a duration (2y) or days.",
        ),
        click.option(
            "--raw-layout",
            type=click.Choice(["chunks", "rows"]),
            default="chunks",
            envvar="GPUFLEET_RAW_LAYOUT",
            show_default=True,
            help="PostgreSQL raw samples: compressed chunks, or one row per sample (for comparisons).",
        ),
    ]
    return apply(options)


def _security_options() -> Decorator:
    """Who may write and how much: the collector's own (`up` listens on loopback with writes open)."""
    options: list[Decorator] = [
        click.option(
            "--tokens",
            default=None,
            envvar="GPUFLEET_TOKENS",
            help="Comma-separated bearer tokens allowed to write; none: writes are open.",
        ),
        click.option(
            "--token-file",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            envvar="GPUFLEET_TOKEN_FILE",
            help="File of write tokens, one a line (SECRET or sha256:HEX, optionally @CLUSTER).",
        ),
        click.option(
            "--read-tokens",
            default=None,
            envvar="GPUFLEET_READ_TOKENS",
            help="Comma-separated bearer tokens that may only read (queries, GPUs, fleet, report, alerts, "
            "silences), written as --tokens are. With any token configured, reads need a read or write token.",
        ),
        click.option(
            "--max-silence-changes-per-minute",
            type=click.IntRange(1),
            default=30,
            envvar="GPUFLEET_MAX_SILENCE_CHANGES_PER_MINUTE",
            show_default=True,
            help="Silences one token may add or expire per minute; past it: 429 + Retry-After.",
        ),
        click.option(
            "--allow-open-writes",
            is_flag=True,
            envvar="GPUFLEET_ALLOW_OPEN_WRITES",
            help="Accept writes without a token on a non-loopback address (not recommended).",
        ),
        click.option(
            "--tls-cert",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            envvar="GPUFLEET_TLS_CERT",
            help="PEM certificate (chain): serve HTTPS.",
        ),
        click.option(
            "--tls-key",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            envvar="GPUFLEET_TLS_KEY",
            help="PEM key of --tls-cert.",
        ),
        click.option(
            "--tls-client-ca",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            envvar="GPUFLEET_TLS_CLIENT_CA",
            help="Require client certificates signed by this CA (mTLS).",
        ),
        click.option(
            "--max-body-bytes",
            type=click.IntRange(1024),
            default=16 << 20,
            envvar="GPUFLEET_MAX_BODY_BYTES",
            show_default=True,
            help="Largest compressed remote-write body.",
        ),
        click.option(
            "--max-uncompressed-bytes",
            type=click.IntRange(1024),
            default=64 << 20,
            envvar="GPUFLEET_MAX_UNCOMPRESSED_BYTES",
            show_default=True,
            help="Largest body once inflated (checked before inflating).",
        ),
        click.option(
            "--max-series",
            type=click.IntRange(1),
            default=100_000,
            envvar="GPUFLEET_MAX_SERIES",
            show_default=True,
            help="Series per request.",
        ),
        click.option(
            "--max-samples",
            type=click.IntRange(1),
            default=2_000_000,
            envvar="GPUFLEET_MAX_SAMPLES",
            show_default=True,
            help="Samples per request.",
        ),
        click.option(
            "--max-labels",
            type=click.IntRange(1),
            default=40,
            envvar="GPUFLEET_MAX_LABELS",
            show_default=True,
            help="Labels per series.",
        ),
        click.option(
            "--max-label-length",
            type=click.IntRange(1),
            default=2048,
            envvar="GPUFLEET_MAX_LABEL_LENGTH",
            show_default=True,
            help="Characters per label value.",
        ),
        click.option(
            "--max-inflight-writes",
            type=click.IntRange(1),
            default=64,
            envvar="GPUFLEET_MAX_INFLIGHT_WRITES",
            show_default=True,
            help="Writes decoded or stored at once; past it: 503 + Retry-After.",
        ),
        click.option(
            "--write-rate-limit",
            type=click.FloatRange(0),
            default=0.0,
            envvar="GPUFLEET_WRITE_RATE_LIMIT",
            show_default=True,
            help="Samples a second one write token may send on average; past it: 429 + Retry-After. 0: no "
            "limit. Size it at twice what the token's agents send (a GPU at 1 Hz sends about 74 a second).",
        ),
        click.option(
            "--write-burst",
            type=click.IntRange(0),
            default=0,
            envvar="GPUFLEET_WRITE_BURST",
            show_default=True,
            help="Samples one write token may send at once above its rate (an agent's spool after an outage). "
            "0: ten seconds of --write-rate-limit.",
        ),
        # What one /api/v1/query_range may cost; the defaults are QueryLimits' (docs/security.md says why).
        click.option(
            "--query-max-series",
            type=click.IntRange(1),
            default=20_000,
            envvar="GPUFLEET_QUERY_MAX_SERIES",
            show_default=True,
            help="Series one range query may match, counted before anything is read; past it: 422.",
        ),
        click.option(
            "--query-max-samples",
            type=click.IntRange(1),
            default=20_000_000,
            envvar="GPUFLEET_QUERY_MAX_SAMPLES",
            show_default=True,
            help="Points one range query may answer (series x steps) and samples it may read; past it: 422.",
        ),
        click.option(
            "--query-timeout",
            type=Duration(0.1),
            default="30s",
            envvar="GPUFLEET_QUERY_TIMEOUT",
            show_default=True,
            help="Time budget of one range query, enforced in the database too; past it: 503.",
        ),
        click.option(
            "--query-max-concurrent",
            type=click.IntRange(1),
            default=4,
            envvar="GPUFLEET_QUERY_MAX_CONCURRENT",
            show_default=True,
            help="Range queries run at once; one that finds no slot within 2 s: 503 + Retry-After.",
        ),
        # The defaults are SeriesLimits' and FLEET_MAX_GPUS (the collector is imported only once it runs).
        click.option(
            "--max-active-series",
            type=click.IntRange(1),
            default=1_000_000,
            envvar="GPUFLEET_MAX_ACTIVE_SERIES",
            show_default=True,
            help="Active series the store takes in all; a write that would create more: 429, nothing stored.",
        ),
        click.option(
            "--max-active-series-per-cluster",
            type=click.IntRange(1),
            default=500_000,
            envvar="GPUFLEET_MAX_ACTIVE_SERIES_PER_CLUSTER",
            show_default=True,
            help="Active series of one cluster label (all a cluster-scoped token may write); past it: 429.",
        ),
        click.option(
            "--series-idle-after",
            type=Duration(60),
            default="1h",
            envvar="GPUFLEET_SERIES_IDLE_AFTER",
            show_default=True,
            help="A series without a sample for this long stops counting as active.",
        ),
        click.option(
            "--fleet-max-gpus",
            type=click.IntRange(1),
            default=20_000,
            envvar="GPUFLEET_FLEET_MAX_GPUS",
            show_default=True,
            help="GPUs /api/v1/fleet lists (its totals count all), and the largest page of /api/v1/gpus.",
        ),
        click.option(
            "--max-future",
            type=Duration(),
            default=3600.0,
            envvar="GPUFLEET_MAX_FUTURE",
            show_default="1h",
            help="Samples at most this far ahead of the collector's clock; later ones: 400.",
        ),
        click.option(
            "--max-past",
            type=Duration(),
            default=None,
            envvar="GPUFLEET_MAX_PAST",
            show_default="--retention-raw",
            help="Samples at most this old; older ones: 400 (the store would drop them at once).",
        ),
        click.option(
            "--name", default="", envvar="GPUFLEET_NAME", help="Replica name in logs [default: --listen]."
        ),
    ]
    return apply(options)


def collector_settings(
    params: Mapping[str, Any], *, tokens: list[Token] | None = None, **fixed: Any
) -> CollectorSettings:
    """CollectorSettings from the command line: every option named as a field sets that field; retention
    (three flags, one field) and the request limits (the --max-* flags) are put together here. ``tokens``:
    the write tokens as parsed from --tokens and --token-file; ``fixed`` sets fields the command decides
    itself (`up`: console output)."""
    from gpufleet.collector.app import Limits
    from gpufleet.collector.service import CollectorSettings
    from gpufleet.collector.store.ranges import QueryLimits
    from gpufleet.collector.store.store import Retention

    values = {f.name: params[f.name] for f in dataclasses.fields(CollectorSettings) if f.name in params}
    values["tokens"] = list(tokens or [])
    values["rules"] = list(params.get("rules") or ())
    values["forward"] = list(params.get("forward") or ())
    if "retention_raw" in params:
        values["retention"] = Retention(
            int(params["retention_raw"] * _DAY_MS),
            int(params["retention_1m"] * _DAY_MS),
            int(params["retention_1h"] * _DAY_MS),
        )
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    if limit_names & params.keys():
        values["limits"] = Limits(**{k: params[k] for k in limit_names if k in params})
    if "query_max_series" in params:
        values["query_limits"] = QueryLimits(
            params["query_max_series"],
            params["query_max_samples"],
            params["query_timeout"],
            params["query_max_concurrent"],
        )
    values.update(fixed)
    return CollectorSettings(**values)


def _write_tokens(tokens: str | None, token_file: str | None) -> list[Token]:
    from gpufleet.collector.auth import TokenSet, parse_token

    try:
        token_list = [parse_token(t) for t in split_tokens(tokens)]
        if token_file:
            token_list += TokenSet.from_file(token_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tokens / --token-file") from None
    except OSError as exc:
        raise click.BadParameter(
            f"cannot read {token_file}: {exc.strerror or exc}",
            param_hint="--token-file (GPUFLEET_TOKEN_FILE)",
        ) from None
    return token_list


def _read_tokens(tokens: str | None) -> list[Token]:
    from gpufleet.collector.auth import parse_token

    try:
        return [parse_token(t) for t in split_tokens(tokens)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--read-tokens (GPUFLEET_READ_TOKENS)") from None


@click.command(cls=Command)
@listen_option(default="0.0.0.0:9446", help="HOST:PORT of the API, the fleet page and /metrics.")
@click.option(
    "--reuse-port",
    is_flag=True,
    envvar="GPUFLEET_REUSE_PORT",
    help="Listen with SO_REUSEPORT: several collectors on this host share --listen and the kernel spreads "
    "connections over them (PostgreSQL store; every one of them needs the flag).",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=1,
    envvar="GPUFLEET_WORKERS",
    show_default=True,
    help="Collector processes on --listen, forked from this one and sharing it as --reuse-port does; one of "
    "them evaluates rules (PostgreSQL store). About one per core the collector may use.",
)
@click.option("--console/--no-console", default=False, envvar="GPUFLEET_CONSOLE", help="Print notifications.")
@collector_options()
@_security_options()
@logging_options
def collector(**params: Any) -> None:
    """Run the central collector: receive samples, store them, evaluate rules, notify."""
    from gpufleet.collector.rules.model import RuleError
    from gpufleet.collector.service import Collector
    from gpufleet.collector.store import StoreUnavailable
    from gpufleet.collector.store.migrate import SchemaTooNew

    listen: str = params["listen"]
    settings = collector_settings(
        params,
        tokens=_write_tokens(params["tokens"], params["token_file"]),
        read_tokens=_read_tokens(params["read_tokens"]),
    )
    if not settings.tokens:
        if not is_loopback(listen) and not params["allow_open_writes"]:
            raise click.UsageError(
                f"no write tokens configured and --listen {listen} is reachable from other hosts: give "
                "--tokens / --token-file (GPUFLEET_TOKENS, GPUFLEET_TOKEN_FILE), listen on 127.0.0.1, or pass "
                "--allow-open-writes to accept writes from anyone"
            )
        logging.getLogger("gpufleet").warning(
            "no write tokens configured: anyone who reaches %s can write", listen
        )
    workers: int = params["workers"]
    if workers > 1:
        settings = dataclasses.replace(settings, reuse_port=True)
    if settings.reuse_port:
        if not settings.db.startswith("postgresql"):
            flag = "--workers" if workers > 1 else "--reuse-port"
            raise click.UsageError(
                f"{flag} runs several collectors on one store, and a SQLite file takes one collector: "
                f"give --db postgresql+psycopg://… (GPUFLEET_DB), or leave {flag} out"
            )
        from gpufleet.collector.service import listening_socket

        try:  # fail before opening the store, as check_free does
            listening_socket(listen, reuse_port=True).close()
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        check_free(listen, "--listen")

    def serve(settings: CollectorSettings) -> None:
        try:
            c = Collector(settings)
        except (RuleError, StoreUnavailable, SchemaTooNew, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        who = f" {c.replica}" if workers > 1 else ""
        announce(
            f"gpufleet collector{who} on {c.scheme}://{listen} (store: {c.store.engine.url.render_as_string()}, "
            f"{len(c.rules)} rules, {len(settings.tokens)} write tokens, {len(settings.read_tokens)} read tokens"
            f"{', client certificates required' if settings.tls_client_ca else ''})"
        )
        c.serve()

    if workers == 1:
        serve(settings)
        return
    from gpufleet.collector.workers import serve_workers

    base = settings.name or listen

    def worker(index: int) -> int:
        try:
            serve(dataclasses.replace(settings, name=f"{base}#{index}"))
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        return 0

    raise SystemExit(serve_workers(workers, worker))


@click.command("hash-token", cls=Command)
@click.argument("token", required=False)
def hash_token(token: str | None) -> None:
    """Print the sha256:HEX form of a write token (read from stdin when not given), for --tokens."""
    from gpufleet.collector.auth import hash_token as sha256_hex

    secret = token if token is not None else sys.stdin.read().strip()
    if not secret:
        raise click.UsageError("give the token as an argument or on stdin")
    click.echo(f"sha256:{sha256_hex(secret)}")
