"""Keeps gpufleet's folder, data sources and dashboards in a Grafana up to date, and posts alert groups as
Grafana annotations, through gpufleet's own Grafana client (collector/grafana_api.py).

Pushing is idempotent: each object is read first and written only when it differs, so a second push
changes nothing and Grafana's version history gains one version per real change. The dashboards pushed
are the JSON files shipped in the ``dashboards`` package; building them is a development step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3

from gpufleet.collector.grafana_api import GrafanaApi, GrafanaError
from gpufleet.collector.rules.contract import Delivery
from gpufleet.collector.rules.dispatch import GroupNotification
from gpufleet.core.retry import RetryPolicy, Verdict, classify

log = logging.getLogger(__name__)

FOLDER_UID = "gpufleet"
FOLDER_TITLE = "gpufleet"
POSTGRES_DS_UID = "gpufleet-postgres"
PROMETHEUS_DS_UID = "gpufleet-prometheus"
# Grafana fills these in itself; they are not part of what we manage.
_DASHBOARD_SERVER_FIELDS = ("id", "version")
_DATASOURCE_FIELDS = ("name", "type", "url", "access", "user", "database", "basicAuth", "jsonData")
# The collector's start-up push: Grafana may come up minutes or hours after it, so it never gives up.
FIRST_RETRY_S = 2.0
MAX_RETRY_S = 300.0


def connect(
    url: str, token: str | None, *, timeout: float = 10.0, http: urllib3.PoolManager | None = None
) -> GrafanaApi:
    """The Grafana at ``url`` (``http://host:3000``), authenticated by a service-account token."""
    return GrafanaApi(url, token, timeout=timeout, http=http)


def postgres_datasource(
    db_url: str, *, uid: str = POSTGRES_DS_UID, name: str = "gpufleet PostgreSQL"
) -> dict[str, Any]:
    """Grafana's built-in PostgreSQL data source for the collector's store at SQLAlchemy URL ``db_url``."""
    from sqlalchemy.engine import make_url

    u = make_url(db_url)
    if not u.drivername.startswith("postgresql"):
        raise ValueError(
            f"Grafana reads the store through its PostgreSQL data source; {u.drivername} is not "
            "PostgreSQL. Run the collector on PostgreSQL (--db postgresql+psycopg://…) or use the "
            "Prometheus flavour (--prometheus-url)."
        )
    ds: dict[str, Any] = {
        "uid": uid,
        "name": name,
        "type": "grafana-postgresql-datasource",
        "access": "proxy",
        "url": f"{u.host or 'localhost'}:{u.port or 5432}",
        "user": u.username or "",
        "database": u.database or "",
        "basicAuth": False,
        "jsonData": {
            "database": u.database or "",
            "sslmode": u.query.get("sslmode", "disable"),
            "postgresVersion": 1500,
            "timescaledb": False,
            "maxOpenConns": 10,
        },
    }
    if u.password:
        ds["secureJsonData"] = {"password": u.password}
    return ds


def prometheus_datasource(
    url: str, *, uid: str = PROMETHEUS_DS_UID, name: str = "gpufleet Prometheus"
) -> dict[str, Any]:
    return {
        "uid": uid,
        "name": name,
        "type": "prometheus",
        "access": "proxy",
        "url": url,
        "user": "",
        "database": "",
        "basicAuth": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
    }


@dataclass
class PushReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} updated, {len(self.unchanged)} unchanged"
            + "".join(
                f"\n  {what}: {name}"
                for what, names in (("created", self.created), ("updated", self.updated))
                for name in names
            )
        )


class GrafanaPusher:
    """Creates or updates the folder, data sources and dashboards; ``push()`` returns what it changed."""

    def __init__(
        self,
        api: GrafanaApi,
        *,
        datasources: list[dict[str, Any]],
        dashboards: Mapping[str, dict[str, Any]],
        folder_uid: str = FOLDER_UID,
        folder_title: str = FOLDER_TITLE,
        message: str = "gpufleet",
    ) -> None:
        self.api = api
        self.datasources = datasources
        self.dashboards = dashboards
        self.folder_uid = folder_uid
        self.folder_title = folder_title
        self.message = message

    def push(self) -> PushReport:
        report = PushReport()
        self._folder(report)
        for ds in self.datasources:
            self._datasource(ds, report)
        for name, model in self.dashboards.items():
            self._dashboard(name, model, report)
        return report

    def _folder(self, report: PushReport) -> None:
        label = f"folder {self.folder_title}"
        folder = self.api.get_folder(self.folder_uid)
        if folder is None:
            self.api.create_folder(self.folder_uid, self.folder_title)
            report.created.append(label)
        elif folder.get("title") != self.folder_title:
            self.api.update_folder(
                self.folder_uid, title=self.folder_title, version=folder.get("version"), overwrite=True
            )
            report.updated.append(label)
        else:
            report.unchanged.append(label)

    def _datasource(self, ds: dict[str, Any], report: PushReport) -> None:
        label = f"data source {ds['name']}"
        current = self.api.get_datasource(ds["uid"])
        if current is None:
            self.api.create_datasource(ds)
            report.created.append(label)
            return
        # secureJsonData (the password) is write-only in Grafana, so it cannot be compared; it is sent again
        # whenever anything else changed.
        if all(current.get(k) == ds.get(k) for k in _DATASOURCE_FIELDS):
            report.unchanged.append(label)
            return
        self.api.update_datasource(current["id"], ds)
        report.updated.append(label)

    def _dashboard(self, name: str, model: dict[str, Any], report: PushReport) -> None:
        label = f"dashboard {model.get('title', model['uid'])}"
        current = self.api.get_dashboard(model["uid"])
        ours = {k: v for k, v in model.items() if k not in _DASHBOARD_SERVER_FIELDS}
        if current is not None:
            theirs = {
                k: v for k, v in current.get("dashboard", {}).items() if k not in _DASHBOARD_SERVER_FIELDS
            }
            if theirs == ours and current.get("meta", {}).get("folderUid") == self.folder_uid:
                report.unchanged.append(label)
                return
        if current is None:
            dashboard = {**ours, "id": None}
        else:
            dashboard = {
                **ours,
                "id": current["dashboard"].get("id"),
                "version": current["dashboard"].get("version"),
            }
        self.api.save_dashboard(
            dashboard,
            folder_uid=self.folder_uid,
            overwrite=current is not None,
            message=f"{self.message}: {name}",
        )
        (report.created if current is None else report.updated).append(label)


