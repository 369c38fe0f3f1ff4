"""Wires the collector: store, rule engine on an APScheduler job, notifiers, HTTP API under uvicorn."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from gpufleet.collector.app import Limits, Metrics, create_app
from gpufleet.collector.auth import Token
from gpufleet.collector.fleet import FLEET_MAX_GPUS
from gpufleet.collector.forward import (
    DEFAULT_MAX_QUEUE_BYTES,
    DEFAULT_MAX_QUEUE_SAMPLES,
    DEFAULT_SHARDS,
    Forwarder,
    ForwardMetrics,
    WhenFull,
)
from gpufleet.collector.leader import leadership_for
from gpufleet.collector.notify.console import ConsoleNotifier
from gpufleet.collector.notify.queue import SendQueue
from gpufleet.collector.rules.contract import Notifier
from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.model import default_rules_path, load_pack, with_runbook_base
from gpufleet.collector.rules.state import SqlAlertState
from gpufleet.collector.store import Store
from gpufleet.collector.store.maintenance import Pacing
from gpufleet.collector.store.ranges import QueryLimits
from gpufleet.collector.store.series_limit import SeriesLimits
from gpufleet.collector.store.store import Retention
from gpufleet.core.addresses import split_listen

# How long an idle client connection stays open. Past the agent's push interval (5 s), so an agent's next push
# never races the server closing its connection (uvicorn's own default is that same 5 s); past the 60 s idle
# timeout of common load balancers (AWS ALB, nginx), so they close first. Idle connections cost a socket each.
KEEP_ALIVE_S = 75

log = logging.getLogger(__name__)
FORWARD_DRAIN_S = 15.0  # at stop, after the HTTP server: inside Kubernetes' default 30 s grace period


@dataclass
class CollectorSettings:
    listen: str = "0.0.0.0:9446"
    db: str = "sqlite:///gpufleet.db"
    rules: list[Path] = field(default_factory=list)  # empty: the default rule pack
    eval_interval: float = 5.0
    tokens: list[str | Token] = field(default_factory=list)
    # Tokens that may only read; once any token is configured, reads need a read or a write token.
    read_tokens: list[str | Token] = field(default_factory=list)
    max_silence_changes_per_minute: int = 30  # per token: silences added or expired; past it, 429
    console: bool = False
    slack_token: str | None = None
    slack_channel: str | None = None
    slack_base_url: str = "https://slack.com/api/"
    # Weekly efficiency digest to Slack: a crontab line (UTC), e.g. "0 9 * * mon"; None: off.
    report_cron: str | None = None
    report_channel: str | None = None  # default: slack_channel
    report_since: str = "7d"
    # Where people reach this collector: the digest's report link, runbooks, Slack's silence --collector.
    public_url: str | None = None
    # Where rules' relative runbook_url names point (BASE/NAME); None: this collector's own /runbooks.
    runbook_base_url: str | None = None
    grafana_url: str | None = None
    grafana_token: str | None = None
    limits: Limits = field(default_factory=Limits)
    tls_cert: str | None = None  # PEM certificate (chain) and key: serve HTTPS
    tls_key: str | None = None
    tls_client_ca: str | None = None  # CA of client certificates: require mutual TLS
    name: str = ""  # replica name in logs (default: host:port)
    grafana_dashboard_url: str | None = None  # linked from Slack messages with the alert's time window
    forward: list[str] = field(default_factory=list)  # remote-write URLs to forward every stored batch to
    # A forward target's queue is full: "block" refuses writes (503 + Retry-After) before they are stored,
    # "drop" stores them and drops the batch for that target (counted); see collector/forward.py.
    forward_when_full: WhenFull = "block"
    forward_max_queue_samples: int = DEFAULT_MAX_QUEUE_SAMPLES  # per target
    forward_max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES  # per target, compressed request bytes
    forward_shards: int = DEFAULT_SHARDS  # concurrent connections per target
    retention: Retention = field(default_factory=Retention)
    raw_layout: str = "chunks"  # "rows": the naive one-row-per-sample layout, for comparisons
    maintenance_interval: float = 60.0
    # Active series the store takes, in all and per cluster label; a series stops counting after
    # series_idle_after seconds without a sample (see collector/store/series_limit.py).
    max_active_series: int = SeriesLimits.max_active
    max_active_series_per_cluster: int = SeriesLimits.max_per_cluster
    series_idle_after: float = SeriesLimits.idle_after_ms / 1000
    # GPUs /api/v1/fleet lists (totals count every GPU), and one page of /api/v1/gpus by default.
    fleet_max_gpus: int = FLEET_MAX_GPUS
    # SO_REUSEPORT: several collector processes on one host listen on the same --listen address and the
    # kernel spreads new connections over them (see listening_socket).
    reuse_port: bool = False
    # What one /api/v1/query_range may cost, and how many run at once (--query-…).
    query_limits: QueryLimits = field(default_factory=QueryLimits)


def listening_socket(listen: str, *, reuse_port: bool) -> socket.socket:
    """The collector's listening socket, bound but not yet listening. With ``reuse_port`` (SO_REUSEPORT) every
    collector process bound so to the same address gets its own accept queue and the kernel spreads new
    connections over them; a connection stays with the process that accepted it. ValueError naming the fix
    when the address is taken."""
    host, port = split_listen(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if reuse_port:
            raise ValueError(
                f"cannot listen on {listen} with --reuse-port ({why}): a process that did not ask for "
                "SO_REUSEPORT (or one of another user) holds it; start every collector sharing this address "
                "with --reuse-port (GPUFLEET_REUSE_PORT), or choose another --listen"
            ) from None
        raise ValueError(
            f"cannot listen on {listen} ({why}): is another gpufleet running there? Stop it, choose "
            "another --listen, or run every collector sharing it with --reuse-port"
        ) from None
    return sock


def _stopped(signum: int, frame: FrameType | None) -> None:
    """SIGTERM once uvicorn has shut down: the collector goes on to close and exit normally."""


def own_url(listen: str, scheme: str, public_url: str | None) -> str:
    """This collector as people reach it: --public-url when given, else the listen address, with the host's
    name in place of a wildcard address (0.0.0.0 is no place to link to)."""
    if public_url:
        return public_url.rstrip("/")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # not getfqdn(): that asks DNS, and a start must not wait on DNS
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def own_runbook_base_url(listen: str, scheme: str, public_url: str | None) -> str:
    """This collector's /runbooks as people reach it (see :func:`own_url`)."""
    return own_url(listen, scheme, public_url) + "/runbooks"


