"""The rule engine: pending -> firing -> resolved, in event time, with state kept in the store.

``tick(now_ms)`` evaluates every rule against the newest data, moves alerts between states, hands the
alerts to the dispatcher (grouping, inhibition, silences) and the resulting group notifications to the
notifiers. The same engine runs live (on the collector's schedule) and in backtests (on a recorded
trace), since time is always passed in and nothing here reads a clock.

An alert resolves only when fresh data says its condition no longer holds: a GPU whose data stops does
not resolve its alerts (the stale rules say "no data" instead).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from gpufleet.collector.notify.queue import SendQueue
from gpufleet.collector.rules.anomaly import Ewma, RobustZ
from gpufleet.collector.rules.contract import AlertState, Delivery, LatestPoint, Notifier, View
from gpufleet.collector.rules.dispatch import Dispatcher, GroupNotification, Notification
from gpufleet.collector.rules.kinds.base import LOOKBACK_MS, Data, LabelCache, Verdict, alert_id
from gpufleet.collector.rules.model import InhibitRule, Route, Rule, RulePack, render
from gpufleet.core.labels import regex_fullmatch

log = logging.getLogger(__name__)

HISTORY_POINTS = 120

__all__ = ["Delivery", "Engine", "GroupNotification", "Notification", "Notifier", "View", "alert_id"]


class Engine:
    def __init__(
        self,
        rules: Sequence[Rule] | RulePack,
        view: View,
        state: AlertState,
        notifiers: Sequence[Notifier],
        *,
        route: Route | None = None,
        inhibit_rules: Sequence[InhibitRule] | None = None,
        queue: SendQueue | None = None,
    ) -> None:
        if isinstance(rules, RulePack):
            route = route or rules.route
            inhibit_rules = rules.inhibit_rules if inhibit_rules is None else inhibit_rules
            rules = rules.rules
        self.rules = list(rules)
        self.view = view
        self.state = state
        self.notifiers = list(notifiers)
        # Inline unless given: backtests and rule tests see every notification sent when tick() returns.
        self.queue = queue or SendQueue(threaded=False)
        self.cache = LabelCache()
        self.alerts: dict[str, dict[str, Any]] = {a["id"]: a for a in state.load_alerts()}
        self.memory: dict[tuple[str, int], float] = state.load_rule_memory()
        self.rule_state: dict[tuple[str, str], Any] = state.load_rule_state()
        self.dispatcher = Dispatcher(route or Route(), list(inhibit_rules or []), state)
        self._history: dict[int, deque[tuple[int, float]]] = {}
        self._history_keep_ms = {m: 0 for r in self.rules for m in r.metrics()}
        for r in self.rules:
            keep = int(r.spec.history_s() * 1000)
            self._history_keep_ms[r.metric] = max(self._history_keep_ms[r.metric], keep)
        # what the rule kinds keep between ticks (gpufleet.collector.rules.kinds.base.Evaluation)
        self.last_ts: dict[tuple[str, int], int] = {}
        self.detectors: dict[tuple[str, int], Ewma | RobustZ] = {}
        self.anomalous: set[tuple[str, int]] = set()
        self.memory_changed: dict[tuple[str, int], float] = {}
        self.rule_state_changed: dict[tuple[str, str], Any] = {}
        self.evaluations = 0
        self._published: list[dict[str, Any]] = []
        self._publish()

    def reload(self) -> None:
        """Read alert state and rule memory back from the store: a replica that takes over evaluation
        continues where the previous leader stopped (and does not re-send what it already sent)."""
        self.alerts = {a["id"]: a for a in self.state.load_alerts()}
        self.memory = self.state.load_rule_memory()
        self.rule_state = self.state.load_rule_state()
        self.dispatcher.reload()
        self._publish()

    @property
    def sent(self) -> int:
        """Notifications delivered since start."""
        return self.queue.sent

    @property
    def send_failures(self) -> int:
        """Notifications a notifier refused for good (after any retries) since start."""
        return self.queue.failed

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to ``timeout``), then stop the send queue."""
        self.queue.close(timeout)

    # ---- the tick --------------------------------------------------------------------------------
    def tick(self, now_ms: int) -> list[GroupNotification]:
        changed: dict[str, dict[str, Any]] = {}
        self.memory_changed, self.rule_state_changed = {}, {}
        data: dict[str, list[LatestPoint]] = {}
        for metric, keep_ms in self._history_keep_ms.items():
            data[metric] = list(self.view.latest(metric))
            if keep_ms:
                self._remember(data[metric], now_ms, keep_ms)
        resolved: list[tuple[dict[str, Any], bool]] = []
        for rule in self.rules:
            try:
                verdict = self._evaluate(rule, data, now_ms)
                resolved += self._advance(rule, verdict, now_ms, changed)
            except Exception:
                log.exception(
                    "rule %s (%s) failed to evaluate; the other rules go on", rule.name, rule.source
                )
        self.state.save_alerts(list(changed.values()))
        self.state.save_rule_memory(self.memory_changed, now_ms)
        if self.rule_state_changed:
            self.state.save_rule_state(self.rule_state_changed, now_ms)
        for a in [a for a in changed.values() if a["state"] == "resolved"]:
            self.alerts.pop(a["id"], None)
        self.evaluations += 1
        out = self.dispatcher.dispatch(now_ms, self.alerts, resolved, self.state.active_silences(now_ms))
        self._publish()
        for g in out:
            self._notify(g)
        return out

    def _remember(self, points: list[LatestPoint], now_ms: int, keep_ms: int) -> None:
        # At most about HISTORY_POINTS points a window per series (plus the newest), however often the
        # engine ticks: memory stays bounded by the number of series, not by the evaluation rate.
        spacing = keep_ms // HISTORY_POINTS
        for p in points:
            fp = self.cache.series_fp(p.labels)
            h = self._history.get(fp)
            if h is None:
                h = self._history[fp] = deque()
            if not h or p.ts > h[-1][0]:
                if len(h) >= 2 and p.ts - h[-2][0] < spacing:
                    h[-1] = (p.ts, p.value)  # too close to the one before: the newest replaces the last
                else:
                    h.append((p.ts, p.value))
            while h and h[0][0] < now_ms - keep_ms:
                h.popleft()

    def alert(self, rule: Rule, series_labels: dict[str, str]) -> tuple[dict[str, str], str]:
        """The alert's labels and id for a series (cached while the view returns the same labels object)."""

        def make() -> tuple[dict[str, str], str]:
            labels = self.labels(rule, series_labels)
            return labels, alert_id(rule.name, labels)

        return self.cache.get(rule.name, series_labels, make)

    def labels(
        self, rule: Rule, series_labels: Mapping[str, str], severity: str | None = None
    ) -> dict[str, str]:
        labels = {k: v for k, v in series_labels.items() if k != "__name__"}
        labels.update(rule.labels)
        labels["alertname"] = rule.name
        labels["severity"] = severity or rule.severity
        return labels

    # ---- what the rule kinds use ------------------------------------------------------------------
    def _evaluate(self, rule: Rule, data: Data, now_ms: int) -> Verdict:
        points = [
            p
            for p in data[rule.metric]
            if not rule.matchers
            or self.cache.get((rule.name, "match"), p.labels, partial(rule.matches, p.labels))
        ]
        return rule.spec.evaluate(rule, points, data, now_ms, self)

    def history(self, labels: dict[str, str]) -> deque[tuple[int, float]] | None:
        return self._history.get(self.cache.series_fp(labels))

    def rate(self, labels: dict[str, str], window_s: float, now_ms: int) -> float | None:
        """Per-second increase of a counter over the window, counter resets handled as Prometheus does."""
        h = self._history.get(self.cache.series_fp(labels))
        if not h:
            return None
        pts = [(t, v) for t, v in h if t >= now_ms - window_s * 1000]
        if len(pts) < 2 or pts[-1][0] == pts[0][0]:
            return None
        inc = 0.0
        for (_, a), (_, b) in zip(pts, pts[1:], strict=False):
            inc += b - a if b >= a else b
        return inc / ((pts[-1][0] - pts[0][0]) / 1000)

    def joined(
        self,
        data: Data,
        metric: str,
        on: tuple[str, ...],
        now_ms: int,
        matchers: Mapping[str, str] | None = None,
    ) -> dict[tuple[str, ...], float]:
        out = {}
        for p in data.get(metric, []):
            if p.ts <= now_ms - LOOKBACK_MS:
                continue
            if matchers and not all(regex_fullmatch(rx, p.labels.get(k, "")) for k, rx in matchers.items()):
                continue
            out[self.cache.key(p.labels, on)] = p.value
        return out

    # ---- state machine ---------------------------------------------------------------------------
    def _advance(
        self, rule: Rule, verdict: Verdict, now_ms: int, changed: dict[str, dict[str, Any]]
    ) -> list[tuple[dict[str, Any], bool]]:
        resolved = []
        for aid, (labels, value) in verdict.active.items():
            a = self.alerts.get(aid)
            if a is None:
                a = self.alerts[aid] = {
                    "id": aid,
                    "rule": rule.name,
                    "state": "pending",
                    "labels": labels,
                    "annotations": {},
                    "value": value,
                    "active_since": now_ms,
                    "last_true": now_ms,
                    "fired_at": None,
                    "resolved_at": None,
                    "updated_at": now_ms,
                }
            a.update(value=value, last_true=now_ms, updated_at=now_ms)
            a["annotations"] = {k: render(t, labels, value) for k, t in rule.annotations.items()}
            if a["state"] == "pending" and (
                rule.spec.instant or now_ms - a["active_since"] >= rule.for_s * 1000
            ):
                a.update(state="firing", fired_at=now_ms)
            changed[aid] = a
        keep_ms = rule.keep_firing_s * 1000
        for aid, a in list(self.alerts.items()):
            if a["rule"] != rule.name or aid in verdict.active:
                continue
            # Only fresh data that says "fine" resolves; silence (stale data) leaves an alert as it is.
            if not rule.spec.instant and aid not in verdict.seen:
                continue
            if a["state"] == "pending":
                a.update(state="resolved", resolved_at=now_ms, updated_at=now_ms)
                changed[aid] = a
            elif a["state"] == "firing" and now_ms - a["last_true"] >= keep_ms:
                a.update(state="resolved", resolved_at=now_ms, updated_at=now_ms)
                changed[aid] = a
                resolved.append((a, rule.send_resolved))
        return resolved

    # ---- notifying -------------------------------------------------------------------------------
    def _notify(self, g: GroupNotification) -> None:
        what = f"{g.state} notification for {g.text[:80]!r}"
        for notifier in self.notifiers:
            self.queue.submit(
                notifier.name,
                what,
                partial(self._attempt, notifier, g),
                partial(self._delivered, notifier, g),
            )

    def _attempt(self, notifier: Notifier, g: GroupNotification) -> Delivery:
        # Looked up when the attempt runs, not when queued: the post that creates the message may still
        # have been ahead of this edit in the notifier's lane.
        return notifier.send(replace(g, previous=self.state.group_target(g.episode, notifier.name)))

    def _delivered(self, notifier: Notifier, g: GroupNotification, delivery: Delivery) -> None:
        if not delivery.ok:
            return
        where = delivery.target
        if where is not None:
            self.state.save_group_target(g.episode, notifier.name, where)
        for n in g.changes:
            self.state.record_notification(
                alert_id=n.alert_id,
                notifier=notifier.name,
                state=n.state,
                channel=where[0] if where else None,
                message_ts=where[1] if where else None,
                sent_at=g.at_ms,
                text=n.text,
            )

    def active_alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts as of the end of the last tick. Readers (the API, the fleet page) run on
        other threads: they get the list published once silences and inhibitions were applied, never an
        alert that is already firing but not yet matched against the silences."""
        return self._published

    def _publish(self) -> None:
        out = []
        for a in self.alerts.values():
            if a["state"] in ("pending", "firing"):
                out.append({**a, "muted_by": self.dispatcher.muted.get(a["id"])})
        self._published = sorted(
            out, key=lambda a: (a["state"] != "firing", a["labels"].get("severity", ""), a["active_since"])
        )
