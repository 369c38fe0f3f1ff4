"""event: a counter that went up (an XID, a retired page) fires at once, optionally escalating when one GPU
repeats it across distinct values of a label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.kinds.base import (
    Data,
    Evaluation,
    Points,
    Verdict,
    YamlRule,
    alert_id,
    fresh,
    parse_duration,
)

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule

SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class Escalation:
    """Raise an event rule's severity when one GPU repeats it across ``min`` distinct ``across`` values."""

    across: str
    min: int
    within_s: float
    severity: str


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    keys: ClassVar[frozenset[str]] = frozenset({"xid_set", "escalate"})
    instant: ClassVar[bool] = True

    escalate: Escalation | None = None

    @classmethod
    def parse(cls, y: YamlRule) -> Event:
        if "escalate" not in y:
            return cls()
        doc = y.get("escalate")
        e = {k: v for k, v in doc.items() if k != "__line__"} if isinstance(doc, dict) else {}
        try:
            esc = Escalation(
                str(e["across"]),
                int(e.get("min", 2)),
                parse_duration(e.get("within", "24h")),
                str(e.get("severity", "warning")),
            )
            if esc.severity not in SEVERITIES or esc.min < 2:
                raise ValueError(f"severity must be one of {SEVERITIES} and min at least 2")
        except (KeyError, ValueError, TypeError) as exc:
            y.bad(f"'escalate' needs across (a label), min (>= 2), within (a duration), severity: {exc}")
            return cls()
        return cls(esc)

    def metrics(self) -> list[str]:
        return []

    def history_s(self) -> float:
        return 0.0

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        for p in fresh(points, now_ms):
            # the counter went up since we last looked (a first sight with a non-zero value counts: an agent
            # exports an XID counter only once one has happened)
            key = (rule.name, ev.cache.series_fp(p.labels))
            prev = ev.memory.get(key)
            if prev != p.value:
                ev.memory[key] = ev.memory_changed[key] = p.value
            increased = p.value > 0 if prev is None else (p.value > prev or (p.value < prev and p.value > 0))
            if not increased:
                continue
            severity = None
            esc = self.escalate
            if esc is not None:
                skey = (rule.name, p.labels.get("uuid", ""))
                history = [h for h in ev.rule_state.get(skey, []) if h[0] > now_ms - esc.within_s * 1000]
                history.append([now_ms, p.labels.get(esc.across, "")])
                ev.rule_state[skey] = ev.rule_state_changed[skey] = history
                if len({h[1] for h in history if h[1]}) >= esc.min:
                    severity = esc.severity
            labels = ev.labels(rule, p.labels, severity)
            v.active[alert_id(rule.name, labels)] = (labels, p.value)
        return v

    def promql(self, rule: Rule, sel: str) -> tuple[str | None, str | None]:
        # increase() misses a counter's first appearance; the second arm catches a series born non-zero.
        expr = f"increase({sel}[5m]) > 0 or ({sel} > 0 unless {sel} offset 5m)"
        return expr, "escalation is not exported: the base severity is" if self.escalate else None
