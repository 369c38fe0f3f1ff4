"""Store: write remote-write series, read ranges, latest values, GPUs, alert state.

The same code runs on SQLite and PostgreSQL; only the "insert, ignoring what
exists" statement differs by dialect. A batch is stored in one transaction:
whole or not at all. Retried batches are no-ops thanks to the (series, ts) key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from collector.store import migrate, schema
from gpufleet.remote_write import Series

log = logging.getLogger(__name__)

LOOKBACK_MS = 5 * 60 * 1000  # a sample counts as "current" for 5 minutes, as in Prometheus


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or refused the transaction; the caller should retry later."""


def fingerprint(labels: Mapping[str, str]) -> int:
    """64-bit signed hash of a label set (``__name__`` included), stable across processes."""
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


@dataclass(frozen=True, slots=True)
class Point:
    labels: dict[str, str]  # __name__ included
    ts: int
    value: float


def _insert(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite:///FILE or postgresql+psycopg://…")
        self._insert = _insert(self.dialect)
        self._ids: dict[int, int] = {}
        self._ids_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, *, migrate_schema: bool = True, **engine_kw: Any) -> Store:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **engine_kw)

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, **engine_kw)
        store = cls(engine)
        if migrate_schema:
            try:
                migrate.upgrade(engine)
            except OperationalError as exc:
                raise StoreUnavailable(f"cannot reach the database at {engine.url.render_as_string()}: "
                                       f"{exc.orig}") from None
        return store

    def close(self) -> None:
        self.engine.dispose()

    # ---- ingest ----------------------------------------------------------------------------------
    def write(self, series: Sequence[Series], *, now_ms: int | None = None) -> int:
        """Store every sample of every series in one transaction. Returns the number of samples offered."""
        if not series:
            return 0
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        fps = [fingerprint(s.labels) for s in series]
        try:
            with self.engine.begin() as conn:
                ids = self._series_ids(conn, series, fps, now_ms)
                rows = [{"series_id": ids[fp], "ts": t, "value": v}
                        for s, fp in zip(series, fps, strict=False) for t, v in s.samples]
                if rows:
                    conn.execute(self._insert(schema.samples).on_conflict_do_nothing(), rows)
                newest: dict[int, tuple[int, float]] = {}
                for s, fp in zip(series, fps, strict=False):
                    if s.samples:
                        t, v = max(s.samples, key=lambda p: p[0])
                        sid = ids[fp]
                        if sid not in newest or t > newest[sid][0]:
                            newest[sid] = (t, v)
                if newest:
                    ins = self._insert(schema.latest)
                    stmt = ins.on_conflict_do_update(
                        index_elements=["series_id"],
                        set_={"ts": ins.excluded.ts, "value": ins.excluded.value},
                        where=ins.excluded.ts >= schema.latest.c.ts,
                    )
                    conn.execute(stmt, [{"series_id": k, "ts": t, "value": v} for k, (t, v) in newest.items()])
        except (OperationalError, DBAPIError) as exc:
            with self._ids_lock:  # ids learned in a rolled-back transaction may not exist
                self._ids.clear()
            raise StoreUnavailable(f"database write failed: {getattr(exc, 'orig', exc)}") from None
        return len(rows)

    def _series_ids(self, conn: Any, series: Sequence[Series], fps: list[int], now_ms: int) -> dict[int, int]:
        with self._ids_lock:
            known = {fp: self._ids[fp] for fp in fps if fp in self._ids}
        missing = {fp: s for fp, s in zip(fps, series, strict=False) if fp not in known}
        if missing:
            rows = []
            for fp, s in missing.items():
                labels = {k: v for k, v in s.labels.items() if k != "__name__"}
                rows.append({"fingerprint": fp, "metric": s.name, "labels": json.dumps(labels, sort_keys=True),
                             "node": labels.get("node"), "uuid": labels.get("uuid"), "created_ms": now_ms})
            conn.execute(self._insert(schema.series).on_conflict_do_nothing(index_elements=["fingerprint"]), rows)
            fp_list = list(missing)
            for i in range(0, len(fp_list), 5000):
                chunk = fp_list[i:i + 5000]
                for fp, sid in conn.execute(select(schema.series.c.fingerprint, schema.series.c.id)
                                            .where(schema.series.c.fingerprint.in_(chunk))):
                    known[fp] = sid
            with self._ids_lock:
                self._ids.update({fp: known[fp] for fp in missing})
        return known

    # ---- reads -----------------------------------------------------------------------------------
    def _matching_series(self, conn: Any, metric: str, matchers: Mapping[str, str]) -> list[tuple[int, dict]]:
        out = []
        for sid, labels_json in conn.execute(select(schema.series.c.id, schema.series.c.labels)
                                             .where(schema.series.c.metric == metric)):
            labels = json.loads(labels_json)
            if all(labels.get(k, "") == v for k, v in matchers.items()):
                out.append((sid, {"__name__": metric, **labels}))
        return out

    def query_range(self, metric: str, matchers: Mapping[str, str], start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        """Each matching series sampled every ``step`` seconds from ``start`` to ``end``: the newest value
        at or before each step, no older than 5 minutes (Prometheus's instant-vector semantics)."""
        start_ms, end_ms, step_ms = int(start * 1000), int(end * 1000), max(1, int(step * 1000))
        result = []
        with self.engine.connect() as conn:
            for sid, labels in self._matching_series(conn, metric, matchers):
                pts = conn.execute(
                    select(schema.samples.c.ts, schema.samples.c.value)
                    .where(schema.samples.c.series_id == sid,
                           schema.samples.c.ts > start_ms - LOOKBACK_MS, schema.samples.c.ts <= end_ms)
                    .order_by(schema.samples.c.ts)).all()
                values = []
                i, last = 0, None
                for t in range(start_ms, end_ms + 1, step_ms):
                    while i < len(pts) and pts[i][0] <= t:
                        last = pts[i]
                        i += 1
                    if last is not None and last[0] > t - LOOKBACK_MS:
                        values.append([t / 1000.0, last[1]])
                if values:
                    result.append({"metric": labels, "values": values})
        return result

    def latest(self, metric: str | None = None, matchers: Mapping[str, str] | None = None,
               since_ms: int | None = None) -> list[Point]:
        """The newest sample of each series (of ``metric``, if given), newer than ``since_ms`` if given."""
        q = select(schema.series.c.metric, schema.series.c.labels, schema.latest.c.ts, schema.latest.c.value) \
            .join(schema.latest, schema.latest.c.series_id == schema.series.c.id)
        if metric is not None:
            q = q.where(schema.series.c.metric == metric)
        if since_ms is not None:
            q = q.where(schema.latest.c.ts > since_ms)
        out = []
        with self.engine.connect() as conn:
            for name, labels_json, ts, value in conn.execute(q):
                labels = json.loads(labels_json)
                if matchers and not all(labels.get(k, "") == v for k, v in matchers.items()):
                    continue
                out.append(Point({"__name__": name, **labels}, ts, value))
        return out

    def gpus(self, now_ms: int | None = None, stale_after_ms: int = 60_000) -> list[dict[str, Any]]:
        """Every GPU known: identity, last-seen time, and the newest value of each of its series."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        q = select(schema.series.c.metric, schema.series.c.labels, schema.series.c.uuid,
                   schema.latest.c.ts, schema.latest.c.value) \
            .join(schema.latest, schema.latest.c.series_id == schema.series.c.id) \
            .where(schema.series.c.uuid.is_not(None))
        gpus: dict[str, dict[str, Any]] = {}
        identity = ("node", "gpu", "uuid", "model", "cluster", "pod", "namespace", "container")
        with self.engine.connect() as conn:
            for metric, labels_json, uuid, ts, value in conn.execute(q):
                labels = json.loads(labels_json)
                g = gpus.setdefault(uuid, {"uuid": uuid, "last_seen": 0, "values": {}})
                if ts >= g["last_seen"]:
                    g["last_seen"] = ts
                    for k in identity:
                        if k in labels:
                            g[k] = labels[k]
                extra = {k: v for k, v in labels.items() if k not in identity}
                if metric == "gpufleet_gpu_info":
                    g["info"] = extra
                    continue
                key = metric + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(extra.items())) + "}" if extra else "")
                g["values"][key] = value
        out = []
        for g in gpus.values():
            g["up"] = g["values"].get("gpufleet_gpu_up") == 1.0
            g["stale"] = now_ms - g["last_seen"] > stale_after_ms
            g["last_seen"] = g["last_seen"] / 1000.0
            out.append(g)
        out.sort(key=lambda g: (g.get("cluster", ""), g.get("node", ""), int(g.get("gpu", 0) or 0)))
        return out

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {name: conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()
                    for name in ("series", "samples")}

    # ---- alert state -----------------------------------------------------------------------------
    def load_alerts(self, states: Iterable[str] = ("pending", "firing")) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(schema.alerts).where(schema.alerts.c.state.in_(list(states)))).mappings().all()
        return [{**r, "labels": json.loads(r["labels"]), "annotations": json.loads(r["annotations"])} for r in rows]

    def save_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        if not alerts:
            return
        rows = [{**a, "labels": json.dumps(a["labels"], sort_keys=True),
                 "annotations": json.dumps(a["annotations"], sort_keys=True)} for a in alerts]
        ins = self._insert(schema.alerts)
        cols = [c.name for c in schema.alerts.columns if c.name != "id"]
        stmt = ins.on_conflict_do_update(index_elements=["id"], set_={c: ins.excluded[c] for c in cols})
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    def load_rule_memory(self) -> dict[tuple[str, int], float]:
        with self.engine.connect() as conn:
            return {(r, fp): v for r, fp, v in conn.execute(
                select(schema.rule_memory.c.rule, schema.rule_memory.c.series_fingerprint, schema.rule_memory.c.value))}

    def save_rule_memory(self, items: Mapping[tuple[str, int], float], now_ms: int) -> None:
        if not items:
            return
        ins = self._insert(schema.rule_memory)
        stmt = ins.on_conflict_do_update(index_elements=["rule", "series_fingerprint"],
                                         set_={"value": ins.excluded.value, "ts": ins.excluded.ts})
        with self.engine.begin() as conn:
            conn.execute(stmt, [{"rule": r, "series_fingerprint": fp, "value": v, "ts": now_ms}
                                for (r, fp), v in items.items()])

    def record_notification(self, **row: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.notifications.insert(), [row])

    def notification_target(self, alert_id: str, notifier: str) -> tuple[str, str] | None:
        """Where the firing message of an alert landed (channel, ts), to edit it on resolve."""
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.notifications.c.channel, schema.notifications.c.message_ts)
                               .where(schema.notifications.c.alert_id == alert_id,
                                      schema.notifications.c.notifier == notifier,
                                      schema.notifications.c.state == "firing",
                                      schema.notifications.c.message_ts.is_not(None))
                               .order_by(schema.notifications.c.id.desc()).limit(1)).first()
        return (row[0], row[1]) if row else None

    def notifications(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(schema.notifications)
                                                  .order_by(schema.notifications.c.id)).mappings()]
