"""Keeps gpufleet's folder, data sources and dashboards in a Grafana up to date, through grafana-client,
and posts alert firing/resolve as Grafana annotations.

Pushing is idempotent: each object is read first and written only when it differs, so a second push
changes nothing and Grafana's version history gains one version per real change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from collector.rules.engine import Notification

log = logging.getLogger(__name__)

FOLDER_UID = "gpufleet"
FOLDER_TITLE = "gpufleet"
POSTGRES_DS_UID = "gpufleet-postgres"
PROMETHEUS_DS_UID = "gpufleet-prometheus"
# Grafana fills these in itself; they are not part of what we manage.
_DASHBOARD_SERVER_FIELDS = ("id", "version")
_DATASOURCE_FIELDS = ("name", "type", "url", "access", "user", "database", "basicAuth", "jsonData")


def connect(url: str, token: str | None, *, timeout: float = 10.0) -> Any:
    """A grafana-client API for ``url`` (``http://host:3000``), authenticated by a service-account token."""
    from grafana_client import GrafanaApi

    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def postgres_datasource(db_url: str, *, uid: str = POSTGRES_DS_UID, name: str = "gpufleet PostgreSQL") -> dict[str, Any]:
    """Grafana's built-in PostgreSQL data source for the collector's store at SQLAlchemy URL ``db_url``."""
    from sqlalchemy.engine import make_url

    u = make_url(db_url)
    if not u.drivername.startswith("postgresql"):
        raise ValueError(f"Grafana reads the store through its PostgreSQL data source; {u.drivername} is not "
                         "PostgreSQL. Run the collector on PostgreSQL (--db postgresql+psycopg://…) or use the "
                         "Prometheus flavour (--prometheus-url).")
    ds: dict[str, Any] = {
        "uid": uid, "name": name, "type": "grafana-postgresql-datasource", "access": "proxy",
        "url": f"{u.host or 'localhost'}:{u.port or 5432}", "user": u.username or "", "database": u.database or "",
        "basicAuth": False,
        "jsonData": {"database": u.database or "", "sslmode": u.query.get("sslmode", "disable"),
                     "postgresVersion": 1500, "timescaledb": False, "maxOpenConns": 10},
    }
    if u.password:
        ds["secureJsonData"] = {"password": u.password}
    return ds


def prometheus_datasource(url: str, *, uid: str = PROMETHEUS_DS_UID, name: str = "gpufleet Prometheus") -> dict[str, Any]:
    return {"uid": uid, "name": name, "type": "prometheus", "access": "proxy", "url": url, "user": "",
            "database": "", "basicAuth": False, "jsonData": {"httpMethod": "POST", "timeInterval": "15s"}}


@dataclass
class PushReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{len(self.created)} created, {len(self.updated)} updated, {len(self.unchanged)} unchanged"
                + "".join(f"\n  {what}: {name}" for what, names in (("created", self.created),
                                                                      ("updated", self.updated))
                          for name in names))


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status_code", None) == 404


