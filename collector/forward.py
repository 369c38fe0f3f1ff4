"""Remote-write out: the collector forwards every batch it has stored to other Prometheus-compatible stores
(Prometheus with --web.enable-remote-write-receiver, Mimir, Thanos Receive, VictoriaMetrics).

One bounded queue and one sender thread per URL, so a slow or dead target never holds up ingest or the
other targets. Bodies are forwarded as received (already snappy-compressed remote-write 1.0). A batch
is retried with backoff on connection errors, 5xx, 408 and 429; a 4xx refusal or a full queue drops it,
and every drop is counted and logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gpufleet import remote_write as rw

log = logging.getLogger(__name__)


class RemoteWriteTarget:
    def __init__(self, url: str, *, http: Any | None = None, max_queue_samples: int = 5_000_000,
                 headers: dict[str, str] | None = None, max_backoff: float = 30.0,
                 sleep: Callable[[float], Any] | None = None, timeout: float = 10.0) -> None:
        if http is None:
            import urllib3

            http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=timeout))
        self.url = url
        self._http = http
        self._headers = {"Content-Type": rw.CONTENT_TYPE, "Content-Encoding": rw.CONTENT_ENCODING,
                         "X-Prometheus-Remote-Write-Version": rw.PROTOCOL_VERSION,
                         "User-Agent": "gpufleet-collector", **(headers or {})}
        self._max_queue = max_queue_samples
        self._max_backoff = max_backoff
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
                log.error("remote-write to %s is behind by %d samples (queue full); dropped a batch of %d",
                          self.url, self._queued_samples, samples)
                return
            self._queue.append((body, samples))
            self._queued_samples += samples
            self._cond.notify()

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                body, n = self._queue[0]
            outcome = self._send(body, n)
            if outcome == "retry":
                backoff = min(max(backoff * 2, 0.2), self._max_backoff)
                self._sleep(backoff)
                continue
            backoff = 0.0
            with self._cond:
                self._queue.popleft()
                self._queued_samples -= n
            if outcome == "sent":
                self.sent_samples += n
            else:
                self.dropped_samples += n

    def _send(self, body: bytes, n: int) -> str:
        try:
            resp = self._http.request("POST", self.url, body=body, headers=self._headers)
            status, detail = resp.status, resp.data[:200].decode(errors="replace")
        except Exception as exc:
            status, detail = 0, str(exc)
        if 200 <= status < 300:
            if self.last_error:
                log.info("remote-write to %s works again", self.url)
            self.last_error = None
            return "sent"
        self.failed_sends += 1
        if 400 <= status < 500 and status not in (408, 429):
            log.error("remote-write target %s refused a batch of %d samples (HTTP %d: %s); dropped it",
                      self.url, n, status, detail)
            return "refused"
        msg = f"cannot remote-write to {self.url} ({f'HTTP {status}: {detail}' if status else detail}); retrying"
        if msg != self.last_error:
            log.warning(msg)
        self.last_error = msg
        return "retry"

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

    def __init__(self, urls: list[str], *, http: Any | None = None, max_queue_samples: int = 5_000_000) -> None:
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
