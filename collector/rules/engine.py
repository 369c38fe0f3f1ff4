"""The rule engine: pending -> firing -> resolved, in event time, with state kept in the store.

``tick(now_ms)`` evaluates every rule against the newest data, moves alerts between states, hands the
alerts to the dispatcher (grouping, inhibition, silences) and the resulting group notifications to the
notifiers. The same engine runs live (on the collector's schedule) and in backtests (on a recorded
trace), since time is always passed in and nothing here reads a clock.

An alert resolves only when fresh data says its condition no longer holds: a GPU whose data stops does
not resolve its alerts (the stale rules say "no data" instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gpufleet.collector.rules.anomaly import Ewma, RobustZ, is_outside, linear_fit, steady_growth
from gpufleet.collector.rules.dispatch import Dispatcher, GroupNotification, Notification
from gpufleet.collector.rules.model import OPS, InhibitRule, Route, Rule, RulePack, render

log = logging.getLogger(__name__)

HISTORY_POINTS = 120
LOOKBACK_MS = 5 * 60 * 1000
EVENT_KEEP_FIRING_S = 300.0

__all__ = ["Engine", "GroupNotification", "Notification", "Notifier", "View", "alert_id"]


class Notifier(Protocol):
    name: str

    def send(self, g: GroupNotification, previous: tuple[str, str] | None) -> tuple[str, str] | None: ...


class View(Protocol):
    def latest(self, metric: str | None = None) -> Sequence[Any]: ...


def alert_id(rule: str, labels: dict[str, str]) -> str:
    raw = json.dumps([rule, sorted(labels.items())], separators=(",", ":")).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _series_fp_of(labels: dict[str, str]) -> int:
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


class _ByIdentity:
    """Results computed from a label dict, kept while the view hands out the same dict object: every tick
    sees the same series again, and hashing their JSON each time was most of a tick's cost."""

    def __init__(self) -> None:
        self._d: dict[tuple[Any, int], tuple[Any, Any]] = {}

    def get(self, tag: Any, labels: dict[str, str], make: Any) -> Any:
        key = (tag, id(labels))
        hit = self._d.get(key)
        if hit is not None and hit[0] is labels:
            return hit[1]
        if len(self._d) > 1_000_000:
            self._d.clear()
        value = make()
        self._d[key] = (labels, value)
        return value


_CACHE = _ByIdentity()


def _series_fp(labels: dict[str, str]) -> int:
    return _CACHE.get(None, labels, lambda: _series_fp_of(labels))


def _key(labels: dict[str, str], names: tuple[str, ...]) -> tuple[str, ...]:
    return _CACHE.get(names, labels, lambda: tuple(labels.get(n, "") for n in names))


@dataclass
class _Verdict:
    """What one rule says now: alerts whose condition holds, and alerts fresh data says are fine."""

    active: dict[str, tuple[dict[str, str], float]]
    seen: set[str]


