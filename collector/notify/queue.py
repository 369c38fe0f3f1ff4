"""A send queue per Slack channel: messages to one channel go out one at a time, in order, and a rate limit
(HTTP 429 with ``Retry-After``) or a server error pauses that channel and retries, instead of dropping.

Slack allows about one message per second per channel and answers bursts with 429; Alertmanager's Slack
notifier gives up on those. Here a job stays at the head of its channel's queue until Slack takes it or
answers with an error no retry can fix (a bad token, an unknown channel), which is logged and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


def retry_delay(exc: BaseException, attempt: int) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None when retrying cannot help."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status == 429:
        headers = getattr(response, "headers", {}) or {}
        for k, v in headers.items():
            if k.lower() == "retry-after":
                try:
                    return float(v[0] if isinstance(v, list) else v)
                except (TypeError, ValueError):
                    break
        return 1.0
    if status is not None and status >= 500:
        return min(MAX_BACKOFF_S, 0.5 * 2 ** attempt)
    if status is None and isinstance(exc, OSError):  # connection refused, reset, timeout
        return min(MAX_BACKOFF_S, 0.5 * 2 ** attempt)
    return None


class SendQueue:
    """One worker thread per channel; ``submit`` returns at once."""

    def __init__(self, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._sleep = sleep
        self._queues: dict[str, deque[tuple[str, Callable[[], Any]]]] = {}
        self._cv = threading.Condition()
        self._threads: dict[str, threading.Thread] = {}
        self._busy: set[str] = set()
        self._closed = False
        self.sent = 0
        self.retries = 0
        self.failed = 0

    def submit(self, channel: str, what: str, job: Callable[[], Any]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the Slack send queue is closed")
            self._queues.setdefault(channel, deque()).append((what, job))
            if channel not in self._threads:
                t = threading.Thread(target=self._run, args=(channel,), name=f"slack-{channel}", daemon=True)
                self._threads[channel] = t
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
            log.error("%d Slack message(s) still queued at shutdown were not sent", left)

    def _run(self, channel: str) -> None:
        q = self._queues[channel]
        while True:
            with self._cv:
                while not q and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                what, job = q[0]
                self._busy.add(channel)
            attempt = 0
            while True:
                try:
                    job()
                    self.sent += 1
                    break
                except Exception as exc:
                    delay = retry_delay(exc, attempt)
                    if delay is None or self._closed:
                        self.failed += 1
                        log.error("Slack refused %s for %s and a retry cannot help: %s", what, channel, exc)
                        break
                    self.retries += 1
                    attempt += 1
                    log.warning("Slack %s for %s failed (%s); retrying in %.1fs", what, channel, exc, delay)
                    self._sleep(delay)
            with self._cv:
                q.popleft()
                self._busy.discard(channel)
                self._cv.notify_all()
