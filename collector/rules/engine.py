"""The rule engine: pending -> firing -> resolved, in event time, with state kept in the store.

``tick(now_ms)`` evaluates every rule against the newest data, moves alerts
between states and hands each transition worth telling to the notifiers. The
same engine runs live (on the collector's schedule) and in backtests (on a
recorded trace), since time is always passed in.

A threshold alert resolves only when fresh data says the condition no longer
holds: a GPU whose data stops does not resolve its alerts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from collector.rules.model import OPS, Rule, render

log = logging.getLogger(__name__)

LOOKBACK_MS = 5 * 60 * 1000
EVENT_KEEP_FIRING_S = 300.0


@dataclass(frozen=True, slots=True)
class Notification:
    alert_id: str
    rule: str
    state: str  # firing | resolved
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float | None
    since_ms: int
    at_ms: int

    @property
    def text(self) -> str:
        """The plain-text line: what broke and where."""
        head = "RESOLVED" if self.state == "resolved" else self.severity.upper()
        where = " ".join(f"{k}={self.labels[k]}" for k in ("cluster", "node", "gpu", "uuid", "pod") if k in self.labels)
        return f"[{head}] {self.rule}: {self.annotations.get('summary', '')} ({where})"


class Notifier(Protocol):
    name: str

    def send(self, n: Notification, previous: tuple[str, str] | None) -> tuple[str, str] | None: ...


class View(Protocol):
    def latest(self, metric: str | None = None) -> Sequence[Any]: ...


def alert_id(rule: str, labels: dict[str, str]) -> str:
    raw = json.dumps([rule, sorted(labels.items())], separators=(",", ":")).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _series_fp(labels: dict[str, str]) -> int:
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


class Engine:
    def __init__(self, rules: Sequence[Rule], view: View, state: Any, notifiers: Sequence[Notifier]) -> None:
        self.rules = list(rules)
        self.view = view
        self.state = state
        self.notifiers = list(notifiers)
        self.alerts: dict[str, dict[str, Any]] = {a["id"]: a for a in state.load_alerts()}
        self.memory: dict[tuple[str, int], float] = state.load_rule_memory()
        self.evaluations = 0
        self.sent = 0
        self.send_failures = 0

    def reload(self) -> None:
        """Read alert state and rule memory back from the store: a replica that takes over evaluation
        continues where the previous leader stopped (and does not re-send what it already sent)."""
        self.alerts = {a["id"]: a for a in self.state.load_alerts()}
        self.memory = self.state.load_rule_memory()

    def tick(self, now_ms: int) -> list[Notification]:
        out: list[Notification] = []
        changed: dict[str, dict[str, Any]] = {}
        mem_changed: dict[tuple[str, int], float] = {}
        by_metric: dict[str, list[Any]] = {}
        for rule in self.rules:
            if rule.metric not in by_metric:
                by_metric[rule.metric] = [p for p in self.view.latest(rule.metric) if p.ts > now_ms - LOOKBACK_MS]
            points = [p for p in by_metric[rule.metric] if rule.matches(p.labels)]
            try:
                out += self._eval_rule(rule, points, now_ms, changed, mem_changed)
            except Exception:
                log.exception("rule %s (%s) failed to evaluate; the other rules go on", rule.name, rule.source)
        self.state.save_alerts(list(changed.values()))
        self.state.save_rule_memory(mem_changed, now_ms)
        for a in [a for a in changed.values() if a["state"] == "resolved"]:
            self.alerts.pop(a["id"], None)
        self.evaluations += 1
        for n in out:
            self._notify(n)
        return out

    def _labels(self, rule: Rule, series_labels: dict[str, str]) -> dict[str, str]:
        labels = {k: v for k, v in series_labels.items() if k != "__name__"}
        labels.update(rule.labels)
        labels["alertname"] = rule.name
        labels["severity"] = rule.severity
        return labels

    def _eval_rule(self, rule: Rule, points: list[Any], now_ms: int, changed: dict, mem_changed: dict) -> list[Notification]:
        active: dict[str, tuple[dict[str, str], float]] = {}
        seen: set[str] = set()
        for p in points:
            labels = self._labels(rule, p.labels)
            aid = alert_id(rule.name, labels)
            seen.add(aid)
            if rule.kind == "threshold":
                if OPS[rule.op](p.value, rule.threshold):
                    active[aid] = (labels, p.value)
            else:  # event: the counter went up since we last looked (a first sight with a non-zero value counts)
                key = (rule.name, _series_fp(p.labels))
                prev = self.memory.get(key)
                if prev != p.value:
                    self.memory[key] = mem_changed[key] = p.value
                increased = p.value > 0 if prev is None else (p.value > prev or (p.value < prev and p.value > 0))
                if increased:
                    active[aid] = (labels, p.value)
        out = []
        for aid, (labels, value) in active.items():
            a = self.alerts.get(aid)
            if a is None:
                a = self.alerts[aid] = {"id": aid, "rule": rule.name, "state": "pending", "labels": labels,
                                        "annotations": {}, "value": value, "active_since": now_ms, "last_true": now_ms,
                                        "fired_at": None, "resolved_at": None, "updated_at": now_ms}
            a.update(value=value, last_true=now_ms, updated_at=now_ms)
            a["annotations"] = {k: render(t, labels, value) for k, t in rule.annotations.items()}
            if a["state"] == "pending" and (rule.kind == "event" or now_ms - a["active_since"] >= rule.for_s * 1000):
                a.update(state="firing", fired_at=now_ms)
                out.append(self._notification(a, rule, now_ms))
            changed[aid] = a
        keep_ms = (rule.keep_firing_for_s or (EVENT_KEEP_FIRING_S if rule.kind == "event" else 0)) * 1000
        for aid, a in list(self.alerts.items()):
            if a["rule"] != rule.name or aid in active:
                continue
            # Threshold alerts need fresh data that says "fine" to resolve; stale data leaves them as they are.
            if rule.kind == "threshold" and aid not in seen:
                continue
            if a["state"] == "pending":
                a.update(state="resolved", resolved_at=now_ms, updated_at=now_ms)
                changed[aid] = a
            elif a["state"] == "firing" and now_ms - a["last_true"] >= keep_ms:
                a.update(state="resolved", resolved_at=now_ms, updated_at=now_ms)
                changed[aid] = a
                if rule.send_resolved:
                    out.append(self._notification(a, rule, now_ms))
        return out

    @staticmethod
    def _notification(a: dict[str, Any], rule: Rule, now_ms: int) -> Notification:
        return Notification(a["id"], rule.name, a["state"], rule.severity, dict(a["labels"]), dict(a["annotations"]),
                            a["value"], a["active_since"], now_ms)

    def _notify(self, n: Notification) -> None:
        for notifier in self.notifiers:
            previous = self.state.notification_target(n.alert_id, notifier.name) if n.state == "resolved" else None
            try:
                where = notifier.send(n, previous)
            except Exception as exc:
                self.send_failures += 1
                log.error("notifier %s failed to send %s %s: %s", notifier.name, n.rule, n.state, exc)
                continue
            self.sent += 1
            self.state.record_notification(alert_id=n.alert_id, notifier=notifier.name, state=n.state,
                                           channel=where[0] if where else None, message_ts=where[1] if where else None,
                                           sent_at=n.at_ms, text=n.text)

    def active_alerts(self) -> list[dict[str, Any]]:
        return sorted((a for a in self.alerts.values() if a["state"] in ("pending", "firing")),
                      key=lambda a: (a["state"] != "firing", a["labels"].get("severity", ""), a["active_since"]))
