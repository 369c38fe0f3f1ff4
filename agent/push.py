"""Pushes samples to the collector as Prometheus remote-write, in batches; urgent changes at once."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.core import Snapshot
from agent.fields import FIELDS
from gpufleet import remote_write as rw

log = logging.getLogger(__name__)

# Families whose change is worth a push now: a GPU lost, an XID, a throttle reason switching on, ECC errors.
URGENT = {"gpufleet_gpu_up", "gpufleet_gpu_xid_errors_total"} | {f.name for f in FIELDS if f.urgent}


class Pusher:
    """Buffers snapshots and sends them every ``interval`` seconds, or at once when an urgent value changes.

    Batches that fail stay queued (bounded by ``max_pending_samples``; what has to be dropped is counted)
    and are retried in order with backoff.
    """

    def __init__(self, url: str, *, interval: float = 5.0, token: str | None = None, http: Any | None = None,
                 max_pending_samples: int = 2_000_000, timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if http is None:
            import urllib3

            http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=timeout))
        self.url = url.rstrip("/") + "/api/v1/write" if not url.rstrip("/").endswith("/api/v1/write") else url
        self._http = http
        self._token = token
        self.interval = interval
        self._max_pending = max_pending_samples
        self._clock = clock
        self._buffer: list[Snapshot] = []
        # Encoded batches waiting to be sent: (body, sample count, holds an urgent change)
        self._queue: deque[tuple[bytes, int, bool]] = deque()
        self._last_urgent: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._flush = threading.Event()
        self._urgent_pending = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent_samples = 0
        self.failed_pushes = 0
        self.dropped_samples = 0
        self.last_error: str | None = None
        self._backoff = 0.0

    def __call__(self, snap: Snapshot) -> None:
        """Agent sink: take a snapshot; flag an immediate push if an urgent value changed."""
        urgent = False
        for fam in snap.families:
            if fam.name not in URGENT:
                continue
            for labels, value in fam.samples:
                key = (fam.name, tuple(sorted(labels.items())))
                if self._last_urgent.get(key) != value:
                    # The first sight of a gauge is not news; a counter's first appearance is (an XID happened).
                    if key in self._last_urgent or fam.kind == "counter":
                        urgent = True
                    self._last_urgent[key] = value
        with self._lock:
            self._buffer.append(snap)
            if urgent:
                self._urgent_pending = True
        if urgent:
            self._flush.set()

    def pending_samples(self) -> int:
        with self._lock:
            queued = sum(n for _, n, _ in self._queue)
            return queued + sum(len(f.samples) for snap in self._buffer for f in snap.families)

    def _encode_buffer(self) -> None:
        with self._lock:
            snaps, self._buffer = self._buffer, []
            urgent, self._urgent_pending = self._urgent_pending, False
        if not snaps:
            return
        series: dict[tuple, rw.Series] = {}
        meta: dict[str, rw.Metadata] = {}
        n = 0
        for snap in snaps:
            for fam in snap.families:
                if fam.name not in meta:
                    meta[fam.name] = rw.Metadata(fam.name, fam.kind, fam.help)
                for labels, value in fam.samples:
                    key = (fam.name, tuple(sorted(labels.items())))
                    s = series.get(key)
                    if s is None:
                        s = series[key] = rw.Series({"__name__": fam.name, **labels})
                    s.samples.append((snap.timestamp_ms, value))
                    n += 1
        body = rw.encode(series.values(), list(meta.values()))
        with self._lock:
            self._queue.append((body, n, urgent))
            pending = sum(k for _, k, _ in self._queue)
            while pending > self._max_pending and len(self._queue) > 1:
                _, dropped, _ = self._queue.popleft()
                pending -= dropped
                self.dropped_samples += dropped
                log.error("collector unreachable too long: dropped %d oldest samples (limit %d pending)",
                          dropped, self._max_pending)

    def flush(self) -> bool:
        """Encode what is buffered and send every queued batch in order. True when nothing is left."""
        self._encode_buffer()
        while True:
            with self._lock:
                if not self._queue:
                    return True
                body, n, urgent = self._queue[0]
            if not self._send(body, urgent):
                return False
            with self._lock:
                self._queue.popleft()
            self.sent_samples += n

    def _send(self, body: bytes, urgent: bool = False) -> bool:
        headers = {"Content-Type": rw.CONTENT_TYPE, "Content-Encoding": rw.CONTENT_ENCODING,
                   "X-Prometheus-Remote-Write-Version": rw.PROTOCOL_VERSION, "User-Agent": "gpufleet-agent"}
        if urgent:  # tells the collector to evaluate its rules now rather than at the next interval
            headers["X-Gpufleet-Urgent"] = "1"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            resp = self._http.request("POST", self.url, body=body, headers=headers)
            status = resp.status
            detail = resp.data[:200].decode(errors="replace") if status >= 300 else ""
        except Exception as exc:
            status, detail = 0, str(exc)
        if 200 <= status < 300:
            if self.last_error:
                log.info("collector at %s accepts samples again", self.url)
            self.last_error = None
            self._backoff = 0.0
            return True
        self.failed_pushes += 1
        if 400 <= status < 500 and status not in (408, 429):
            # The collector refused this batch for what it is; retrying the same bytes cannot succeed.
            with self._lock:
                _, n, _ = self._queue.popleft()
            self.dropped_samples += n
            log.error("collector at %s refused a batch of %d samples (HTTP %d): %s", self.url, n, status, detail)
            return True
        msg = f"cannot push to collector at {self.url} ({f'HTTP {status}' if status else detail}); samples are kept and retried"
        if msg != self.last_error:
            log.warning(msg)
        self.last_error = msg
        self._backoff = min(max(self._backoff * 2, 0.5), 30.0)
        return False

    def run(self) -> None:
        while not self._stop.is_set():
            self._flush.wait(self.interval if not self._backoff else self._backoff)
            self._flush.clear()
            if self._stop.is_set():
                break
            self.flush()
        self.flush()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pusher", daemon=True)
        self._thread.start()

    def urgent(self) -> None:
        self._flush.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._flush.set()
        if self._thread:
            self._thread.join(timeout)
