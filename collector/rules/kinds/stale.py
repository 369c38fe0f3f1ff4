"""stale: a series (or a whole node) whose data stopped says "no data" instead of resolving; with
``inventory``, a GPU a node reported before and reports no more while the node still reports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.kinds.base import (
    Data,
    Evaluation,
    Points,
    Verdict,
    YamlRule,
    alert_id,
    format_duration,
)

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule


@dataclass(frozen=True)
class Stale:
    kind: ClassVar[str] = "stale"
    keys: ClassVar[frozenset[str]] = frozenset({"after", "by", "inventory"})
    instant: ClassVar[bool] = False

    after_s: float = 60.0
    by: tuple[str, ...] = ("cluster", "node", "uuid")
    inventory: bool = False

    @classmethod
    def parse(cls, y: YamlRule) -> Stale:
        spec = cls(
            y.dur("after", 60.0),
            y.labels_list("by", ("cluster", "node", "uuid")),
            bool(y.get("inventory", False)),
        )
        if spec.after_s <= 0:
            y.bad("'after' must be longer than 0s")
        return spec

    def metrics(self) -> list[str]:
        return []

    def history_s(self) -> float:
        return 0.0

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        # every point, old ones included: how old the newest is, is the question
        return (
            self._inventory(rule, points, now_ms, ev)
            if self.inventory
            else self._silent(rule, points, now_ms, ev)
        )

    def _silent(self, rule: Rule, points: Points, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        newest: dict[tuple[str, ...], int] = {}
        for p in points:
            k = ev.cache.key(p.labels, self.by)
            newest[k] = max(newest.get(k, 0), p.ts)
        for k, ts in newest.items():
            labels = ev.labels(rule, {n: x for n, x in zip(self.by, k, strict=False) if x})
            aid = alert_id(rule.name, labels)
            if now_ms - ts > self.after_s * 1000:
                v.active[aid] = (labels, (now_ms - ts) / 1000)
            else:
                v.seen.add(aid)
        return v

    def _inventory(self, rule: Rule, points: Points, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        nodes: dict[tuple[str, ...], dict[str, tuple[int, dict[str, str]]]] = {}
        for p in points:
            uuid = p.labels.get("uuid")
            if not uuid:
                continue
            per = nodes.setdefault(ev.cache.key(p.labels, self.by), {})
            if uuid not in per or p.ts > per[uuid][0]:
                per[uuid] = (p.ts, p.labels)
        for k, per in nodes.items():
            skey = (rule.name, json.dumps(k))
            known: dict[str, str] = dict(ev.rule_state.get(skey, {}))
            fresh = {u for u, (ts, _) in per.items() if now_ms - ts <= self.after_s * 1000}
            if not fresh:
                continue  # the whole node is silent: the node's own stale rule speaks for it
            learned = {u: per[u][1].get("gpu", "") for u in fresh if u not in known}
            if learned:
                known.update(learned)
                ev.rule_state[skey] = ev.rule_state_changed[skey] = known
            base = {n: x for n, x in zip(self.by, k, strict=False) if x}
            for uuid, gpu in known.items():
                labels = ev.labels(rule, {**base, "uuid": uuid, **({"gpu": gpu} if gpu else {})})
                aid = alert_id(rule.name, labels)
                if uuid in fresh:
                    v.seen.add(aid)
                else:
                    v.active[aid] = (labels, float(len(fresh)))
        return v

    def promql(self, rule: Rule, sel: str) -> tuple[str | None, str | None]:
        by = ", ".join(self.by)
        after = format_duration(self.after_s)
        if self.inventory:
            per = f"{by}, uuid"
            expr = (
                f"(group by ({per}) (present_over_time({sel}[1h])) unless group by ({per}) "
                f"(present_over_time({sel}[{after}]))) and on({by}) group by ({by}) "
                f"(present_over_time({sel}[{after}]))"
            )
        else:
            expr = (
                f"group by ({by}) (present_over_time({sel}[1h])) unless group by ({by}) "
                f"(present_over_time({sel}[{after}]))"
            )
        return (
            expr,
            "Prometheus forgets a series after the 1h range; gpufleet keeps it stale until data returns",
        )
