"""threshold: a value (or its rate) compared with a number or with another series of the same GPU, with
optional ``and`` conditions on further series joined on the ``on`` labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.kinds.base import (
    OPS,
    Data,
    Evaluation,
    Points,
    Verdict,
    YamlRule,
    format_duration,
    fresh,
    metric_ok,
    num,
    selector,
)
from gpufleet.core.labels import label_regex

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule


@dataclass(frozen=True)
class Condition:
    """A second series of the same GPU that must also hold (``and:``), joined on the rule's ``on`` labels."""

    metric: str
    op: str
    value: float
    matchers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Threshold:
    kind: ClassVar[str] = "threshold"
    keys: ClassVar[frozenset[str]] = frozenset(
        {"op", "value", "rate", "compare_to", "offset", "and", "on", "xid_set"}
    )
    instant: ClassVar[bool] = False

    op: str = ">"
    value: float = 0.0
    rate_s: float = 0.0  # compare the per-second increase over this window instead of the value
    compare_metric: str | None = None  # threshold taken from this series of the same GPU (+ offset)
    offset: float = 0.0
    conditions: tuple[Condition, ...] = ()
    on: tuple[str, ...] = ("node", "uuid")

    @classmethod
    def parse(cls, y: YamlRule) -> Threshold:
        if "value" not in y and "compare_to" not in y:
            y.bad("a threshold rule needs 'value' (or 'compare_to' with an 'offset')")
        op = y.op()
        value, rate_s, offset = y.num("value", 0.0), y.dur("rate", 0.0), y.num("offset", 0.0)
        compare = None
        if "compare_to" in y:
            if not metric_ok(y.get("compare_to")):
                y.bad("'compare_to' must be a metric name (the GPU's own threshold series)")
            compare = y.get("compare_to")
        conds = []
        for c in y.get("and") or []:
            c = {k: v for k, v in c.items() if k != "__line__"} if isinstance(c, dict) else {}
            if (
                not metric_ok(c.get("metric"))
                or str(c.get("op", "")) not in OPS
                or isinstance(c.get("value"), bool)
                or not isinstance(c.get("value"), (int, float))
            ):
                y.bad("each 'and' condition needs 'metric', 'op' and a numeric 'value'")
                continue
            match = c.get("match")
            matchers = (
                {k: str(v) for k, v in match.items() if k != "__line__"} if isinstance(match, dict) else {}
            )
            for k, rx in matchers.items():
                try:
                    label_regex(rx)
                except ValueError as exc:
                    y.bad(f"'and' condition on {c['metric']}: match {k}: {exc}")
            conds.append(Condition(c["metric"], str(c["op"]), float(c["value"]), matchers))
        return cls(op, value, rate_s, compare, offset, tuple(conds), y.labels_list("on", ("node", "uuid")))

    def metrics(self) -> list[str]:
        return [c.metric for c in self.conditions] + ([self.compare_metric] if self.compare_metric else [])

    def history_s(self) -> float:
        return self.rate_s

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        limits = ev.joined(data, self.compare_metric, self.on, now_ms) if self.compare_metric else None
        conds = [(c, ev.joined(data, c.metric, self.on, now_ms, c.matchers)) for c in self.conditions]
        for p in fresh(points, now_ms):
            value = p.value
            if self.rate_s:
                rate = ev.rate(p.labels, self.rate_s, now_ms)
                if rate is None:
                    continue
                value = rate
            key = ev.cache.key(p.labels, self.on)
            threshold = self.value
            if limits is not None:
                if key not in limits:
                    continue
                threshold = limits[key] + self.offset
            holds: bool | None = OPS[self.op](value, threshold)
            for c, values in conds:
                if key not in values:
                    holds = None  # unknown: neither fires nor resolves
                    break
                holds = holds and OPS[c.op](values[key], c.value)
            if holds is None:
                continue
            labels, aid = ev.alert(rule, p.labels)
            v.seen.add(aid)
            if holds:
                v.active[aid] = (labels, value)
        return v

    def promql(self, rule: Rule, sel: str) -> tuple[str | None, str | None]:
        on = ", ".join(self.on)
        left = f"rate({sel}[{format_duration(self.rate_s)}])" if self.rate_s else sel
        if self.compare_metric:
            right = (
                f"on({on}) group_left() ({self.compare_metric} + {num(self.offset)})"
                if self.offset
                else f"on({on}) group_left() {self.compare_metric}"
            )
            expr = f"{left} {self.op} {right}"
        else:
            expr = f"{left} {self.op} {num(self.value)}"
        for c in self.conditions:
            expr = f"({expr}) and on({on}) ({selector(c.metric, c.matchers)} {c.op} {num(c.value)})"
        return expr, None
