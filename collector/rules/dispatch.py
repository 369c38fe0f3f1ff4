"""From alerts to notifications, as Alertmanager does it: silences, inhibition, grouping and timing.

* A **silence** mutes every alert its matchers match between ``starts_at`` and ``ends_at``.
* An **inhibit rule** mutes a target alert while a firing source alert shares the ``equal`` labels (they must
  be present on the source: a node-level alert without ``uuid`` does not mute every GPU). An alert that
  matches a rule's source is never muted by that rule, so two lost-GPU alerts do not mute each other.
* **Groups**: alerts with the same ``group_by`` labels make one notification (one Slack message). A new
  group waits ``group_wait``; changes are sent at most every ``group_interval``; an unchanged firing group
  is sent again after ``repeat_interval``; when all its alerts resolve, a resolved notification closes it.
  Unlike Alertmanager, an alert more severe than any the group has sent is sent at once, not after
  ``group_interval``: a critical XID on a GPU that is already warm must not wait five minutes.

Everything runs in event time (``now_ms`` is passed in), so backtests take the same path as live.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpufleet.collector.rules.model import SEVERITY_RANK, InhibitRule, Route
from gpufleet.core.labels import Matcher, MatcherDoc, regex_fullmatch

if TYPE_CHECKING:
    from gpufleet.collector.rules.contract import AlertState

# Where a message landed, as its notifier names it: (Slack channel, message ts), ("grafana", annotation id).
Target = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Notification:
    """One alert as a notification tells it."""

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
        where = " ".join(
            f"{k}={self.labels[k]}" for k in ("cluster", "node", "gpu", "uuid", "pod") if k in self.labels
        )
        return f"[{head}] {self.rule}: {self.annotations.get('summary', '')} ({where})"


@dataclass(frozen=True)
class GroupNotification:
    """One message about one group of alerts: every alert firing in it now, and those that just resolved."""

    key: str
    episode: str  # the group's key and start: a later outage of the same GPU is a new message
    labels: dict[str, str]
    state: str  # firing while any alert in the group fires, then resolved
    firing: tuple[Notification, ...]
    resolved: tuple[Notification, ...]
    new: tuple[str, ...]  # alert ids not in the group's previous notification
    at_ms: int
    repeat: bool = False
    escalated: bool = False  # an alert more severe than any sent before in this group
    previous: Target | None = None  # where the notifier's earlier message about this episode landed

    @property
    def severity(self) -> str:
        alerts = self.firing or self.resolved
        return max((a.severity for a in alerts), key=lambda s: SEVERITY_RANK.get(s, 0))

    @property
    def changes(self) -> list[Notification]:
        """The alerts this notification tells news of (newly firing, newly resolved)."""
        return [a for a in self.firing if a.alert_id in self.new] + list(self.resolved)

    @property
    def text(self) -> str:
        alerts = list(self.firing) or list(self.resolved)
        if len(alerts) == 1:
            return alerts[0].text
        head = "RESOLVED" if self.state == "resolved" else self.severity.upper()
        where = " ".join(f"{k}={v}" for k, v in self.labels.items())
        names = ", ".join(sorted({a.rule for a in alerts}))
        return f"[{head}] {len(alerts)} alerts: {names} ({where})"


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at_ms: int
    ends_at_ms: int
    created_by: str
    comment: str
    created_at_ms: int = 0
    # Why a stored silence mutes nothing: its matchers are ones this version refuses (a regex RE2 cannot run,
    # or one over the length limit). ``matchers`` is then empty and ``stored`` holds them as they were stored.
    disabled: str = ""
    stored: tuple[MatcherDoc, ...] = ()

    def active(self, now_ms: int) -> bool:
        return not self.disabled and self.starts_at_ms <= now_ms < self.ends_at_ms

    def matches(self, labels: dict[str, str]) -> bool:
        return not self.disabled and all(m.matches(labels) for m in self.matchers)

    def pins(self, label: str, value: str) -> bool:
        """Whether every alert this silence can mute has ``label="value"``: one of its matchers says so (for a
        disabled silence, one of its stored matchers: its cluster's tokens may still see and expire it)."""
        if self.disabled:
            return any(
                isinstance(d, dict)  # as stored: it may be anything
                and (d.get("name"), d.get("value"), d.get("isRegex", False), d.get("isEqual", True))
                == (label, value, False, True)
                for d in self.stored
            )
        return any(m.pins(label, value) for m in self.matchers)

    def state(self, now_ms: int) -> str:
        if self.disabled and now_ms < self.ends_at_ms:
            return "disabled"
        return "active" if self.active(now_ms) else ("pending" if now_ms < self.starts_at_ms else "expired")

    def to_api(self, now_ms: int | None = None) -> dict[str, Any]:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        status: dict[str, str] = {"state": self.state(now_ms)}
        if self.disabled:
            status["reason"] = self.disabled
        return {
            "id": self.id,
            "matchers": list(self.stored) if self.disabled else [m.to_api() for m in self.matchers],
            "startsAt": self.starts_at_ms / 1000,
            "endsAt": self.ends_at_ms / 1000,
            "createdBy": self.created_by,
            "comment": self.comment,
            "status": status,
        }

    @staticmethod
    def new(
        matchers: Sequence[Matcher],
        starts_at_ms: int,
        ends_at_ms: int,
        created_by: str,
        comment: str,
        now_ms: int,
    ) -> Silence:
        if not matchers:
            raise ValueError("a silence needs at least one matcher, e.g. alertname=GpuTemperatureHigh")
        if not created_by.strip():
            raise ValueError("a silence needs an author (createdBy / --author)")
        if not comment.strip():
            raise ValueError("a silence needs a comment saying why (comment / --comment)")
        if ends_at_ms <= starts_at_ms:
            raise ValueError("a silence must end after it starts")
        return Silence(
            str(uuidlib.uuid4()), tuple(matchers), starts_at_ms, ends_at_ms, created_by, comment, now_ms
        )


def _rx(labels: dict[str, str], matchers: dict[str, str]) -> bool:
    return all(regex_fullmatch(rx, labels.get(k, "")) for k, rx in matchers.items())


@dataclass
class _Group:
    key: str
    labels: dict[str, str]
    created_ms: int
    last_flush_ms: int | None = None
    sent: dict[str, str] = field(default_factory=dict)  # alert id -> severity, as last notified firing
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)  # alerts to tell as resolved
    max_severity: str = "info"

    @property
    def episode(self) -> str:
        return f"{self.key}@{self.created_ms}"

    def to_row(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "labels": self.labels,
            "created_ms": self.created_ms,
            "last_flush_ms": self.last_flush_ms,
            "sent": self.sent,
            "resolved": self.resolved,
            "max_severity": self.max_severity,
        }

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> _Group:
        return cls(
            r["key"],
            dict(r["labels"]),
            r["created_ms"],
            r.get("last_flush_ms"),
            dict(r.get("sent") or {}),
            dict(r.get("resolved") or {}),
            r.get("max_severity") or "info",
        )


