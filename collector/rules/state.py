"""Alerting state in the collector's database: notification groups, where their messages landed,
silences and per-rule state (tables of migration 0002_alerting), beside the store's alert tables."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gpufleet.collector.rules.dispatch import Matcher, Silence
from sqlalchemy import BigInteger, Column, Index, MetaData, String, Table, Text, delete, select

metadata = MetaData()

notification_groups = Table(
    "notification_groups", metadata,
    Column("group_key", String(512), primary_key=True),
    Column("state", Text, nullable=False),  # JSON: labels, created, last flush, alerts sent, resolved to tell
    Column("updated_ms", BigInteger, nullable=False),
)

group_messages = Table(
    "group_messages", metadata,
    Column("episode", String(600), primary_key=True),
    Column("notifier", String(32), primary_key=True),
    Column("channel", String(100), nullable=False),
    Column("message_ts", String(40), nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

silences = Table(
    "silences", metadata,
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
    "rule_state", metadata,
    Column("rule", String(200), primary_key=True),
    Column("key", String(600), primary_key=True),
    Column("value", Text, nullable=False),  # JSON
    Column("ts", BigInteger, nullable=False),
)


class SqlState:
    """The engine's state interface over a :class:`gpufleet.collector.store.Store` (SQLite or PostgreSQL)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.engine = store.engine
        for name in ("load_alerts", "save_alerts", "load_rule_memory", "save_rule_memory", "record_notification",
                     "notification_target"):
            setattr(self, name, getattr(store, name))

    def _upsert(self, table: Table, rows: list[dict[str, Any]], keys: list[str]) -> None:
        if not rows:
            return
        ins = self.store._insert(table)
        stmt = ins.on_conflict_do_update(index_elements=keys, set_={c.name: ins.excluded[c.name]
                                                                    for c in table.columns if c.name not in keys})
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    # ---- rule state ------------------------------------------------------------------------------
    def load_rule_state(self) -> dict[tuple[str, str], Any]:
        with self.engine.connect() as conn:
            return {(r, k): json.loads(v) for r, k, v in conn.execute(
                select(rule_state.c.rule, rule_state.c.key, rule_state.c.value))}

    def save_rule_state(self, items: Mapping[tuple[str, str], Any], now_ms: int) -> None:
        self._upsert(rule_state, [{"rule": r, "key": k, "value": json.dumps(v), "ts": now_ms}
                                  for (r, k), v in items.items()], ["rule", "key"])

    # ---- groups ----------------------------------------------------------------------------------
    def load_groups(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [json.loads(s) for (s,) in conn.execute(select(notification_groups.c.state))]

    def save_groups(self, rows: Sequence[Mapping[str, Any]], deleted: Sequence[str]) -> None:
        now = int(time.time() * 1000)
        self._upsert(notification_groups, [{"group_key": r["key"], "state": json.dumps(r, sort_keys=True),
                                            "updated_ms": now} for r in rows], ["group_key"])
        if deleted:
            with self.engine.begin() as conn:
                conn.execute(delete(notification_groups).where(notification_groups.c.group_key.in_(list(deleted))))

    def group_target(self, episode: str, notifier: str) -> tuple[str, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(group_messages.c.channel, group_messages.c.message_ts).where(
                group_messages.c.episode == episode, group_messages.c.notifier == notifier)).first()
        return (row[0], row[1]) if row else None

    def save_group_target(self, episode: str, notifier: str, where: tuple[str, str]) -> None:
        self._upsert(group_messages, [{"episode": episode, "notifier": notifier, "channel": where[0],
                                       "message_ts": where[1], "updated_ms": int(time.time() * 1000)}],
                     ["episode", "notifier"])

    # ---- silences --------------------------------------------------------------------------------
    @staticmethod
    def _silence(r: Any) -> Silence:
        return Silence(r.id, tuple(Matcher.from_api(m) for m in json.loads(r.matchers)), r.starts_at, r.ends_at,
                       r.created_by, r.comment, r.created_at)

    def add_silence(self, s: Silence) -> None:
        self._upsert(silences, [{"id": s.id, "matchers": json.dumps([m.to_api() for m in s.matchers]),
                                 "starts_at": s.starts_at_ms, "ends_at": s.ends_at_ms, "created_by": s.created_by,
                                 "comment": s.comment, "created_at": s.created_at_ms}], ["id"])

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
                conn.execute(silences.update().where(silences.c.id == silence_id)
                             .values(ends_at=max(now_ms, s.starts_at_ms)))
        return self.get_silence(silence_id)

    def active_silences(self, now_ms: int) -> list[Silence]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(silences).where(silences.c.starts_at <= now_ms, silences.c.ends_at > now_ms))
            return [self._silence(r) for r in rows]
