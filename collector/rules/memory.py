"""In-memory data view and alert state, for backtests and tests: the engine runs unchanged on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Point:
    labels: dict[str, str]
    ts: int
    value: float


class MemoryView:
    """The newest sample of every series, fed sample by sample in event time."""

    def __init__(self) -> None:
        self._latest: dict[tuple, Point] = {}

    def observe(self, labels: Mapping[str, str], ts: int, value: float) -> None:
        key = tuple(sorted(labels.items()))
        cur = self._latest.get(key)
        if cur is None or ts >= cur.ts:
            self._latest[key] = Point(dict(labels), ts, value)

    def latest(self, metric: str | None = None) -> list[Point]:
        return [p for p in self._latest.values() if metric is None or p.labels.get("__name__") == metric]


class MemoryState:
    def __init__(self) -> None:
        self.alerts: dict[str, dict[str, Any]] = {}
        self.memory: dict[tuple[str, int], float] = {}
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

    def record_notification(self, **row: Any) -> None:
        self.sent.append(row)

    def notification_target(self, alert_id: str, notifier: str) -> tuple[str, str] | None:
        for row in reversed(self.sent):
            if row["alert_id"] == alert_id and row["notifier"] == notifier and row["state"] == "firing" \
                    and row.get("message_ts"):
                return row["channel"], row["message_ts"]
        return None