class Collector:
    def __init__(
        self,
        settings: CollectorSettings,
        *,
        notifiers: list[Notifier] | None = None,
        slack_client: Any | None = None,
    ) -> None:
        self.settings = settings
        self._check_tls(settings)
        # A database that hangs must turn into a quick 503 for the agents (which spool and retry), not into
        # requests piling up: bound the wait for a connection and for connecting.
        engine_kw: dict[str, Any] = {}
        if not settings.db.startswith("sqlite"):
            engine_kw = {"pool_timeout": 5, "connect_args": {"connect_timeout": 5}}
        self.store = Store.open(
            settings.db,
            raw_layout=settings.raw_layout,
            retention=settings.retention,
            series_limits=SeriesLimits(
                settings.max_active_series,
                settings.max_active_series_per_cluster,
                int(settings.series_idle_after * 1000),
            ),
            **engine_kw,
        )
        self.store.ingest.count_active_series()  # the series of before a restart count at once
        self.forwarder = None
        if settings.forward:
            self.forwarder = Forwarder(
                settings.forward,
                shards=settings.forward_shards,
                max_queue_samples=settings.forward_max_queue_samples,
                max_queue_bytes=settings.forward_max_queue_bytes,
                when_full=settings.forward_when_full,
            )
        # Replicas sharing one address by --reuse-port are told apart by their process id.
        self.replica = settings.name or (
            f"{settings.listen} pid {os.getpid()}" if settings.reuse_port else settings.listen
        )
        self.leadership = leadership_for(self.store.engine, name=self.replica)
        self.runbook_base_url = settings.runbook_base_url or own_runbook_base_url(
            settings.listen, "https" if settings.tls_cert else "http", settings.public_url
        )
        self.pack = with_runbook_base(
            load_pack(settings.rules or [default_rules_path()]), self.runbook_base_url
        )
        log.info("runbook links of the rules point at %s/NAME", self.runbook_base_url.rstrip("/"))
        self.rules = self.pack.rules
        self.state = SqlAlertState(self.store.engine)
        if notifiers is None:
            notifiers = []
            if settings.console:
                notifiers.append(ConsoleNotifier())
            if settings.slack_token or slack_client is not None:
                from gpufleet.collector.notify.slack import SlackNotifier

                if not settings.slack_channel:
                    raise ValueError("--slack-channel (GPUFLEET_SLACK_CHANNEL) is needed with a Slack token")
                if slack_client is None:
                    from slack_sdk import WebClient

                    slack_client = WebClient(token=settings.slack_token, base_url=settings.slack_base_url)
                notifiers.append(
                    SlackNotifier(
                        slack_client,
                        settings.slack_channel,
                        grafana_url=settings.grafana_dashboard_url,
                        collector_url=own_url(
                            settings.listen, "https" if settings.tls_cert else "http", settings.public_url
                        ),
                        collector_needs_token=bool(settings.tokens),
                    )
                )
        if settings.report_cron and slack_client is None and settings.slack_token:
            from slack_sdk import WebClient

            slack_client = WebClient(token=settings.slack_token, base_url=settings.slack_base_url)
        self.slack_client = slack_client
        self.grafana_pusher = None
        self._grafana_stop = threading.Event()
        self._grafana_thread: threading.Thread | None = None
        if settings.grafana_url:
            from gpufleet.collector.grafana import GrafanaAnnotationNotifier, collector_pusher, connect

            grafana = connect(settings.grafana_url, settings.grafana_token)
            notifiers = [*notifiers, GrafanaAnnotationNotifier(grafana)]
            if settings.db.startswith("postgresql"):
                self.grafana_pusher = collector_pusher(grafana, settings.db)
            else:
                log.warning(
                    "Grafana is configured but the store is %s, which Grafana cannot read: posting alert "
                    "annotations only, no dashboards",
                    settings.db.split(":", 1)[0],
                )
        self.notifiers = notifiers
        self.engine = Engine(self.pack, self.store, self.state, notifiers, queue=SendQueue())
        self.metrics = Metrics()
        self.metrics.registry.register(ForwardMetrics(self.forwarder))
        # ticks: evaluation slots seen (led or not); leader_since_tick: the slot this replica took over in
        self.info: dict[str, Any] = {
            "rules": len(self.rules),
            "leader": False,
            "ticks": 0,
            "leader_since_tick": None,
            "replica": self.replica,
        }
        self.app = create_app(
            self.store,
            tokens=settings.tokens,
            engine=self.engine,
            on_write=self._on_write,
            metrics=self.metrics,
            info=self.info,
            limits=settings.limits,
            silences=self.state,
            forwarder=self.forwarder,
            read_tokens=settings.read_tokens,
            silence_changes_per_minute=settings.max_silence_changes_per_minute,
            fleet_max_gpus=settings.fleet_max_gpus,
            query_limits=settings.query_limits,
        )
        self._tick_lock = threading.Lock()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._job = self.scheduler.add_job(
            self.evaluate,
            "interval",
            seconds=settings.eval_interval,
            id="rules",
            max_instances=1,
            coalesce=True,
        )
        self.digest_job = None
        if settings.report_cron:
            from apscheduler.triggers.cron import CronTrigger

            if self.slack_client is None:
                raise ValueError("--report-cron sends the digest to Slack: set --slack-token too")
            if not (settings.report_channel or settings.slack_channel):
                raise ValueError("--report-cron needs --report-channel or --slack-channel")
            try:
                trigger = CronTrigger.from_crontab(settings.report_cron, timezone="UTC")
            except ValueError as exc:
                raise ValueError(
                    f"--report-cron {settings.report_cron!r} is not a crontab line "
                    f"(minute hour day month weekday, e.g. '0 9 * * mon'): {exc}"
                ) from None
            self.digest_job = self.scheduler.add_job(
                self.send_digest,
                trigger,
                id="digest",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=3600,
            )
        # The store's maintenance in a thread of its own: a long pass never holds up rule evaluation or the
        # digest, and it paces itself (see Pacing) so that ingest keeps its share of the database.
        self.scheduler.add_executor(ThreadPoolExecutor(1), "store")
        self.scheduler.add_job(
            self.maintain,
            "interval",
            seconds=settings.maintenance_interval,
            id="store",
            executor="store",
            max_instances=1,
            coalesce=True,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _check_tls(settings: CollectorSettings) -> None:
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ValueError("--tls-cert and --tls-key go together (GPUFLEET_TLS_CERT, GPUFLEET_TLS_KEY)")
        if settings.tls_client_ca and not settings.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if settings.tls_cert:
            import ssl

            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
                if settings.tls_client_ca:
                    ctx.load_verify_locations(settings.tls_client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"cannot use the TLS files ({settings.tls_cert}, {settings.tls_key}"
                    f"{', ' + settings.tls_client_ca if settings.tls_client_ca else ''}): {exc}; "
                    "give a PEM certificate and its unencrypted PEM key"
                ) from None

    def evaluate(self) -> None:
        with self._tick_lock:
            was = self.leadership.is_leader
            leader = self.leadership.check()
            self.info["ticks"] += 1
            self.info["leader"] = leader
            if leader and not was:
                self.info["leader_since_tick"] = self.info["ticks"]
            self.metrics.leader.set(1 if leader else 0)
            if not leader:
                return
            try:
                if not was:  # continue from the state the previous leader stored
                    self.engine.reload()
                self.engine.tick(int(time.time() * 1000))
            except Exception:
                log.exception("rule evaluation failed; next try at the next interval")

    def send_digest(self, now: float | None = None) -> str | None:
        """Build the efficiency report for the last ``report_since`` and post it to Slack; the message ts.
        Every replica runs the cron job, and only the one leading at that moment posts: the channel gets the
        digest once however many replicas run."""
        from gpufleet.collector.report import build_report, parse_since, slack_blocks

        with self._tick_lock:
            # Confirm, never take, the lead here: taking it is the evaluation tick's (it reloads the state).
            leader = self.leadership.is_leader and self.leadership.check()
        if not leader:
            log.info("weekly digest: another replica leads and posts it")
            return None
        start, end = parse_since(self.settings.report_since, now=now)
        report = build_report(self.store.engine, start, end)
        link = None
        if self.settings.public_url:
            link = (
                f"{self.settings.public_url.rstrip('/')}/api/v1/report?format=html"
                f"&since={int(start)}&until={int(end)}"
            )
        text, blocks = slack_blocks(report, link)
        channel = self.settings.report_channel or self.settings.slack_channel
        if self.slack_client is None:
            raise RuntimeError("the weekly digest needs a Slack client (--slack-token)")
        try:
            resp = self.slack_client.chat_postMessage(channel=channel, text=text, blocks=blocks)
        except Exception as exc:  # SlackApiError and transport errors: the next week tries again
            log.error("weekly digest to %s failed: %s", channel, exc)
            return None
        log.info("weekly digest posted to %s", channel)
        return resp.get("ts")

    def maintain(self) -> None:
        """Partitions, rollups, compaction and retention (see collector/store/maintenance.py), within half
        the maintenance interval; what is left goes on at the next pass."""
        try:
            # Series that went idle stop counting, and those other replicas created start to.
            self.store.ingest.count_active_series()
            self.store.maintenance.maintain(
                int(time.time() * 1000), Pacing(budget_s=self.settings.maintenance_interval / 2)
            )
        except Exception:
            log.exception("store maintenance failed; next try at the next interval")

    def _on_write(self, metric_names: set[str]) -> None:
        # An agent marked this write urgent (an XID, a GPU lost, a throttle switching on):
        # evaluate now instead of at the next interval.
        if self.scheduler.running:
            self._job.modify(next_run_time=dt.datetime.now(dt.timezone.utc))

    def _server_config(self) -> uvicorn.Config:
        host, port = split_listen(self.settings.listen)
        tls: dict[str, Any] = {}
        if self.settings.tls_cert:
            tls = {"ssl_certfile": self.settings.tls_cert, "ssl_keyfile": self.settings.tls_key}
            if self.settings.tls_client_ca:
                import ssl

                tls.update(ssl_ca_certs=self.settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        # log_config=None: uvicorn's lines go through the handler `gpufleet collector` set up (text or JSON)
        return uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,
            **tls,
        )

    def _sockets(self) -> list[socket.socket] | None:
        """With --reuse-port the socket is made here (uvicorn has no such option); else uvicorn binds."""
        if not self.settings.reuse_port:
            return None
        return [listening_socket(self.settings.listen, reuse_port=True)]

    @property
    def scheme(self) -> str:
        return "https" if self.settings.tls_cert else "http"

    def _push_dashboards(self) -> None:
        if self.grafana_pusher is not None:  # in the background: Grafana may start after the collector
            from gpufleet.collector.grafana import push_with_retry

            self._grafana_thread = threading.Thread(
                target=push_with_retry,
                name="grafana-push",
                daemon=True,
                args=(self.grafana_pusher, self._grafana_stop),
            )
            self._grafana_thread.start()

    def serve(self) -> None:
        """Run in the foreground until interrupted (Ctrl-C / SIGTERM)."""
        if self.forwarder is not None:
            self.forwarder.start()
        self.scheduler.start()
        self._push_dashboards()
        self._job.modify(next_run_time=dt.datetime.now(dt.timezone.utc))  # learn leadership at once
        # uvicorn shuts down gracefully on SIGTERM and then raises the signal again to the handler that was
        # there before it; with the default one the process would die right there, before close() gives the
        # lead up, sends what is queued and drains the forwarders. SIGTERM (Kubernetes' stop) is a clean exit.
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stopped) if on_main_thread else None
        try:
            uvicorn.Server(self._server_config()).run(sockets=self._sockets())
        finally:
            self.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def start(self) -> Collector:
        """Run in background threads (for `gpufleet up` and tests)."""
        if self.forwarder is not None:
            self.forwarder.start()
        self.scheduler.start()
        self._push_dashboards()
        self._job.modify(next_run_time=dt.datetime.now(dt.timezone.utc))
        self._server = uvicorn.Server(self._server_config())
        self._thread = threading.Thread(
            target=self._server.run, args=(self._sockets(),), name="collector-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"collector could not listen on {self.settings.listen} (port in use?)")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        self._grafana_stop.set()
        if self._server is not None:
            self._server.should_exit = True
            if self._thread:
                self._thread.join(timeout=10)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.leadership.release()
        for body in self.app.state.kept_warm:
            body.close()
        self.engine.close()
        if self.forwarder is not None:
            # What was acknowledged but not yet forwarded lives in memory only: give the targets time to take it.
            self.forwarder.stop(timeout=FORWARD_DRAIN_S)
        if self._grafana_thread is not None:  # at most one request in flight (its timeout is 10 s)
            self._grafana_thread.join(timeout=15)
        self.store.close()
