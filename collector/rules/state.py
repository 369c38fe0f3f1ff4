"""Alert state in the collector's database: alerts, rule memory, the notifications sent, notification groups,
where their messages landed, silences and per-rule state. The tables are created by the collector's
migrations (0001_initial, 0002_alerting); this module owns their definitions and every query on them, over
the store's SQLAlchemy engine (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    delete,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from gpufleet.collector.rules.dispatch import Matcher, Silence, Target

log = logging.getLogger(__name__)
metadata = MetaData()

# Alert instances and their state; survives a collector restart.
alerts = Table(
    "alerts",
    metadata,
    Column("id", String(32), primary_key=True),  # hash of rule name + labels
    Column("rule", String(200), nullable=False),
    Column("state", String(16), nullable=False),  # pending | firing | resolved
    Column("labels", Text, nullable=False),
    Column("annotations", Text, nullable=False),
    Column("value", Float(53)),
    Column("active_since", BigInteger),
    Column("last_true", BigInteger),
    Column("fired_at", BigInteger),
    Column("resolved_at", BigInteger),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_alerts_state", "state"),
)

# Per-series memory of rules (the last counter value an event rule saw).
rule_memory = Table(
    "rule_memory",
    metadata,
    Column("rule", String(200), primary_key=True),
    Column("series_fingerprint", BigInteger, primary_key=True),
    Column("value", Float(53), nullable=False),
    Column("ts", BigInteger, nullable=False),
)

# Every notification sent, and where it landed (Slack channel and message ts): the audit trail.
notifications = Table(
    "notifications",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", String(32), nullable=False),
    Column("notifier", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("channel", String(100)),
    Column("message_ts", String(40)),
    Column("sent_at", BigInteger, nullable=False),
    Column("text", Text, nullable=False),
    Index("ix_notifications_alert", "alert_id"),
)

notification_groups = Table(
    "notification_groups",
    metadata,
    Column("group_key", String(512), primary_key=True),
    Column("state", Text, nullable=False),  # JSON: labels, created, last flush, alerts sent, resolved to tell
    Column("updated_ms", BigInteger, nullable=False),
)

group_messages = Table(
    "group_messages",
    metadata,
    Column("episode", String(600), primary_key=True),
    Column("notifier", String(32), primary_key=True),
    Column("channel", String(100), nullable=False),
    Column("message_ts", String(40), nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

silences = Table(
    "silences",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("matchers", Text, nullable=False),  # JSON list of {name, value, isRegex, isEqual}
    Column("starts_at", BigInteger, nullable=False),  # Unix ms
    Column("ends_at", BigInteger, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("comment", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_silences_ends_at", "ends_at"),
)

rule_state = Table(
    "rule_state",
    metadata,
    Column("rule", String(200), primary_key=True),
    Column("key", String(600), primary_key=True),
    Column("value", Text, nullable=False),  # JSON
    Column("ts", BigInteger, nullable=False),
)


class SqlAlertState:
    """The engine's :class:`~gpufleet.collector.rules.contract.AlertState`, and the silences the API manages,
    in the collector's database (the store's engine, passed in)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._disabled_told: set[str] = set()  # stored silences disabled on load, each logged once

    def _upsert(self, table: Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
        if not rows:
            return
        ins = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(table)
        stmt = ins.on_conflict_do_update(
            index_elements=keys,
            set_={c.name: ins.excluded[c.name] for c in table.columns if c.name not in keys},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    # ---- alerts and rule memory ------------------------------------------------------------------
    def load_alerts(self, states: Iterable[str] = ("pending", "firing")) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(alerts).where(alerts.c.state.in_(list(states)))).mappings().all()
        return [
            {**r, "labels": json.loads(r["labels"]), "annotations": json.loads(r["annotations"])}
            for r in rows
        ]

    def save_alerts(self, items: Sequence[Mapping[str, Any]]) -> None:
        self._upsert(
            alerts,
            [
                {
                    **a,
                    "labels": json.dumps(a["labels"], sort_keys=True),
                    "annotations": json.dumps(a["annotations"], sort_keys=True),
                }
                for a in items
            ],
            ["id"],
        )

    def load_rule_memory(self) -> dict[tuple[str, int], float]:
        with self.engine.connect() as conn:
            return {
                (r, fp): v
                for r, fp, v in conn.execute(
                    select(rule_memory.c.rule, rule_memory.c.series_fingerprint, rule_memory.c.value)
                )
            }

    def save_rule_memory(self, items: Mapping[tuple[str, int], float], now_ms: int) -> None:
        self._upsert(
            rule_memory,
            [{"rule": r, "series_fingerprint": fp, "value": v, "ts": now_ms} for (r, fp), v in items.items()],
            ["rule", "series_fingerprint"],
        )

    def record_notification(
        self,
        *,
        alert_id: str,
        notifier: str,
        state: str,
        channel: str | None,
        message_ts: str | None,
        sent_at: int,
        text: str,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                notifications.insert(),
                [
                    {
                        "alert_id": alert_id,
                        "notifier": notifier,
                        "state": state,
                        "channel": channel,
                        "message_ts": message_ts,
                        "sent_at": sent_at,
                        "text": text,
                    }
                ],
            )

    # ---- rule state ------------------------------------------------------------------------------
    def load_rule_state(self) -> dict[tuple[str, str], Any]:
        with self.engine.connect() as conn:
            return {
                (r, k): json.loads(v)
                for r, k, v in conn.execute(select(rule_state.c.rule, rule_state.c.key, rule_state.c.value))
            }

    def save_rule_state(self, items: Mapping[tuple[str, str], Any], now_ms: int) -> None:
        self._upsert(
            rule_state,
            [{"rule": r, "key": k, "value": json.dumps(v), "ts": now_ms} for (r, k), v in items.items()],
            ["rule", "key"],
        )

    # ---- groups ----------------------------------------------------------------------------------
    def load_groups(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [json.loads(s) for (s,) in conn.execute(select(notification_groups.c.state))]

    def save_groups(self, rows: Sequence[Mapping[str, Any]], deleted: Sequence[str]) -> None:
        now = int(time.time() * 1000)
        self._upsert(
            notification_groups,
            [
                {"group_key": r["key"], "state": json.dumps(r, sort_keys=True), "updated_ms": now}
                for r in rows
            ],
            ["group_key"],
        )
        if deleted:
            with self.engine.begin() as conn:
                conn.execute(
                    delete(notification_groups).where(notification_groups.c.group_key.in_(list(deleted)))
                )

    def group_target(self, episode: str, notifier: str) -> Target | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(group_messages.c.channel, group_messages.c.message_ts).where(
                    group_messages.c.episode == episode, group_messages.c.notifier == notifier
                )
            ).first()
        return (row[0], row[1]) if row else None

    def save_group_target(self, episode: str, notifier: str, where: Target) -> None:
        self._upsert(
            group_messages,
            [
                {
                    "episode": episode,
                    "notifier": notifier,
                    "channel": where[0],
                    "message_ts": where[1],
                    "updated_ms": int(time.time() * 1000),
                }
            ],
            ["episode", "notifier"],
        )

    # ---- silences --------------------------------------------------------------------------------
    def _silence(self, r: Row[Any]) -> Silence:
        """A stored silence. One whose matchers this version refuses (stored before regexes ran on RE2 and had a
        length limit) comes back disabled, with a warning logged once: it must neither stop the collector
        from starting nor stall every evaluation as it did."""
        docs = json.loads(r.matchers)
        try:
            matchers = tuple(Matcher.from_api(m) for m in docs)
        except ValueError as exc:
            if r.id not in self._disabled_told:
                self._disabled_told.add(r.id)
                log.warning(
                    "silence %s (by %s) is disabled: %s; it mutes nothing. Expire it (gpufleet silence expire "
                    "%s) and add one with a regex RE2 accepts",
                    r.id,
                    r.created_by,
                    exc,
                    r.id,
                )
            return Silence(
                r.id, (), r.starts_at, r.ends_at, r.created_by, r.comment, r.created_at, str(exc), tuple(docs)
            )
        return Silence(r.id, matchers, r.starts_at, r.ends_at, r.created_by, r.comment, r.created_at)

    def add_silence(self, s: Silence) -> None:
        self._upsert(
            silences,
            [
                {
                    "id": s.id,
                    "matchers": json.dumps([m.to_api() for m in s.matchers]),
                    "starts_at": s.starts_at_ms,
                    "ends_at": s.ends_at_ms,
                    "created_by": s.created_by,
                    "comment": s.comment,
                    "created_at": s.created_at_ms,
                }
            ],
            ["id"],
        )

    def list_silences(self) -> list[Silence]:
        with self.engine.connect() as conn:
            return [self._silence(r) for r in conn.execute(select(silences).order_by(silences.c.created_at))]

    def get_silence(self, silence_id: str) -> Silence | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(silences).where(silences.c.id == silence_id)).first()
        return self._silence(r) if r else None

    def expire_silence(self, silence_id: str, now_ms: int) -> Silence | None:
        s = self.get_silence(silence_id)
        if s is None:
            return None
        if s.ends_at_ms > now_ms:
            with self.engine.begin() as conn:
                conn.execute(
                    silences.update()
                    .where(silences.c.id == silence_id)
                    .values(ends_at=max(now_ms, s.starts_at_ms))
                )
        return self.get_silence(silence_id)

    def active_silences(self, now_ms: int) -> list[Silence]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(silences).where(silences.c.starts_at <= now_ms, silences.c.ends_at > now_ms)
            )
            return [self._silence(r) for r in rows]
