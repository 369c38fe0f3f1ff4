"""Per model and endpoint: what changed since the last scrape, the SLO burn over windows, the latency baseline."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gpufleet.agent.inference.config import Slo
from gpufleet.agent.inference.histogram import Histogram
from gpufleet.agent.inference.servers import ModelReading

QUANTILES = (0.5, 0.9, 0.99)
# Google SRE workbook, multiwindow multi-burn-rate alerts: a page when 2% of a 30-day budget burns in an
# hour (rate 14.4) seen over both 1h and 5m; a ticket when 5% burns in 6h (rate 6) over both 6h and 30m.
WINDOWS = {"5m": 300.0, "30m": 1800.0, "1h": 3600.0, "6h": 21600.0}
MULTIWINDOWS = {"1h,5m": ("1h", "5m"), "6h,30m": ("6h", "30m")}
SLOT_SECONDS = 10.0
BASELINE_HALF_LIFE = 3600.0
BASELINE_WARMUP = 600.0  # seconds of data before the baseline is trusted


def counter_delta(current: float | None, previous: float | None) -> float | None:
    """Increase of a counter; a decrease means the server restarted, so the current value is the increase."""
    if current is None:
        return None
    if previous is None:
        return None
    return current if current < previous else current - previous


class SloWindows:
    """Bad and total request counts in 10-second slots, summed over the burn-rate windows."""

    def __init__(self) -> None:
        self._slots: deque[list[float]] = deque()  # [slot start, bad, total]

    def add(self, at: float, bad: float, total: float) -> None:
        start = math.floor(at / SLOT_SECONDS) * SLOT_SECONDS
        if self._slots and self._slots[-1][0] == start:
            self._slots[-1][1] += bad
            self._slots[-1][2] += total
        else:
            self._slots.append([start, bad, total])
        horizon = at - max(WINDOWS.values()) - SLOT_SECONDS
        while self._slots and self._slots[0][0] < horizon:
            self._slots.popleft()

    def bad_ratio(self, window: float, at: float) -> float | None:
        bad = total = 0.0
        for start, b, t in reversed(self._slots):
            if start + SLOT_SECONDS <= at - window:
                break
            bad += b
            total += t
        return bad / total if total > 0 else None


@dataclass
class IntervalResult:
    seconds: float
    quantiles: dict[str, dict[float, float]] = field(default_factory=dict)  # e2e/ttft/itl/queue -> q -> s
    means: dict[str, float] = field(default_factory=dict)  # e2e/queue/compute -> seconds
    rates: dict[str, float] = field(default_factory=dict)  # requests/errors/..._tokens/inferences per second
    error_ratio: float | None = None
    increases: dict[str, float] = field(default_factory=dict)  # requests/errors this interval
    burn_rates: dict[str, float] = field(default_factory=dict)  # window -> burn rate
    baseline_ratio: float | None = None


class ModelState:
    """Everything the source remembers about one model behind one endpoint."""

    def __init__(self) -> None:
        self.previous: ModelReading | None = None
        self.previous_at: float | None = None
        self.totals = {"requests": 0.0, "errors": 0.0}  # monotonic, whatever the server's restarts
        self.windows = SloWindows()
        self.baseline: float | None = None
        self.baseline_age = 0.0
        self._from_zero = False

    def seed_empty(self, at: float) -> None:
        """The model appeared between two scrapes of a known endpoint: at ``at`` it had counted nothing."""
        self.previous, self.previous_at, self._from_zero = ModelReading(), at, True

    def update(self, reading: ModelReading, at: float, slo: Slo | None) -> IntervalResult | None:
        prev, prev_at = self.previous, self.previous_at
        from_zero, self._from_zero = self._from_zero, False
        self.previous, self.previous_at = reading, at
        if prev is None or prev_at is None or at <= prev_at:
            return None
        out = IntervalResult(at - prev_at)
        deltas: dict[str, Histogram] = {}
        for key, hist in reading.histograms.items():
            d = hist.delta(prev.histograms.get(key))
            deltas[key] = d
            if d.count > 0:
                out.quantiles[key] = {q: v for q in QUANTILES if (v := d.quantile(q)) is not None}
                out.means[key] = d.sum / d.count
        for key, qs in reading.quantiles.items():
            if qs and key not in out.quantiles:  # quantiles the server computed (Triton summaries)
                out.quantiles[key] = {q: qs[q] for q in QUANTILES if q in qs}
        inc: dict[str, float] = {}
        for key, value in reading.counters.items():
            increase = counter_delta(value, prev.counters.get(key, 0.0 if from_zero else None))
            if increase is not None:
                inc[key] = increase
        if "requests" not in inc and "e2e" in deltas and ("e2e" in prev.histograms or from_zero):
            inc["requests"] = deltas["e2e"].count
        for key, value in inc.items():
            if key.endswith("_seconds"):
                continue
            out.rates[key] = value / out.seconds
        timed = inc.get("timed_requests", 0.0)
        for key in ("e2e", "queue", "compute"):
            if f"{key}_seconds" in inc and timed > 0 and key not in out.means:
                out.means[key] = inc[f"{key}_seconds"] / timed
        for key in ("requests", "errors"):
            if key in inc:
                self.totals[key] += inc[key]
                out.increases[key] = inc[key]
        if inc.get("requests", 0) > 0 and "errors" in inc:
            out.error_ratio = min(inc["errors"] / inc["requests"], 1.0)
        e2e = deltas.get("e2e")
        if slo is not None and e2e is not None and e2e.count > 0:
            self.windows.add(at, e2e.count_above(slo.latency_seconds), e2e.count)
        if slo is not None:
            for name, seconds in WINDOWS.items():
                ratio = self.windows.bad_ratio(seconds, at)
                if ratio is not None:
                    out.burn_rates[name] = ratio / slo.budget
        p99 = out.quantiles.get("e2e", {}).get(0.99)
        if p99 is not None and p99 > 0:
            if self.baseline is not None and self.baseline_age >= BASELINE_WARMUP:
                out.baseline_ratio = p99 / self.baseline
            alpha = 1.0 - 0.5 ** (out.seconds / BASELINE_HALF_LIFE)
            self.baseline = p99 if self.baseline is None else self.baseline + alpha * (p99 - self.baseline)
            self.baseline_age += out.seconds
        return out
