"""Per-series statistics for anomaly, peer and trend rules: O(1) or O(window) per sample, so every GPU can have them.

* :class:`Ewma` keeps an exponentially weighted mean and variance; the z-score of a sample is against the
  baseline *before* it. While a series is anomalous the baseline is frozen, so a long fault does not teach
  the baseline that the fault is normal.
* :class:`RobustZ` keeps the last ``window`` samples and scores against their median and MAD
  (median absolute deviation, scaled by 1.4826 to estimate a normal sigma): one spike in the window moves it
  not at all.
* :func:`steady_growth` checks that growth is steady (each of six slices of the window higher than the one
  before, no single step a quarter of the rise), so a job loading its model — or a few jobs one after
  another — is not a leak; :func:`linear_fit` then says when the trend reaches the limit.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence

MAD_TO_SIGMA = 1.4826


class Ewma:
    __slots__ = ("alpha", "mean", "var", "n")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean = 0.0
        self.var = 0.0
        self.n = 0

    def score(self, x: float) -> float:
        if self.n == 0:
            return 0.0
        return (x - self.mean) / math.sqrt(self.var + 1e-12)

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            incr = self.alpha * d
            self.mean += incr
            self.var = (1 - self.alpha) * (self.var + d * incr)
        self.n += 1

    def deviation(self, x: float) -> float:
        return x - self.mean


class RobustZ:
    __slots__ = ("values", "n")

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.n = 0

    def score(self, x: float) -> float:
        if not self.values:
            return 0.0
        med = statistics.median(self.values)
        mad = statistics.median(abs(v - med) for v in self.values) * MAD_TO_SIGMA
        return (x - med) / max(mad, 1e-9)

    def update(self, x: float) -> None:
        self.values.append(x)
        self.n += 1

    def deviation(self, x: float) -> float:
        return x - statistics.median(self.values) if self.values else 0.0


def is_outside(z: float, limit: float, direction: str) -> bool:
    if direction == "up":
        return z > limit
    if direction == "down":
        return z < -limit
    return abs(z) > limit


def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept of (t, v) points (what PromQL's predict_linear computes)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    stt = sum((t - mt) ** 2 for t, _ in points)
    if stt == 0:
        return 0.0, mv
    slope = sum((t - mt) * (v - mv) for t, v in points) / stt
    return slope, mv - slope * mt


def steady_growth(
    points: Sequence[tuple[float, float]], slices: int = 6, max_jump_share: float = 0.25
) -> bool:
    """True when each of ``slices`` consecutive slices of the points has a higher mean than the one before,
    and no single step between two samples makes more than ``max_jump_share`` of the rise: a staircase of
    jobs starting one after another (each loading a model) rises too, but in a few big steps."""
    if len(points) < slices * 2:
        return False
    rise = points[-1][1] - points[0][1]
    if rise <= 0:
        return False
    if max(b[1] - a[1] for a, b in zip(points, points[1:], strict=False)) > max_jump_share * rise:
        return False
    size = len(points) / slices
    means = []
    for i in range(slices):
        part = points[int(i * size) : int((i + 1) * size)]
        means.append(sum(v for _, v in part) / len(part))
    return all(b > a for a, b in zip(means, means[1:], strict=False))
