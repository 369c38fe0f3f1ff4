"""Remote-write out: the collector forwards every batch it has stored to other Prometheus-compatible stores
(Prometheus with --web.enable-remote-write-receiver, Mimir, Thanos Receive, VictoriaMetrics).

One bounded queue and one sender thread per URL, so a slow or dead target never holds up ingest or the
other targets. Bodies are forwarded as received (already snappy-compressed remote-write 1.0). A batch
is retried on connection errors, 5xx, 408 and 429 (after the target's Retry-After, else with backoff and
jitter); a 4xx refusal or a full queue drops it, and every drop is counted and logged.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable

from gpufleet.core.retry import RetryPolicy, Verdict
from gpufleet.core.sender import HttpTransport, RemoteWriteSender, http_pool

log = logging.getLogger(__name__)


class RemoteWriteTarget:
    def __init__(
        self,
        url: str,
        *,
        http: HttpTransport | None = None,
        max_queue_samples: int = 5_000_000,
        headers: dict[str, str] | None = None,
        max_backoff: float = 30.0,
        sleep: Callable[[float], object] | None = None,
        timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self._sender = RemoteWriteSender(
            url,
            http if http is not None else http_pool(timeout),
            user_agent="gpufleet-collector",
            headers=headers,
        )
        self._max_queue = max_queue_samples
        self._retry = RetryPolicy(
            first_s=min(0.2, max_backoff), max_s=max_backoff, rng=rng or random.Random()
        )
        self._queue: deque[tuple[bytes, int]] = deque()
        self._queued_samples = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self.sent_samples = 0
        self.dropped_samples = 0
        self.failed_sends = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"forward-{url}", daemon=True)

    def start(self) -> RemoteWriteTarget:
        self._thread.start()
        return self

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    def submit(self, body: bytes, samples: int) -> None:
        with self._cond:
            if self._queued_samples + samples > self._max_queue:
                self.dropped_samples += samples
                log.error(
                    "remote-write to %s is behind by %d samples (queue full); dropped a batch of %d",
                    self.url,
                    self._queued_samples,
                    samples,
                )
                return
            self._queue.append((body, samples))
            self._queued_samples += samples
            self._cond.notify()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                body, n = self._queue[0]
            verdict, retry_after = self._send(body, n)
            if verdict is Verdict.RETRY:
                self._sleep(self._retry.delay(failures, retry_after))
                failures += 1
                continue
            failures = 0
            with self._cond:
                self._queue.popleft()
                self._queued_samples -= n
            if verdict is Verdict.OK:
                self.sent_samples += n
            else:
                self.dropped_samples += n

    def _send(self, body: bytes, n: int) -> tuple[Verdict, float | None]:
        result = self._sender.send(body)
        if result.verdict is Verdict.OK:
            if self.last_error:
                log.info("remote-write to %s works again", self.url)
            self.last_error = None
            return result.verdict, None
        self.failed_sends += 1
        if result.verdict is Verdict.REFUSED:
            log.error(
                "remote-write target %s refused a batch of %d samples (HTTP %d: %s); dropped it",
                self.url,
                n,
                result.status,
                result.detail,
            )
            return result.verdict, None
        msg = f"cannot remote-write to {self.url} ({result.problem}); retrying"
        if msg != self.last_error:
            log.warning(msg)
        self.last_error = msg
        return result.verdict, result.retry_after_s

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        while self._queued_samples and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queued_samples

    def stop(self, timeout: float = 5.0) -> None:
        self.drain(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if self._queued_samples:
            log.warning("remote-write to %s stopped with %d samples unsent", self.url, self._queued_samples)


class Forwarder:
    """Every stored batch goes to every target."""

    def __init__(
        self, urls: list[str], *, http: HttpTransport | None = None, max_queue_samples: int = 5_000_000
    ) -> None:
        self.targets = [RemoteWriteTarget(u, http=http, max_queue_samples=max_queue_samples) for u in urls]

    def start(self) -> Forwarder:
        for t in self.targets:
            t.start()
        return self

    def submit(self, body: bytes, samples: int) -> None:
        for t in self.targets:
            t.submit(body, samples)

    def stop(self, timeout: float = 5.0) -> None:
        for t in self.targets:
            t.stop(timeout)
