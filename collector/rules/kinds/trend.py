"""trend: a series growing steadily toward a limit series of the same GPU (memory toward its total), fired
when the linear fit over ``window`` reaches the limit within ``horizon``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.anomaly import linear_fit, steady_growth
from gpufleet.collector.rules.kinds.base import (
    Data,
    Evaluation,
    Points,
    Verdict,
    YamlRule,
    format_duration,
    fresh,
    metric_ok,
    num,
)

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule


@dataclass(frozen=True)
class Trend:
    kind: ClassVar[str] = "trend"
    keys: ClassVar[frozenset[str]] = frozenset({"limit_metric", "window", "horizon", "on"})
    instant: ClassVar[bool] = False

    limit_metric: str = ""
    window_s: float = 1800.0
    horizon_s: float = 3600.0
    on: tuple[str, ...] = ("node", "uuid")

    @classmethod
    def parse(cls, y: YamlRule) -> Trend:
        lm = y.get("limit_metric")
        if not metric_ok(lm):
            y.bad(
                "a trend rule needs 'limit_metric': the series it must not reach, e.g. gpufleet_gpu_memory_total_bytes"
            )
        return cls(
            lm if isinstance(lm, str) else "",
            y.dur("window", 1800.0),
            y.dur("horizon", 3600.0),
            y.labels_list("on", ("node", "uuid")),
        )

    def metrics(self) -> list[str]:
        return [self.limit_metric] if self.limit_metric else []

    def history_s(self) -> float:
        return self.window_s

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        limits = ev.joined(data, self.limit_metric, self.on, now_ms)
        for p in fresh(points, now_ms):
            h = ev.history(p.labels)
            limit = limits.get(ev.cache.key(p.labels, self.on))
            if not h or limit is None or h[-1][0] - h[0][0] < self.window_s * 1000 * 0.5:
                continue  # too little history to call a trend
            pts = [((t - now_ms) / 1000, val) for t, val in h]
            slope, intercept = linear_fit(pts)
            labels, aid = ev.alert(rule, p.labels)
            v.seen.add(aid)
            if slope > 0 and intercept + slope * self.horizon_s >= limit and steady_growth(pts):
                v.active[aid] = (labels, max(0.0, (limit - p.value) / slope / 3600))
        return v

    def promql(self, rule: Rule, sel: str) -> tuple[str | None, str | None]:
        on = ", ".join(self.on)
        expr = (
            f"predict_linear({sel}[{format_duration(self.window_s)}], {num(self.horizon_s)}) >= "
            f"on({on}) group_left() {self.limit_metric}"
        )
        return (
            expr,
            "gpufleet also requires steady growth over the window, so a job loading its model is no leak",
        )
