"""anomaly: a series far from its own normal (EWMA or robust z-score), with hysteresis: it fires above
``z`` and clears below ``z_clear``, and the baseline learns only from normal samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.anomaly import Ewma, RobustZ, is_outside
from gpufleet.collector.rules.kinds.base import Data, Evaluation, Points, Verdict, YamlRule, fresh

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule


@dataclass(frozen=True)
class Anomaly:
    kind: ClassVar[str] = "anomaly"
    keys: ClassVar[frozenset[str]] = frozenset(
        {"method", "z", "z_clear", "alpha", "window", "min_samples", "direction", "min_deviation", "rate"}
    )
    instant: ClassVar[bool] = False

    method: str = "ewma"
    z: float = 4.0
    z_clear: float = 2.0
    alpha: float = 0.05
    window: int = 60
    min_samples: int = 30
    direction: str = "up"
    min_deviation: float = 0.0
    rate_s: float = 0.0

    @classmethod
    def parse(cls, y: YamlRule) -> Anomaly:
        method = y.get("method", "ewma")
        if method not in ("ewma", "mad"):
            y.bad(f"method {method!r} is not one of ewma, mad")
        z = y.num("z", 4.0, lo=0.5)
        z_clear = y.num("z_clear", min(2.0, z), lo=0.0)
        if z_clear > z:
            y.bad("'z_clear' must not be above 'z' (the hysteresis band clears below where it fires)")
        alpha = y.num("alpha", 0.05, lo=0.0001, hi=1.0)
        window = int(y.num("window", 60, lo=5, hi=10_000))
        min_samples = int(y.num("min_samples", 30, lo=2))
        direction = y.get("direction", "up")
        if direction not in ("up", "down", "both"):
            y.bad(f"direction {direction!r} is not one of up, down, both")
        return cls(
            method,
            z,
            z_clear,
            alpha,
            window,
            min_samples,
            direction,
            y.num("min_deviation", 0.0, lo=0.0),
            y.dur("rate", 0.0),
        )

    def metrics(self) -> list[str]:
        return []

    def history_s(self) -> float:
        return self.rate_s

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        for p in fresh(points, now_ms):
            dkey = (rule.name, ev.cache.series_fp(p.labels))
            labels, aid = ev.alert(rule, p.labels)
            x = p.value
            if self.rate_s:
                rate = ev.rate(p.labels, self.rate_s, now_ms)
                if rate is None:
                    continue
                x = rate
            new_sample = ev.last_ts.get(dkey) != p.ts
            ev.last_ts[dkey] = p.ts
            det = ev.detectors.get(dkey)
            if det is None:
                det = ev.detectors[dkey] = Ewma(self.alpha) if self.method == "ewma" else RobustZ(self.window)
            if new_sample:
                if det.n < self.min_samples:
                    det.update(x)
                    continue  # still learning this series' normal
                z = det.score(x)
                if dkey in ev.anomalous:
                    if not is_outside(z, self.z_clear, self.direction):
                        ev.anomalous.discard(dkey)
                elif is_outside(z, self.z, self.direction) and abs(det.deviation(x)) >= self.min_deviation:
                    ev.anomalous.add(dkey)
                if dkey not in ev.anomalous:
                    det.update(x)  # the baseline learns only from normal samples
            elif det.n < self.min_samples:
                continue
            v.seen.add(aid)
            if dkey in ev.anomalous:
                v.active[aid] = (labels, x)
        return v

    def promql(self, rule: Rule, sel: str) -> tuple[str | None, str | None]:
        return None, "anomaly rules keep per-series state PromQL has not"