class Engine:
    def __init__(self, rules: Sequence[Rule] | RulePack, view: View, state: Any, notifiers: Sequence[Notifier],
                 *, route: Route | None = None, inhibit_rules: Sequence[InhibitRule] | None = None) -> None:
        if isinstance(rules, RulePack):
            route = route or rules.route
            inhibit_rules = rules.inhibit_rules if inhibit_rules is None else inhibit_rules
            rules = rules.rules
        self.rules = list(rules)
        self.view = view
        self.state = state
        self.notifiers = list(notifiers)
        self.alerts: dict[str, dict[str, Any]] = {a["id"]: a for a in state.load_alerts()}
        self.memory: dict[tuple[str, int], float] = state.load_rule_memory()
        self.rule_state: dict[tuple[str, str], Any] = state.load_rule_state() if hasattr(state, "load_rule_state") \
            else {}
        self.dispatcher = Dispatcher(route or Route(), list(inhibit_rules or []), state)
        self._history: dict[int, deque[tuple[int, float]]] = {}
        self._history_keep_ms = {m: 0 for r in self.rules for m in r.metrics()}
        for r in self.rules:
            keep = max(r.rate_s, r.window_s if r.kind == "trend" else 0.0) * 1000
            self._history_keep_ms[r.metric] = max(self._history_keep_ms[r.metric], int(keep))
        self._last_ts: dict[int, int] = {}
        self._detectors: dict[tuple[str, int], Any] = {}
        self._anomalous: set[tuple[str, int]] = set()
        self.evaluations = 0
        self.sent = 0
        self.send_failures = 0
        self._published: list[dict[str, Any]] = []
        self._publish()

    def reload(self) -> None:
        """Read alert state and rule memory back from the store: a replica that takes over evaluation
        continues where the previous leader stopped (and does not re-send what it already sent)."""
        self.alerts = {a["id"]: a for a in self.state.load_alerts()}
        self.memory = self.state.load_rule_memory()
        if hasattr(self.state, "load_rule_state"):
            self.rule_state = self.state.load_rule_state()
        if hasattr(self.dispatcher, "reload"):
            self.dispatcher.reload()
        self._publish()

    # ---- the tick --------------------------------------------------------------------------------
    def tick(self, now_ms: int) -> list[GroupNotification]:
        changed: dict[str, dict[str, Any]] = {}
        mem_changed: dict[tuple[str, int], float] = {}
        state_changed: dict[tuple[str, str], Any] = {}
        data: dict[str, list[Any]] = {}
        for metric, keep_ms in self._history_keep_ms.items():
            data[metric] = list(self.view.latest(metric))
            if keep_ms:
                self._remember(data[metric], now_ms, keep_ms)
        resolved: list[tuple[dict[str, Any], bool]] = []
        for rule in self.rules:
            try:
                verdict = self._evaluate(rule, data, now_ms, mem_changed, state_changed)
                resolved += self._advance(rule, verdict, now_ms, changed)
            except Exception:
                log.exception("rule %s (%s) failed to evaluate; the other rules go on", rule.name, rule.source)
        self.state.save_alerts(list(changed.values()))
        self.state.save_rule_memory(mem_changed, now_ms)
        if state_changed and hasattr(self.state, "save_rule_state"):
            self.state.save_rule_state(state_changed, now_ms)
        for a in [a for a in changed.values() if a["state"] == "resolved"]:
            self.alerts.pop(a["id"], None)
        self.evaluations += 1
        silences = self.state.active_silences(now_ms) if hasattr(self.state, "active_silences") else []
        out = self.dispatcher.dispatch(now_ms, self.alerts, resolved, silences)
        self._publish()
        for g in out:
            self._notify(g)
        return out

    def _remember(self, points: list[Any], now_ms: int, keep_ms: int) -> None:
        # At most about HISTORY_POINTS points a window per series (plus the newest), however often the
        # engine ticks: memory stays bounded by the number of series, not by the evaluation rate.
        spacing = keep_ms // HISTORY_POINTS
        for p in points:
            fp = _series_fp(p.labels)
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

    def _alert(self, rule: Rule, series_labels: dict[str, str]) -> tuple[dict[str, str], str]:
        """The alert's labels and id for a series (cached while the view returns the same labels object)."""
        def make() -> tuple[dict[str, str], str]:
            labels = self._labels(rule, series_labels)
            return labels, alert_id(rule.name, labels)

        return _CACHE.get(rule.name, series_labels, make)

    def _labels(self, rule: Rule, series_labels: dict[str, str], severity: str | None = None) -> dict[str, str]:
        labels = {k: v for k, v in series_labels.items() if k != "__name__"}
        labels.update(rule.labels)
        labels["alertname"] = rule.name
        labels["severity"] = severity or rule.severity
        return labels

    # ---- evaluation per kind ---------------------------------------------------------------------
    def _evaluate(self, rule: Rule, data: dict[str, list[Any]], now_ms: int, mem_changed: dict,
                  state_changed: dict) -> _Verdict:
        everything = [p for p in data[rule.metric] if not rule.matchers or
                      _CACHE.get((rule.name, "match"), p.labels, lambda p=p: rule.matches(p.labels))]
        if rule.kind == "stale":
            return self._stale_inventory(rule, everything, now_ms, state_changed) if rule.inventory \
                else self._stale(rule, everything, now_ms)
        fresh = [p for p in everything if p.ts > now_ms - LOOKBACK_MS]
        if rule.kind == "event":
            return self._event(rule, fresh, now_ms, mem_changed, state_changed)
        if rule.kind == "threshold":
            return self._threshold(rule, fresh, data, now_ms)
        if rule.kind == "anomaly":
            return self._anomaly(rule, fresh, now_ms)
        if rule.kind == "peer":
            return self._peer(rule, fresh)
        return self._trend(rule, fresh, data, now_ms)

    def _rate(self, labels: dict[str, str], window_s: float, now_ms: int) -> float | None:
        """Per-second increase of a counter over the window, counter resets handled as Prometheus does."""
        h = self._history.get(_series_fp(labels))
        if not h:
            return None
        pts = [(t, v) for t, v in h if t >= now_ms - window_s * 1000]
        if len(pts) < 2 or pts[-1][0] == pts[0][0]:
            return None
        inc = 0.0
        for (_, a), (_, b) in zip(pts, pts[1:], strict=False):
            inc += b - a if b >= a else b
        return inc / ((pts[-1][0] - pts[0][0]) / 1000)

    def _joined(self, data: dict[str, list[Any]], metric: str, on: tuple[str, ...], now_ms: int,
                matchers: dict[str, str] | None = None) -> dict[tuple[str, ...], float]:
        import re

        out = {}
        for p in data.get(metric, []):
            if p.ts <= now_ms - LOOKBACK_MS:
                continue
            if matchers and not all(re.fullmatch(rx, p.labels.get(k, "")) for k, rx in matchers.items()):
                continue
            out[_key(p.labels, on)] = p.value
        return out

    def _threshold(self, rule: Rule, fresh: list[Any], data: dict, now_ms: int) -> _Verdict:
        v = _Verdict({}, set())
        limits = self._joined(data, rule.compare_metric, rule.on, now_ms) if rule.compare_metric else None
        conds = [(c, self._joined(data, c.metric, rule.on, now_ms, c.matchers)) for c in rule.conditions]
        for p in fresh:
            value = p.value
            if rule.rate_s:
                value = self._rate(p.labels, rule.rate_s, now_ms)
                if value is None:
                    continue
            key = _key(p.labels, rule.on)
            threshold = rule.threshold
            if limits is not None:
                if key not in limits:
                    continue
                threshold = limits[key] + rule.offset
            holds = OPS[rule.op](value, threshold)
            for c, values in conds:
                if key not in values:
                    holds = None  # unknown: neither fires nor resolves
                    break
                holds = holds and OPS[c.op](values[key], c.value)
            if holds is None:
                continue
            labels, aid = self._alert(rule, p.labels)
            v.seen.add(aid)
            if holds:
                v.active[aid] = (labels, value)
        return v

    def _event(self, rule: Rule, fresh: list[Any], now_ms: int, mem_changed: dict, state_changed: dict) -> _Verdict:
        v = _Verdict({}, set())
        for p in fresh:
            # the counter went up since we last looked (a first sight with a non-zero value counts: an agent
            # exports an XID counter only once one has happened)
            key = (rule.name, _series_fp(p.labels))
            prev = self.memory.get(key)
            if prev != p.value:
                self.memory[key] = mem_changed[key] = p.value
            increased = p.value > 0 if prev is None else (p.value > prev or (p.value < prev and p.value > 0))
            if not increased:
                continue
            severity = None
            esc = rule.escalate
            if esc is not None:
                skey = (rule.name, p.labels.get("uuid", ""))
                history = [h for h in self.rule_state.get(skey, []) if h[0] > now_ms - esc.within_s * 1000]
                history.append([now_ms, p.labels.get(esc.across, "")])
                self.rule_state[skey] = state_changed[skey] = history
                if len({h[1] for h in history if h[1]}) >= esc.min:
                    severity = esc.severity
            labels = self._labels(rule, p.labels, severity)
            v.active[alert_id(rule.name, labels)] = (labels, p.value)
        return v

    def _stale(self, rule: Rule, everything: list[Any], now_ms: int) -> _Verdict:
        v = _Verdict({}, set())
        newest: dict[tuple[str, ...], int] = {}
        for p in everything:
            k = _key(p.labels, rule.by)
            newest[k] = max(newest.get(k, 0), p.ts)
        for k, ts in newest.items():
            labels = self._labels(rule, {n: x for n, x in zip(rule.by, k, strict=False) if x})
            aid = alert_id(rule.name, labels)
            if now_ms - ts > rule.after_s * 1000:
                v.active[aid] = (labels, (now_ms - ts) / 1000)
            else:
                v.seen.add(aid)
        return v

    def _stale_inventory(self, rule: Rule, everything: list[Any], now_ms: int, state_changed: dict) -> _Verdict:
        """GPUs a node has reported before and reports no more, while the node itself still reports."""
        v = _Verdict({}, set())
        nodes: dict[tuple[str, ...], dict[str, tuple[int, dict[str, str]]]] = {}
        for p in everything:
            uuid = p.labels.get("uuid")
            if not uuid:
                continue
            per = nodes.setdefault(_key(p.labels, rule.by), {})
            if uuid not in per or p.ts > per[uuid][0]:
                per[uuid] = (p.ts, p.labels)
        for k, per in nodes.items():
            skey = (rule.name, json.dumps(k))
            known: dict[str, str] = dict(self.rule_state.get(skey, {}))
            fresh = {u for u, (ts, _) in per.items() if now_ms - ts <= rule.after_s * 1000}
            if not fresh:
                continue  # the whole node is silent: the node's own stale rule speaks for it
            learned = {u: per[u][1].get("gpu", "") for u in fresh if u not in known}
            if learned:
                known.update(learned)
                self.rule_state[skey] = state_changed[skey] = known
            base = {n: x for n, x in zip(rule.by, k, strict=False) if x}
            for uuid, gpu in known.items():
                labels = self._labels(rule, {**base, "uuid": uuid, **({"gpu": gpu} if gpu else {})})
                aid = alert_id(rule.name, labels)
                if uuid in fresh:
                    v.seen.add(aid)
                else:
                    v.active[aid] = (labels, float(len(fresh)))
        return v

    def _anomaly(self, rule: Rule, fresh: list[Any], now_ms: int) -> _Verdict:
        v = _Verdict({}, set())
        for p in fresh:
            fp = _series_fp(p.labels)
            dkey = (rule.name, fp)
            labels, aid = self._alert(rule, p.labels)
            x = p.value
            if rule.rate_s:
                x = self._rate(p.labels, rule.rate_s, now_ms)
                if x is None:
                    continue
            lkey = hash((rule.name, fp))
            new_sample = self._last_ts.get(lkey) != p.ts
            self._last_ts[lkey] = p.ts
            det = self._detectors.get(dkey)
            if det is None:
                det = self._detectors[dkey] = Ewma(rule.alpha) if rule.method == "ewma" else RobustZ(rule.window)
            if new_sample:
                if det.n < rule.min_samples:
                    det.update(x)
                    continue  # still learning this series' normal
                z = det.score(x)
                if dkey in self._anomalous:
                    if not is_outside(z, rule.z_clear, rule.direction):
                        self._anomalous.discard(dkey)
                elif is_outside(z, rule.z, rule.direction) and abs(det.deviation(x)) >= rule.min_deviation:
                    self._anomalous.add(dkey)
                if dkey not in self._anomalous:
                    det.update(x)  # the baseline learns only from normal samples
            elif det.n < rule.min_samples:
                continue
            v.seen.add(aid)
            if dkey in self._anomalous:
                v.active[aid] = (labels, x)
        return v

    def _peer(self, rule: Rule, fresh: list[Any]) -> _Verdict:
        v = _Verdict({}, set())
        groups: dict[tuple[str, ...], list[Any]] = {}
        for p in fresh:
            k = _key(p.labels, rule.by)
            if all(k):  # a GPU without the peer labels (no job) has no peers
                groups.setdefault(k, []).append(p)
        for members in groups.values():
            if len(members) < rule.min_peers:
                continue
            med = statistics.median(p.value for p in members)
            for p in members:
                labels, aid = self._alert(rule, p.labels)
                v.seen.add(aid)
                if med >= rule.min_median and med > 0 and p.value < rule.below * med:
                    v.active[aid] = (labels, p.value / med)
        return v

    def _trend(self, rule: Rule, fresh: list[Any], data: dict, now_ms: int) -> _Verdict:
        v = _Verdict({}, set())
        limits = self._joined(data, rule.limit_metric or "", rule.on, now_ms)
        for p in fresh:
            h = self._history.get(_series_fp(p.labels))
            limit = limits.get(_key(p.labels, rule.on))
            if not h or limit is None or h[-1][0] - h[0][0] < rule.window_s * 1000 * 0.5:
                continue  # too little history to call a trend
            pts = [((t - now_ms) / 1000, val) for t, val in h]
            slope, intercept = linear_fit(pts)
            labels, aid = self._alert(rule, p.labels)
            v.seen.add(aid)
            if slope > 0 and intercept + slope * rule.horizon_s >= limit and steady_growth(pts):
                v.active[aid] = (labels, max(0.0, (limit - p.value) / slope / 3600))
        return v

    # ---- state machine ---------------------------------------------------------------------------
    def _advance(self, rule: Rule, verdict: _Verdict, now_ms: int, changed: dict) -> list[tuple[dict, bool]]:
        resolved = []
        for aid, (labels, value) in verdict.active.items():
            a = self.alerts.get(aid)
            if a is None:
                a = self.alerts[aid] = {"id": aid, "rule": rule.name, "state": "pending", "labels": labels,
                                        "annotations": {}, "value": value, "active_since": now_ms, "last_true": now_ms,
                                        "fired_at": None, "resolved_at": None, "updated_at": now_ms}
            a.update(value=value, last_true=now_ms, updated_at=now_ms)
            a["annotations"] = {k: render(t, labels, value) for k, t in rule.annotations.items()}
            if a["state"] == "pending" and (rule.kind == "event" or now_ms - a["active_since"] >= rule.for_s * 1000):
                a.update(state="firing", fired_at=now_ms)
            changed[aid] = a
        keep_ms = (rule.keep_firing_for_s or (EVENT_KEEP_FIRING_S if rule.kind == "event" else 0)) * 1000
        for aid, a in list(self.alerts.items()):
            if a["rule"] != rule.name or aid in verdict.active:
                continue
            # Only fresh data that says "fine" resolves; silence (stale data) leaves an alert as it is.
            if rule.kind != "event" and aid not in verdict.seen:
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
        for notifier in self.notifiers:
            previous = self.state.group_target(g.episode, notifier.name) if hasattr(self.state, "group_target") \
                else None
            try:
                where = notifier.send(g, previous)
            except Exception as exc:
                self.send_failures += 1
                log.error("notifier %s failed to send group %s (%s): %s", notifier.name, g.key, g.state, exc)
                continue
            self.sent += 1
            if where and hasattr(self.state, "save_group_target"):
                self.state.save_group_target(g.episode, notifier.name, where)
            for n in g.changes:
                self.state.record_notification(alert_id=n.alert_id, notifier=notifier.name, state=n.state,
                                               channel=where[0] if where else None,
                                               message_ts=where[1] if where else None, sent_at=g.at_ms, text=n.text)

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
        self._published = sorted(out, key=lambda a: (a["state"] != "firing", a["labels"].get("severity", ""),
                                                     a["active_since"]))
