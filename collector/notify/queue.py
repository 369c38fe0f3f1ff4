"""The one send queue every notifier's messages go through, and the one place that retries.

Each integration (Slack, Grafana annotations, the console) sends a message once and says in a
:class:`~gpufleet.collector.rules.contract.Delivery` whether a retry can help; the queue retries, as
Alertmanager's notify pipeline keeps retries in one stage. Messages of one lane (one notifier) go out one at
a time and in order: Slack allows about one message per second per channel and answers bursts with 429, and a
later edit of a message must not overtake the post that creates it. A rate limit or a server error pauses the
lane and retries instead of dropping; an answer no retry can fix (a bad token, an unknown channel) is logged
and counted.

A threaded queue (the collector) gives each lane a worker thread, so a slow Slack never holds up rule
evaluation; an inline queue (backtests, rule tests) sends on the caller's thread, so results are in order and
reproducible.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.collector.rules.contract import Delivery
from gpufleet.core.retry import RetryPolicy

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
# One worker per lane, alone on its queue: no herd to spread, so the delays are plain doublings.
RETRY = RetryPolicy(first_s=0.5, max_s=MAX_BACKOFF_S, jitter=0.0)


def retry_delay(delivery: Delivery, attempt: int) -> float | None:
    """Seconds to wait before retrying after ``delivery`` failed on try ``attempt`` (from 0), or None when
    retrying cannot help: the wait the remote side asked for, else an exponential backoff."""
    if delivery.ok or not delivery.retry:
        return None
    return RETRY.delay(attempt, delivery.retry_after_s)


@dataclass(frozen=True)
class _Job:
    what: str
    attempt: Callable[[], Delivery]
    done: Callable[[Delivery], None]


class SendQueue:
    """``submit`` queues a job on its lane and (threaded) returns at once; the lane's worker sends it,
    retrying while the delivery says a retry helps, then hands the final delivery to the job's ``done``."""

    def __init__(self, *, threaded: bool = True, sleep: Callable[[float], None] = time.sleep) -> None:
        self._threaded = threaded
        self._sleep = sleep
        self._queues: dict[str, deque[_Job]] = {}
        self._cv = threading.Condition()
        self._threads: dict[str, threading.Thread] = {}
        self._busy: set[str] = set()
        self._closed = False
        self.sent = 0
        self.retries = 0
        self.failed = 0

    def submit(
        self, lane: str, what: str, attempt: Callable[[], Delivery], done: Callable[[Delivery], None]
    ) -> None:
        job = _Job(what, attempt, done)
        if not self._threaded:
            self._deliver(lane, job)
            return
        with self._cv:
            if self._closed:
                raise RuntimeError("the notification send queue is closed")
            self._queues.setdefault(lane, deque()).append(job)
            if lane not in self._threads:
                t = threading.Thread(target=self._run, args=(lane,), name=f"notify-{lane}", daemon=True)
                self._threads[lane] = t
                t.start()
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values()) + len(self._busy)

    def join(self, timeout: float = 30.0) -> bool:
        """Wait until every queued message was sent or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(self._queues.values()) or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.join(timeout)
        with self._cv:
            self._closed = True
            left = sum(len(q) for q in self._queues.values())
            self._cv.notify_all()
        if left:
            log.error("%d notification(s) still queued at shutdown were not sent", left)

    def _deliver(self, lane: str, job: _Job) -> None:
        tries = 0
        while True:
            try:
                delivery = job.attempt()
            except Exception as exc:  # a notifier that raises instead of classifying: not worth a retry
                delivery = Delivery.failed(repr(exc), retry=False)
            if delivery.ok:
                self.sent += 1
                break
            delay = retry_delay(delivery, tries)
            if delay is None or self._closed:
                self.failed += 1
                log.error("%s refused %s and a retry cannot help: %s", lane, job.what, delivery.error)
                break
            self.retries += 1
            tries += 1
            log.warning(
                "%s: sending %s failed (%s); retrying in %.1fs", lane, job.what, delivery.error, delay
            )
            self._sleep(delay)
        try:
            job.done(delivery)
        except Exception:
            log.exception("%s: recording the delivery of %s failed", lane, job.what)

    def _run(self, lane: str) -> None:
        q = self._queues[lane]
        while True:
            with self._cv:
                while not q and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = q[0]
                self._busy.add(lane)
            self._deliver(lane, job)
            with self._cv:
                q.popleft()
                self._busy.discard(lane)
                self._cv.notify_all()
