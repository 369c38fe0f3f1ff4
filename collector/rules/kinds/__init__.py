"""Rule kinds, one module each, listed in one table: adding a kind is a module and a row."""

from __future__ import annotations

from gpufleet.collector.rules.kinds.anomaly import Anomaly
from gpufleet.collector.rules.kinds.base import RuleSpec, Verdict, YamlRule
from gpufleet.collector.rules.kinds.event import Escalation, Event
from gpufleet.collector.rules.kinds.peer import Peer
from gpufleet.collector.rules.kinds.stale import Stale
from gpufleet.collector.rules.kinds.threshold import Condition, Threshold
from gpufleet.collector.rules.kinds.trend import Trend

KINDS: dict[str, type[RuleSpec]] = {k.kind: k for k in (Threshold, Event, Stale, Anomaly, Peer, Trend)}

__all__ = [
    "KINDS",
    "Anomaly",
    "Condition",
    "Escalation",
    "Event",
    "Peer",
    "RuleSpec",
    "Stale",
    "Threshold",
    "Trend",
    "Verdict",
    "YamlRule",
]
