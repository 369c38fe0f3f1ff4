"""Wires the collector: store, rule engine on an APScheduler job, notifiers, HTTP API under uvicorn."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler

from collector.app import Metrics, create_app
from collector.notify.console import ConsoleNotifier
from collector.rules.engine import Engine
from collector.rules.model import default_rules_path, load_rules
from collector.store import Store
from collector.store.store import Retention

log = logging.getLogger(__name__)


@dataclass
class CollectorSettings:
    listen: str = "0.0.0.0:9446"
    db: str = "sqlite:///gpufleet.db"
    rules: list[Path] = field(default_factory=list)  # empty: the default rule pack
    eval_interval: float = 5.0
    tokens: list[str] = field(default_factory=list)
    console: bool = False
    slack_token: str | None = None
    slack_channel: str | None = None
    slack_base_url: str = "https://slack.com/api/"
    forward: list[str] = field(default_factory=list)  # remote-write URLs to forward every stored batch to
    retention: Retention = field(default_factory=Retention)
    raw_layout: str = "chunks"  # "rows": the naive one-row-per-sample layout, for comparisons
    maintenance_interval: float = 60.0


class Collector:
    def __init__(self, settings: CollectorSettings, *, notifiers: list[Any] | None = None,
                 slack_client: Any | None = None) -> None:
        self.settings = settings
        self.store = Store.open(settings.db, raw_layout=settings.raw_layout, retention=settings.retention)
        self.forwarder = None
        if settings.forward:
            from collector.forward import Forwarder

            self.forwarder = Forwarder(settings.forward)
        self.rules = load_rules(settings.rules or [default_rules_path()])
        if notifiers is None:
            notifiers = []
            if settings.console:
                notifiers.append(ConsoleNotifier())
            if settings.slack_token or slack_client is not None:
                from collector.notify.slack import SlackNotifier

                if not settings.slack_channel:
                    raise ValueError("--slack-channel (GPUFLEET_SLACK_CHANNEL) is needed with a Slack token")
                if slack_client is None:
                    from slack_sdk import WebClient

                    slack_client = WebClient(token=settings.slack_token, base_url=settings.slack_base_url)
                notifiers.append(SlackNotifier(slack_client, settings.slack_channel))
        self.engine = Engine(self.rules, self.store, self.store, notifiers)
        self.metrics = Metrics()
        self.app = create_app(self.store, tokens=settings.tokens, engine=self.engine, on_write=self._on_write,
                              metrics=self.metrics, info={"rules": len(self.rules)}, forwarder=self.forwarder)
        self._tick_lock = threading.Lock()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._job = self.scheduler.add_job(self.evaluate, "interval", seconds=settings.eval_interval,
                                           id="rules", max_instances=1, coalesce=True)
        self.scheduler.add_job(self.maintain, "interval", seconds=settings.maintenance_interval, id="store",
                               max_instances=1, coalesce=True)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def evaluate(self) -> None:
        with self._tick_lock:
            try:
                self.engine.tick(int(time.time() * 1000))
            except Exception:
                log.exception("rule evaluation failed; next try at the next interval")

    def maintain(self) -> None:
        """Compaction, rollups and retention (see collector/store/maintenance.py)."""
        try:
            self.store.maintain()
        except Exception:
            log.exception("store maintenance failed; next try at the next interval")

    def _on_write(self, metric_names: set[str]) -> None:
        # An agent marked this write urgent (an XID, a GPU lost, a throttle switching on):
        # evaluate now instead of at the next interval.
        if self.scheduler.running:
            self._job.modify(next_run_time=dt.datetime.now(dt.timezone.utc))

    def _server_config(self) -> uvicorn.Config:
        host, _, port = self.settings.listen.rpartition(":")
        return uvicorn.Config(self.app, host=host.strip("[]") or "0.0.0.0", port=int(port), log_level="warning",
                              access_log=False, timeout_graceful_shutdown=5)

    def serve(self) -> None:
        """Run in the foreground until interrupted (Ctrl-C / SIGTERM)."""
        if self.forwarder is not None:
            self.forwarder.start()
        self.scheduler.start()
        try:
            uvicorn.Server(self._server_config()).run()
        finally:
            self.close()

    def start(self) -> Collector:
        """Run in background threads (for `gpufleet up` and tests)."""
        if self.forwarder is not None:
            self.forwarder.start()
        self.scheduler.start()
        self._server = uvicorn.Server(self._server_config())
        self._thread = threading.Thread(target=self._server.run, name="collector-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"collector could not listen on {self.settings.listen} (port in use?)")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread:
                self._thread.join(timeout=10)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.forwarder is not None:
            self.forwarder.stop()
        self.store.close()