def _notification(a: dict[str, Any], state: str, now_ms: int) -> Notification:
    return Notification(
        a["id"],
        a["rule"],
        state,
        a["labels"].get("severity", "warning"),
        dict(a["labels"]),
        dict(a["annotations"]),
        a.get("value"),
        a["active_since"],
        now_ms,
    )


class Dispatcher:
    def __init__(self, route: Route, inhibit_rules: list[InhibitRule], state: AlertState) -> None:
        self.route = route
        self.inhibit_rules = inhibit_rules
        self.state = state
        self.groups: dict[str, _Group] = {}
        self.reload()
        self.muted: dict[str, str] = {}  # alert id -> why (silence id / inhibiting alert)

    def reload(self) -> None:
        """Read the groups (what each told, and where its message landed) back from the store: a replica that
        takes over continues them instead of paging again."""
        self.groups = {r["key"]: _Group.from_row(r) for r in self.state.load_groups()}

    def group_key(self, labels: dict[str, str]) -> tuple[str, dict[str, str]]:
        gl = {k: labels[k] for k in self.route.group_by if labels.get(k)}
        return json.dumps(sorted(gl.items()), separators=(",", ":")), gl

    def _sources(self, firing: list[dict[str, Any]]) -> list[dict[tuple[str, ...], list[dict[str, Any]]]]:
        """Per inhibit rule: the firing alerts that can inhibit, by their values of the rule's ``equal``
        labels (all present), in firing order. One pass over the firing alerts instead of one per alert."""
        out: list[dict[tuple[str, ...], list[dict[str, Any]]]] = []
        for rule in self.inhibit_rules:
            by_equal: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for src in firing:
                sl = src["labels"]
                key = tuple(sl.get(e) or "" for e in rule.equal)
                if all(key) and _rx(sl, rule.source):
                    by_equal.setdefault(key, []).append(src)
            out.append(by_equal)
        return out

    def _mute_reason(
        self,
        a: dict[str, Any],
        sources: list[dict[tuple[str, ...], list[dict[str, Any]]]],
        silences: Sequence[Silence],
    ) -> str | None:
        labels = a["labels"]
        for s in silences:
            if s.matches(labels):
                return f"silence {s.id}"
        for rule, by_equal in zip(self.inhibit_rules, sources, strict=True):
            candidates = by_equal.get(tuple(labels.get(e) or "" for e in rule.equal))
            if not candidates or not _rx(labels, rule.target) or _rx(labels, rule.source):
                continue
            for src in candidates:
                if src["id"] != a["id"]:
                    sl = src["labels"]
                    return f"inhibited by {src['rule']} ({', '.join(f'{e}={sl[e]}' for e in rule.equal)})"
        return None

    def dispatch(
        self,
        now_ms: int,
        alerts: dict[str, dict[str, Any]],
        resolved: list[tuple[dict[str, Any], bool]],
        silences: Sequence[Silence],
    ) -> list[GroupNotification]:
        firing = [a for a in alerts.values() if a["state"] == "firing"]
        active_silences = [s for s in silences if s.active(now_ms)]
        self.muted = {}
        current: dict[str, list[dict[str, Any]]] = {}
        sources = self._sources(firing)
        for a in firing:
            why = self._mute_reason(a, sources, active_silences)
            if why:
                self.muted[a["id"]] = why
                continue
            key, gl = self.group_key(a["labels"])
            current.setdefault(key, []).append(a)
            if key not in self.groups:
                self.groups[key] = _Group(key, gl, now_ms)
        touched: set[str] = set()
        for a, send_resolved in resolved:
            key, _ = self.group_key(a["labels"])
            g = self.groups.get(key)
            if g is None or a["id"] not in g.sent:
                continue
            del g.sent[a["id"]]
            if send_resolved:
                g.resolved[a["id"]] = dict(a)
            touched.add(key)
        out: list[GroupNotification] = []
        for key, g in list(self.groups.items()):
            now_firing = sorted(current.get(key, []), key=lambda a: (a["active_since"], a["rule"], a["id"]))
            new = [a for a in now_firing if a["id"] not in g.sent]
            escalated = any(
                SEVERITY_RANK[a["labels"].get("severity", "info")] > SEVERITY_RANK[g.max_severity]
                for a in new
            )
            repeat = False
            if g.last_flush_ms is None:
                due = bool(now_firing) and now_ms >= g.created_ms + self.route.group_wait_s * 1000
            else:
                since = now_ms - g.last_flush_ms
                changed = bool(new or g.resolved)
                due = changed and (escalated or since >= self.route.group_interval_s * 1000)
                if not due and now_firing and not changed and since >= self.route.repeat_interval_s * 1000:
                    due = repeat = True
            if not due:
                if not now_firing and not g.sent and not g.resolved:
                    del self.groups[key]  # nothing was or will be told about it
                    touched.add(key)
                continue
            fired = tuple(_notification(a, "firing", now_ms) for a in now_firing)
            gone = tuple(_notification(a, "resolved", now_ms) for a in g.resolved.values())
            if not fired and not gone:
                continue
            out.append(
                GroupNotification(
                    key,
                    g.episode,
                    dict(g.labels),
                    "firing" if fired else "resolved",
                    fired,
                    gone,
                    tuple(a["id"] for a in new) + tuple(n.alert_id for n in gone),
                    now_ms,
                    repeat=repeat,
                    escalated=escalated and g.last_flush_ms is not None,
                )
            )
            g.sent.update({a["id"]: a["labels"].get("severity", "info") for a in now_firing})
            g.resolved = {}
            g.last_flush_ms = now_ms
            for a in now_firing:
                sev = a["labels"].get("severity", "info")
                if SEVERITY_RANK.get(sev, 0) > SEVERITY_RANK[g.max_severity]:
                    g.max_severity = sev
            touched.add(key)
            if not fired and not g.sent:
                del self.groups[key]
        if touched:
            self.state.save_groups(
                [self.groups[k].to_row() for k in touched if k in self.groups],
                [k for k in touched if k not in self.groups],
            )
        return out
