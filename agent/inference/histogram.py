"""Cumulative histograms, their per-interval deltas and quantiles estimated from bucket counts.

A server's histogram counts every request since it started. What the on-call engineer needs is the
latency of the last interval, so every quantile here comes from the difference of two scrapes, the
way Prometheus' ``histogram_quantile(q, rate(x_bucket[5m]))`` does it, never from lifetime totals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

INF = math.inf


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts: ``bounds[i]`` is an upper bound (``le``), ``counts[i]`` the observations <= it.

    The last bound is always +Inf, so ``counts[-1]`` is the total count.
    """

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    @classmethod
    def from_buckets(
        cls, buckets: Iterable[tuple[float, float]], total_sum: float = 0.0, total_count: float | None = None
    ) -> Histogram:
        """Build from ``(le, cumulative count)`` pairs in any order; adds +Inf from ``total_count`` if missing."""
        pairs = sorted(buckets)
        if not pairs or pairs[-1][0] != INF:
            pairs.append((INF, total_count if total_count is not None else (pairs[-1][1] if pairs else 0.0)))
        return cls(tuple(b for b, _ in pairs), tuple(c for _, c in pairs), total_sum)

    def scaled(self, factor: float) -> Histogram:
        """The same counts with bounds and sum multiplied by ``factor`` (microseconds -> seconds: 1e-6)."""
        if factor == 1.0:
            return self
        return Histogram(tuple(b * factor for b in self.bounds), self.counts, self.sum * factor)

    def __add__(self, other: Histogram) -> Histogram:
        """Merge two histograms of the same layout (two engines of one model)."""
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different bucket layouts")
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.sum + other.sum,
        )

    def delta(self, previous: Histogram | None) -> Histogram:
        """What was observed since ``previous``.

        A counter that went down means the server restarted (its counts start from zero again), so what
        it shows now is what happened since the restart, the rule Prometheus' ``rate()`` applies. A changed
        bucket layout (the server was upgraded) is treated the same way.
        """
        if previous is None or previous.bounds != self.bounds:
            return self
        diffs = tuple(c - p for c, p in zip(self.counts, previous.counts, strict=True))
        if any(d < 0 for d in diffs):
            return self
        return Histogram(self.bounds, diffs, max(self.sum - previous.sum, 0.0))

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile the way Prometheus' ``histogram_quantile`` does; None when nothing was observed.

        The observation of rank ``q * count`` lies in the first bucket whose cumulative count reaches that
        rank; the estimate interpolates linearly inside that bucket, so it is off by at most the bucket's
        width. A rank in the +Inf bucket returns the highest finite bound.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is not between 0 and 1")
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        for i, (bound, cum) in enumerate(zip(self.bounds, self.counts, strict=True)):
            if cum >= rank and cum > 0:
                if bound == INF:
                    return self.bounds[-2] if len(self.bounds) > 1 else None
                lower = self.bounds[i - 1] if i > 0 else min(0.0, bound)
                below = self.counts[i - 1] if i > 0 else 0.0
                in_bucket = cum - below
                if in_bucket <= 0:
                    return bound
                return lower + (bound - lower) * (rank - below) / in_bucket
        return self.bounds[-2] if len(self.bounds) > 1 else None

    def count_above(self, threshold: float) -> float:
        """Observations slower than ``threshold``; exact when ``threshold`` is a bucket bound, else interpolated."""
        below = 0.0
        for i, (bound, cum) in enumerate(zip(self.bounds, self.counts, strict=True)):
            if bound < threshold:
                continue
            prev = self.counts[i - 1] if i > 0 else 0.0
            if bound == threshold:
                below = cum
            elif bound == INF:  # no bound to interpolate toward: count the whole +Inf bucket as slow
                below = prev
            else:
                lower = self.bounds[i - 1] if i > 0 else min(0.0, bound)
                below = prev + (cum - prev) * (threshold - lower) / (bound - lower)
            break
        return max(self.count - below, 0.0)


def log_buckets(start: float, factor: float, count: int) -> tuple[float, ...]:
    """``count`` bounds growing geometrically from ``start`` by ``factor`` (no +Inf)."""
    return tuple(start * factor**i for i in range(count))


class Recorder:
    """A cumulative histogram fed one observation at a time (the client-API receiver's store)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds)) + (INF,)
        self._counts = [0.0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        lo, hi = 0, len(self.bounds) - 1
        while lo < hi:  # first bound >= value
            mid = (lo + hi) // 2
            if self.bounds[mid] >= value:
                hi = mid
            else:
                lo = mid + 1
        self._counts[lo] += 1
        self._sum += value

    def snapshot(self) -> Histogram:
        cum, total = [], 0.0
        for c in self._counts:
            total += c
            cum.append(total)
        return Histogram(self.bounds, tuple(cum), self._sum)