class GrafanaAnnotationNotifier:
    """A notifier for the rule engine: an alert group's episode becomes one Grafana annotation region. Its
    first notification creates the annotation at the moment the first alert started (tags ``gpufleet``, the
    rules, the severity, ``cluster=``/``node=``/``gpu=``, ``firing``); later ones edit its text and tags;
    the resolve closes the region at the resolve time (tag ``resolved``)."""

    name = "grafana"

    def __init__(self, api: GrafanaApi) -> None:
        self.api = api

    def send(self, g: GroupNotification, /) -> Delivery:
        try:
            return Delivery(self._annotate(g))
        except GrafanaError as exc:
            # No answer, a rate limit or a server error may pass; a refusal (bad token, bad request) will not.
            return Delivery.failed(str(exc), retry=classify(exc.status) is Verdict.RETRY)

    def _annotate(self, g: GroupNotification) -> tuple[str, str]:
        alerts = [*g.firing, *g.resolved]
        labels = {**alerts[0].labels, **g.labels}
        tags = [
            "gpufleet",
            *sorted({a.rule for a in alerts}),
            g.severity,
            *(f"{k}={labels[k]}" for k in ("cluster", "node", "gpu") if labels.get(k)),
            g.state,
        ]
        end_ms = g.at_ms if g.state == "resolved" else None
        if g.previous is not None:
            if g.repeat:  # nothing new to tell
                return g.previous
            try:
                self.api.patch_annotation(int(g.previous[1]), time_end_ms=end_ms, tags=tags, text=g.text)
                return g.previous
            except GrafanaError as exc:
                if exc.status != 404:
                    raise
                log.warning(
                    "Grafana annotation %s of alert group %s is gone; posting a new one", g.previous[1], g.key
                )
        annotation_id = self.api.add_annotation(
            time_ms=min(a.since_ms for a in alerts), tags=tags, text=g.text, time_end_ms=end_ms
        )
        return self.name, str(annotation_id)


def collector_pusher(api: GrafanaApi, db_url: str, prometheus_url: str | None = None) -> GrafanaPusher:
    """What the collector and `gpufleet dashboards push` push: the PostgreSQL flavour when the store is
    PostgreSQL, the Prometheus flavour when a Prometheus URL is given, each as shipped in ``dashboards``."""
    datasources, flavours = [], []
    if db_url.startswith("postgresql"):
        datasources.append(postgres_datasource(db_url))
        flavours.append("postgres")
    if prometheus_url:
        datasources.append(prometheus_datasource(prometheus_url))
        flavours.append("prometheus")
    if not flavours:
        raise ValueError(
            "nothing to push: Grafana reads the store only on PostgreSQL (this store is "
            f"{db_url.split(':', 1)[0]}); give --db postgresql+psycopg://… or --prometheus-url URL"
        )
    return GrafanaPusher(api, datasources=datasources, dashboards=shipped_dashboards(flavours))


def shipped_dashboards(flavours: list[str]) -> dict[str, dict[str, Any]]:
    """The dashboard JSON shipped as package data of ``gpufleet.dashboards``, {file name: model}, of the given
    flavours. Found without importing that package: it is the dashboards' build code (it reads the agent's
    field table), which a collector never runs."""
    spec = importlib.util.find_spec("gpufleet.dashboards")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the gpufleet.dashboards package data is missing from this installation; reinstall gpufleet"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    return {
        p.name: json.loads(p.read_text())
        for flavour in flavours
        for p in sorted(folder.glob(f"*.{flavour}.json"))
    }


def retry_delays(first: float = FIRST_RETRY_S, cap: float = MAX_RETRY_S) -> Iterator[float]:
    """Seconds to wait before each next try: ``first``, doubling up to ``cap``, then ``cap`` for ever. One
    collector waits for one Grafana: no herd to spread, so no jitter."""
    return RetryPolicy(first_s=first, max_s=cap, jitter=0.0).delays()


def push_with_retry(
    pusher: GrafanaPusher,
    stop: threading.Event,
    *,
    first_delay: float = FIRST_RETRY_S,
    max_delay: float = MAX_RETRY_S,
) -> PushReport | None:
    """The collector's start-up push, in a background thread: Grafana may come up after the collector, or
    its token may be fixed later, so this tries until a push succeeds (one log line per failure), waiting
    longer each time up to ``max_delay``. Returns None when ``stop`` is set first (the collector stops)."""
    delays = retry_delays(first_delay, max_delay)
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            report = pusher.push()
        except Exception as exc:  # GrafanaError mostly; anything else must not end the retries either
            delay = next(delays)
            log.warning(
                "pushing dashboards to Grafana failed (try %d, next in %.0f s): %s",
                attempt,
                delay,
                exc if isinstance(exc, GrafanaError) else repr(exc),
            )
            stop.wait(delay)
            continue
        log.info("Grafana dashboards pushed: %s", report)
        return report
    return None