class GrafanaPusher:
    """Creates or updates the folder, data sources and dashboards; ``push()`` returns what it changed."""

    def __init__(self, api: Any, *, datasources: list[dict[str, Any]], dashboards: Mapping[str, dict[str, Any]],
                 folder_uid: str = FOLDER_UID, folder_title: str = FOLDER_TITLE, message: str = "gpufleet") -> None:
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
        from grafana_client.client import GrafanaClientError

        try:
            folder = self.api.folder.get_folder(self.folder_uid)
        except GrafanaClientError as exc:
            if not _not_found(exc):
                raise
            self.api.folder.create_folder(self.folder_title, uid=self.folder_uid)
            report.created.append(f"folder {self.folder_title}")
            return
        if folder.get("title") != self.folder_title:
            self.api.folder.update_folder(self.folder_uid, title=self.folder_title, version=folder.get("version"),
                                          overwrite=True)
            report.updated.append(f"folder {self.folder_title}")
        else:
            report.unchanged.append(f"folder {self.folder_title}")

    def _datasource(self, ds: dict[str, Any], report: PushReport) -> None:
        from grafana_client.client import GrafanaClientError

        label = f"data source {ds['name']}"
        try:
            current = self.api.datasource.get_datasource_by_uid(ds["uid"])
        except GrafanaClientError as exc:
            if not _not_found(exc):
                raise
            self.api.datasource.create_datasource(ds)
            report.created.append(label)
            return
        # secureJsonData (the password) is write-only in Grafana, so it cannot be compared; it is sent again
        # whenever anything else changed.
        if all(current.get(k) == ds.get(k) for k in _DATASOURCE_FIELDS):
            report.unchanged.append(label)
            return
        self.api.datasource.update_datasource(current["id"], ds)
        report.updated.append(label)

    def _dashboard(self, name: str, model: dict[str, Any], report: PushReport) -> None:
        from grafana_client.client import GrafanaClientError

        uid = model["uid"]
        label = f"dashboard {model.get('title', uid)}"
        try:
            current = self.api.dashboard.get_dashboard(uid)
        except GrafanaClientError as exc:
            if not _not_found(exc):
                raise
            current = None
        if current is not None:
            theirs = {k: v for k, v in current.get("dashboard", {}).items() if k not in _DASHBOARD_SERVER_FIELDS}
            ours = {k: v for k, v in model.items() if k not in _DASHBOARD_SERVER_FIELDS}
            if theirs == ours and current.get("meta", {}).get("folderUid") == self.folder_uid:
                report.unchanged.append(label)
                return
        body = {"dashboard": {**{k: v for k, v in model.items() if k not in _DASHBOARD_SERVER_FIELDS},
                              "id": None if current is None else current["dashboard"].get("id"),
                              **({} if current is None else {"version": current["dashboard"].get("version")})},
                "folderUid": self.folder_uid, "overwrite": current is not None,
                "message": f"{self.message}: {name}"}
        self.api.dashboard.update_dashboard(body)
        (report.created if current is None else report.updated).append(label)


class GrafanaAnnotationNotifier:
    """A notifier for the rule engine: a firing alert becomes a Grafana annotation (tags gpufleet, the rule,
    its severity, node), and its resolve turns that annotation into a region ending at the resolve time."""

    name = "grafana"

    def __init__(self, api: Any) -> None:
        self.api = api

    def send(self, n: Notification, previous: tuple[str, str] | None) -> tuple[str, str] | None:
        tags = ["gpufleet", n.rule, n.severity] + [f"{k}={n.labels[k]}" for k in ("cluster", "node", "gpu")
                                                    if k in n.labels]
        if n.state == "resolved" and previous is not None:
            _, annotation_id = previous
            self.api.annotations.partial_update_annotation(int(annotation_id), time_from=n.since_ms, time_to=n.at_ms,
                                                           tags=[*tags, "resolved"], text=f"Resolved: {n.text}")
            return previous
        resp = self.api.annotations.add_annotation(time_from=n.since_ms if n.state == "firing" else n.at_ms,
                                                   tags=[*tags, n.state], text=n.text)
        return "grafana", str(resp["id"])


def collector_pusher(api: Any, db_url: str, prometheus_url: str | None = None) -> GrafanaPusher:
    """What the collector and `gpufleet dashboards push` push: the PostgreSQL flavour when the store is
    PostgreSQL, the Prometheus flavour when a Prometheus URL is given."""
    import dashboards

    datasources, flavours = [], []
    if db_url.startswith("postgresql"):
        datasources.append(postgres_datasource(db_url))
        flavours.append("postgres")
    if prometheus_url:
        datasources.append(prometheus_datasource(prometheus_url))
        flavours.append("prometheus")
    if not flavours:
        raise ValueError("nothing to push: Grafana reads the store only on PostgreSQL (this store is "
                         f"{db_url.split(':', 1)[0]}); give --db postgresql+psycopg://… or --prometheus-url URL")
    models = {name: m for name, m in dashboards.build().items() if name.split(".")[1] in flavours}
    return GrafanaPusher(api, datasources=datasources, dashboards=models)


def push_with_retry(pusher: GrafanaPusher, *, attempts: int = 5, delay: float = 2.0,
                    sleep: Any = time.sleep) -> PushReport | None:
    """For the collector's start: Grafana may come up after it. Logs and gives up after ``attempts``."""
    for i in range(1, attempts + 1):
        try:
            report = pusher.push()
            log.info("Grafana dashboards pushed: %s", report)
            return report
        except Exception as exc:
            log.warning("pushing dashboards to Grafana failed (attempt %d of %d): %s", i, attempts, exc)
            if i < attempts:
                sleep(delay * i)
    log.error("gave up pushing dashboards to Grafana; run `gpufleet dashboards push` once it is reachable")
    return None
