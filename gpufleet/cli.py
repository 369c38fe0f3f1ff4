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
        click.option("--grafana-dashboard-url", default=None, envvar="GPUFLEET_GRAFANA_DASHBOARD_URL",
                     help="Grafana dashboard URL Slack messages link to, with the alert's time window and GPU."),
        click.option("-v", "--verbose", is_flag=True),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _collector_settings(listen: str, db: str, rules, eval_interval: float, slack_token, slack_channel,
                        slack_base_url, tokens=(), console=False, grafana_dashboard_url=None):
    from collector.service import CollectorSettings

    return CollectorSettings(listen=listen, db=db, rules=list(rules), eval_interval=eval_interval,
                             tokens=list(tokens), console=console, slack_token=slack_token,
                             slack_channel=slack_channel, slack_base_url=slack_base_url,
                             grafana_dashboard_url=grafana_dashboard_url)


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
@click.option("--grafana-dashboard-url", default=None, envvar="GPUFLEET_GRAFANA_DASHBOARD_URL")
@click.option("-v", "--verbose", is_flag=True)
def up(simulate, agent_listen, listen, interval, push_interval, db, rules, eval_interval, slack_token,
       slack_channel, slack_base_url, grafana_dashboard_url, verbose) -> None:
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
                                   console=True, grafana_dashboard_url=grafana_dashboard_url)
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


def _load_pack(paths):
    from collector.rules.model import RuleError, default_rules_path, load_pack

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
    from collector.rules.model import RuleError, default_rules_path
    from collector.rules.testing import run_tests

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
              help="Rule files or folders [default: the built-in rule pack].")
@click.option("--step", type=click.FloatRange(0.001), default=None,
              help="Seconds between evaluations [default: the trace's sampling interval].")
def alerts_backtest(trace, rules, step) -> None:
    """Replay TRACE (OpenMetrics text with timestamps) through the rule engine; print each notification
    it would send as a JSON line: alert, state, at (Unix seconds), labels."""
    from collector.rules.backtest import TraceError, backtest_file

    pack = _load_pack(rules)
    try:
        n = backtest_file(trace, pack, sys.stdout, step_s=step)
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
def alerts_export(paths, fmt, output, name, namespace) -> None:
    """Write the rules PromQL can express (default: the built-in pack) for Prometheus / Alertmanager."""
    from collector.rules.export import export

    text, skipped = export(_load_pack(paths), fmt, name=name, namespace=namespace)
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


def _collector_api_options(f):
    f = click.option("--token", default=None, envvar="GPUFLEET_TOKEN", help="Bearer token for the collector.")(f)
    return click.option("--collector", "collector_url", default="http://127.0.0.1:9446", envvar="GPUFLEET_COLLECTOR",
                        show_default=True, help="Collector URL.")(f)


@silence.command("add")
@click.argument("matchers", nargs=-1, required=True)
@click.option("--duration", default="2h", show_default=True, help="How long, e.g. 30m, 2h, 1d.")
@click.option("--author", default=lambda: os.environ.get("USER", ""), help="Who silences [default: $USER].")
@click.option("--comment", required=True, help="Why (a ticket, the maintenance window).")
@_collector_api_options
def silence_add(matchers, duration, author, comment, collector_url, token) -> None:
    """Silence alerts matching every MATCHER (name=value, name!=value, name=~regex, name!~regex)."""
    from collector.rules.dispatch import Matcher
    from collector.rules.model import parse_duration

    try:
        parsed = [Matcher.parse(m) for m in matchers]
        parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
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

    from collector.rules.dispatch import Matcher

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
