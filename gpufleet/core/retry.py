"""The one retry policy: when an HTTP outcome is worth another try, and how long to wait before it.

* **Classification**: no answer (connection refused or reset, timeout), 5xx, 408 and 429 are passing
  troubles and worth retrying; any other 4xx says the request itself is wrong, so sending the same bytes
  again cannot succeed.
* **Delay**: capped exponential backoff, ``first_s`` doubling up to ``max_s``, with jitter (each delay is
  drawn from ``[(1 - jitter) * d, d]``) so that a fleet of clients that failed together does not come back
  together. A server that answers with ``Retry-After`` knows its own load best: that wait is taken as it
  stands (as Prometheus' remote-write queue does), capped at ``max_s`` so a misconfigured proxy cannot park
  a client for a day.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

# 2**attempt past this would only be capped anyway; bounding it keeps the float arithmetic finite.
_MAX_DOUBLINGS = 64


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # a passing trouble: try the same request again later
    REFUSED = "refused"  # the request itself is wrong: retrying the same bytes cannot succeed


def classify(status: int | None) -> Verdict:
    """The verdict on an HTTP status; ``None`` (or 0) is no answer at all, e.g. connection refused."""
    if not status:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.OK
    if 400 <= status < 500 and status not in (408, 429):
        return Verdict.REFUSED
    return Verdict.RETRY


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP-date, RFC 9110 §10.2.3); None
    when absent or unreadable, so the caller falls back to its own backoff."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter. ``rng`` is passed in so tests (and replays) draw the same
    jitter every time; ``jitter=0`` gives the plain doubling sequence."""

    first_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"retry delays need 0 < first ({self.first_s}) <= max ({self.max_s})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter is a share of the delay, 0 to 1, not {self.jitter}")

    def backoff(self, attempt: int) -> float:
        """The cap for retry number ``attempt`` (0 for the first retry): ``first_s * 2**attempt``, at most
        ``max_s``; without jitter, the delay itself."""
        return min(self.first_s * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS), self.max_s)

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry): the server's
        ``Retry-After`` when it sent one (capped at ``max_s``), else the jittered backoff."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_s)
        cap = self.backoff(attempt)
        return cap * self.rng.uniform(1.0 - self.jitter, 1.0) if self.jitter else cap

    def delays(self) -> Iterator[float]:
        """The delays before each next try, for ever: for callers that retry until told to stop."""
        attempt = 0
        while True:
            yield self.delay(attempt)
            attempt += 1
