"""The `gpufleet` command line. Subcommands import the agent or the collector only when they run,
so an agent-only install (pip install 'gpufleet[agent]') works without the collector's dependencies."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from gpufleet import __version__


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:  # their routine INFO lines (each job run, each migration step) drown what matters
        for noisy in ("apscheduler", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def _tokens(value: str | None) -> list[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpufleet")
def main() -> None:
    """gpufleet: monitoring for fleets of NVIDIA GPU nodes."""


# ---- agent ------------------------------------------------------------------------------------------
def _agent_options(f):
    options = [
        click.option("--listen", default="0.0.0.0:9445", envvar="GPUFLEET_LISTEN", show_default=True,
                     help="HOST:PORT for /metrics and /healthz."),
        click.option("--simulate", type=click.IntRange(0, 1024), default=0, envvar="GPUFLEET_SIMULATE",
                     help="Simulate N GPUs instead of reading NVML."),
        click.option("--node", default=None, envvar=["GPUFLEET_NODE", "NODE_NAME"],
                     help="Node name on every series [default: the host name]."),
        click.option("--cluster", default=None, envvar="GPUFLEET_CLUSTER", help="Cluster label on every series."),
        click.option("--interval", type=click.FloatRange(0.05), default=1.0, envvar="GPUFLEET_INTERVAL",
                     show_default=True, help="Seconds between samples."),
        click.option("--push-interval", type=click.FloatRange(0.1), default=5.0, envvar="GPUFLEET_PUSH_INTERVAL",
                     show_default=True, help="Seconds between pushes (urgent events go at once)."),
        click.option("--token", default=None, envvar="GPUFLEET_TOKEN", help="Bearer token for the collector."),
        click.option("--metric-names", type=click.Choice(["gpufleet", "dcgm"]), default="gpufleet",
                     envvar="GPUFLEET_METRIC_NAMES", show_default=True,
                     help="Name metrics as gpufleet does or as dcgm-exporter does."),
        click.option("--sources", default="", envvar="GPUFLEET_SOURCES",
                     help="Comma-separated sources to run [default: all on by default]."),
        click.option("-v", "--verbose", is_flag=True),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _agent_settings(**kw):
    from agent.main import AgentSettings

    s = AgentSettings(listen=kw["listen"], collector=kw.get("collector"), token=kw["token"], simulate=kw["simulate"],
                      cluster=kw["cluster"], interval=kw["interval"], push_interval=kw["push_interval"],
                      metric_names=kw["metric_names"],
                      sources=tuple(x.strip() for x in kw["sources"].split(",") if x.strip()))
    if kw.get("node"):
        s.node = kw["node"]
    return s


@main.command()
@click.option("--collector", default=None, envvar="GPUFLEET_COLLECTOR",
              help="Collector URL, e.g. http://collector:9446 (omit to only serve /metrics).")
@_agent_options
def agent(verbose: bool, **kw) -> None:
    """Run the node agent: sample GPUs, serve /metrics, push to the collector."""
    _logging(verbose)
    from agent.main import start_agent
    from agent.nvml import NvmlUnavailable

    settings = _agent_settings(**kw)
    try:
        running = start_agent(settings)
    except NvmlUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.listen}: {exc}") from None
    what = f"{settings.simulate} simulated GPUs" if settings.simulate else \
        f"{len(running.agent.sources[0].gpus) if running.agent.sources else 0} GPUs through NVML"
    click.echo(f"gpufleet agent on {settings.node}: {what}; metrics at http://{settings.listen}/metrics"
               + (f"; pushing to {running.pusher.url}" if running.pusher else ""))
    _wait_for_signal()
    running.stop()


# ---- collector --------------------------------------------------------------------------------------
def _collector_options(f):
    options = [
        click.option("--db", default="sqlite:///gpufleet.db", envvar="GPUFLEET_DB", show_default=True,
                     help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB."),
        click.option("--rules", "rules", multiple=True, type=click.Path(exists=True, path_type=Path),
                     envvar="GPUFLEET_RULES", help="Rule files or folders [default: the built-in rule pack]."),
        click.option("--eval-interval", type=click.FloatRange(0.1), default=5.0, envvar="GPUFLEET_EVAL_INTERVAL",
                     show_default=True, help="Seconds between rule evaluations (events are evaluated at once)."),
        click.option("--slack-token", default=None, envvar="GPUFLEET_SLACK_TOKEN", help="Slack bot token (xoxb-…)."),
        click.option("--slack-channel", default=None, envvar="GPUFLEET_SLACK_CHANNEL", help="Slack channel ID."),
        click.option("--slack-base-url", default="https://slack.com/api/", envvar="GPUFLEET_SLACK_BASE_URL",
                     show_default=True, help="Slack Web API base URL."),
        click.option("--forward", "forward", multiple=True, envvar="GPUFLEET_FORWARD",
                     help="Remote-write URL to forward every stored batch to (repeatable), e.g. "
                          "http://prometheus:9090/api/v1/write."),
        click.option("--retention-raw", type=click.FloatRange(0.25), default=15.0, envvar="GPUFLEET_RETENTION_RAW",
                     show_default=True, help="Days of raw samples to keep."),
        click.option("--retention-1m", type=click.FloatRange(0.25), default=90.0, envvar="GPUFLEET_RETENTION_1M",
                     show_default=True, help="Days of 1-minute rollups to keep."),
        click.option("--retention-1h", type=click.FloatRange(0.25), default=730.0, envvar="GPUFLEET_RETENTION_1H",
                     show_default=True, help="Days of 1-hour rollups to keep."),
        click.option("--raw-layout", type=click.Choice(["chunks", "rows"]), default="chunks",
                     envvar="GPUFLEET_RAW_LAYOUT", show_default=True,
                     help="PostgreSQL raw samples: compressed chunks, or one row per sample (for comparisons)."),
        click.option("-v", "--verbose", is_flag=True),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _collector_settings(listen: str, db: str, rules, eval_interval: float, slack_token, slack_channel,
                        slack_base_url, tokens=(), console=False, forward=(), retention_raw=15.0,
                        retention_1m=90.0, retention_1h=730.0, raw_layout="chunks"):
    from collector.service import CollectorSettings
    from collector.store.store import Retention

    day = 86_400_000
    return CollectorSettings(listen=listen, db=db, rules=list(rules), eval_interval=eval_interval,
                             tokens=list(tokens), console=console, slack_token=slack_token,
                             slack_channel=slack_channel, slack_base_url=slack_base_url, forward=list(forward),
                             retention=Retention(int(retention_raw * day), int(retention_1m * day),
                                                 int(retention_1h * day)),
                             raw_layout=raw_layout)


@main.command()
@click.option("--listen", default="0.0.0.0:9446", envvar="GPUFLEET_LISTEN", show_default=True)
@click.option("--tokens", default=None, envvar="GPUFLEET_TOKENS",
              help="Comma-separated bearer tokens allowed to write; none: writes are open.")
@click.option("--console/--no-console", default=False, envvar="GPUFLEET_CONSOLE", help="Print notifications.")
@_collector_options
def collector(verbose: bool, listen: str, tokens: str | None, console: bool, **kw) -> None:
    """Run the central collector: receive samples, store them, evaluate rules, notify."""
    _logging(verbose)
    from collector.rules.model import RuleError
    from collector.service import Collector
    from collector.store import StoreUnavailable
    from collector.store.migrate import SchemaTooNew

    settings = _collector_settings(listen, tokens=_tokens(tokens), console=console, **kw)
    if not settings.tokens:
        logging.getLogger("gpufleet").warning("no write tokens configured: anyone who reaches %s can write", listen)
    try:
        c = Collector(settings)
    except (RuleError, StoreUnavailable, SchemaTooNew, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"gpufleet collector on http://{listen} (store: {c.store.engine.url.render_as_string()}, "
               f"{len(c.rules)} rules)")
    c.serve()


# ---- up ---------------------------------------------------------------------------------------------
@main.command()
@click.option("--simulate", type=click.IntRange(0, 1024), default=None, envvar="GPUFLEET_SIMULATE",
              help="Simulate N GPUs [default: real GPUs if NVML works, else 4 simulated].")
@click.option("--agent-listen", default="127.0.0.1:9445", show_default=True)
@click.option("--listen", default="127.0.0.1:9446", show_default=True, help="Collector HOST:PORT.")
@click.option("--interval", type=click.FloatRange(0.05), default=1.0, show_default=True)
@click.option("--push-interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
@click.option("--db", default="sqlite:///gpufleet.db", envvar="GPUFLEET_DB", show_default=True)
@click.option("--rules", "rules", multiple=True, type=click.Path(exists=True, path_type=Path))
@click.option("--eval-interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
@click.option("--slack-token", default=None, envvar="GPUFLEET_SLACK_TOKEN")
@click.option("--slack-channel", default=None, envvar="GPUFLEET_SLACK_CHANNEL")
@click.option("--slack-base-url", default="https://slack.com/api/", envvar="GPUFLEET_SLACK_BASE_URL")
@click.option("-v", "--verbose", is_flag=True)
def up(simulate, agent_listen, listen, interval, push_interval, db, rules, eval_interval, slack_token,
       slack_channel, slack_base_url, verbose) -> None:
    """Everything on one machine: collector + local agent + default rules. The first thing to run."""
    _logging(verbose)
    from agent.main import AgentSettings, start_agent
    from agent.nvml import Nvml, NvmlUnavailable
    from collector.service import Collector

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
                                   console=True)
    try:
        c = Collector(settings).start()
    except Exception as exc:
        raise click.ClickException(f"collector did not start: {exc}") from None
    try:
        running = start_agent(AgentSettings(listen=agent_listen, collector=f"http://{listen}", simulate=simulate,
                                            interval=interval, push_interval=push_interval))
    except (NvmlUnavailable, OSError) as exc:
        c.close()
        raise click.ClickException(f"agent did not start: {exc}") from None
    click.echo(f"gpufleet up: {why}")
    click.echo(f"  agent metrics   http://{agent_listen}/metrics")
    click.echo(f"  GPUs            http://{listen}/api/v1/gpus")
    click.echo(f"  alerts          http://{listen}/api/v1/alerts")
    click.echo(f"  store           {db}")
    if simulate:
        click.echo(f"  inject a fault  gpufleet simulate inject --agent http://{agent_listen} --gpu 0 xid --xid 79")
    click.echo("  writes are open on loopback (no tokens); Ctrl-C stops")
    _wait_for_signal()
    click.echo("stopping…")
    running.stop()
    c.close()


# ---- simulate ---------------------------------------------------------------------------------------
@main.group()
def simulate() -> None:
    """Drive the GPU simulator of a running agent (started with --simulate)."""


@simulate.command("inject")
@click.argument("kind", type=click.Choice(["xid", "lost", "thermal", "sw_thermal", "hw_slowdown", "power_brake",
                                           "idle_memory", "ecc", "recover"]))
@click.option("--agent", "agent_url", default="http://127.0.0.1:9445", show_default=True)
@click.option("--gpu", type=int, default=0, show_default=True)
@click.option("--xid", type=int, default=None, help="XID code, for kind xid.")
@click.option("--duration", type=float, default=120.0, show_default=True, help="Seconds, for lasting faults.")
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
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
def alerts_check(paths) -> None:
    """Validate rule files (default: the built-in rule pack); every problem with file, line and rule."""
    from collector.rules.model import RuleError, default_rules_path, load_rules

    try:
        rules = load_rules(list(paths) or [default_rules_path()])
    except RuleError as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(1)
    click.echo(f"{len(rules)} rules OK")


# ---- db ---------------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Manage the collector's database schema."""


@db.command("upgrade")
@click.option("--db", "url", default="sqlite:///gpufleet.db", envvar="GPUFLEET_DB", show_default=True)
def db_upgrade(url: str) -> None:
    """Migrate the schema to this version of gpufleet."""
    from collector.store import Store, StoreUnavailable
    from collector.store.migrate import SchemaTooNew, current_revision

    try:
        store = Store.open(url, migrate_schema=True)
    except (StoreUnavailable, SchemaTooNew) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"schema at revision {current_revision(store.engine)}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
