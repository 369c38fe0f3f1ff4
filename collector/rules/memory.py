"""In-memory data view and alert state, for backtests and tests: the engine runs unchanged on them."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.collector.rules.dispatch import Silence, Target


@dataclass(frozen=True, slots=True)
class Point:
    labels: dict[str, str]
    ts: int
    value: float


class MemoryView:
    """The newest sample of every series, fed sample by sample in event time."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[tuple, Point]] = {}

    def observe(self, labels: Mapping[str, str], ts: int, value: float) -> None:
        per = self._latest.setdefault(labels.get("__name__", ""), {})
        key = tuple(sorted(labels.items()))
        cur = per.get(key)
        if cur is None:
            per[key] = Point(dict(labels), ts, value)
        elif ts >= cur.ts:
            per[key] = Point(
                cur.labels, ts, value
            )  # the same labels object: ids computed from it stay cached

    def latest(self, metric: str | None = None) -> list[Point]:
        if metric is not None:
            return list(self._latest.get(metric, {}).values())
        return [p for per in self._latest.values() for p in per.values()]


class MemoryState:
    """The :class:`~gpufleet.collector.rules.contract.AlertState` in memory (backtests, rule tests)."""

    def __init__(self, silences: Sequence[Silence] = ()) -> None:
        self.alerts: dict[str, dict[str, Any]] = {}
        self.memory: dict[tuple[str, int], float] = {}
        self.rule_state: dict[tuple[str, str], Any] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.targets: dict[tuple[str, str], Target] = {}
        self.silences: dict[str, Silence] = {s.id: s for s in silences}
        self.sent: list[dict[str, Any]] = []

    def load_alerts(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self.alerts.values() if a["state"] in ("pending", "firing")]

    def save_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        for a in alerts:
            self.alerts[a["id"]] = dict(a)

    def load_rule_memory(self) -> dict[tuple[str, int], float]:
        return dict(self.memory)

    def save_rule_memory(self, items: Mapping[tuple[str, int], float], now_ms: int) -> None:
        self.memory.update(items)

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
        self.sent.append(
            {
                "alert_id": alert_id,
                "notifier": notifier,
                "state": state,
                "channel": channel,
                "message_ts": message_ts,
                "sent_at": sent_at,
                "text": text,
            }
        )

    def load_rule_state(self) -> dict[tuple[str, str], Any]:
        return copy.deepcopy(self.rule_state)

    def save_rule_state(self, items: Mapping[tuple[str, str], Any], now_ms: int) -> None:
        self.rule_state.update(copy.deepcopy(dict(items)))

    def load_groups(self) -> list[dict[str, Any]]:
        return copy.deepcopy(list(self.groups.values()))

    def save_groups(self, rows: Sequence[Mapping[str, Any]], deleted: Sequence[str]) -> None:
        for r in rows:
            self.groups[r["key"]] = copy.deepcopy(dict(r))
        for k in deleted:
            self.groups.pop(k, None)

    def group_target(self, episode: str, notifier: str) -> Target | None:
        return self.targets.get((episode, notifier))

    def save_group_target(self, episode: str, notifier: str, where: Target) -> None:
        self.targets[(episode, notifier)] = (where[0], where[1])

    def add_silence(self, s: Silence) -> None:
        self.silences[s.id] = s

    def active_silences(self, now_ms: int) -> list[Silence]:
        return [s for s in self.silences.values() if s.active(now_ms)]
