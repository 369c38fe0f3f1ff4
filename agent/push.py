"""Pushes samples to the collector as Prometheus remote-write, in batches; urgent changes at once."""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import cramjam

from gpufleet.agent.core import Snapshot
from gpufleet.agent.families import PerSeries
from gpufleet.agent.fields import FIELDS
from gpufleet.agent.spool import Spool
from gpufleet.core import remote_write as rw
from gpufleet.core.loglines import LineLimit
from gpufleet.core.retry import RetryPolicy, Verdict
from gpufleet.core.sender import HttpTransport, RemoteWriteSender, http_pool

log = logging.getLogger(__name__)

# Families whose change is worth a push now: a GPU lost, an XID, a throttle reason switching on, ECC errors.
URGENT = {"gpufleet_gpu_up", "gpufleet_gpu_xid_errors_total"} | {f.name for f in FIELDS if f.urgent}


class _SeriesKeys:
    """Each series' labels as remote-write puts them on the wire (``__name__`` and its labels, sorted and
    encoded: :data:`gpufleet.core.remote_write.LabelKey`), worked out once per series, not once per sample.

    A series is known by the identity of its label dict (:class:`gpufleet.agent.families.PerSeries`). A stage
    that makes its dicts anew each sample (an inference server's own labels) is recognised by the dict's items
    instead, so its series are not encoded again each sample.
    """

    def __init__(self) -> None:
        self._by_dict: PerSeries[rw.LabelKey] = PerSeries()
        self._by_items: dict[tuple[str, tuple[tuple[str, str], ...]], rw.LabelKey] = {}
        self._by_items_before: dict[tuple[str, tuple[tuple[str, str], ...]], rw.LabelKey] = {}

    def __call__(self, name: str, labels: dict[str, str]) -> rw.LabelKey:
        return self._by_dict.get(name, labels, lambda: self._key(name, labels))

    def _key(self, name: str, labels: dict[str, str]) -> rw.LabelKey:
        items = (name, tuple(labels.items()))
        key = self._by_items.get(items) or self._by_items_before.get(items)
        if key is None:
            # sorted by name, as receivers such as Prometheus require (rw.encode sorts the same way)
            key = rw.LabelSet.of(dict(sorted({"__name__": name, **labels}.items()))).key
        self._by_items[items] = key
        return key

    def rotate(self) -> None:
        self._by_dict.rotate()
        self._by_items_before, self._by_items = self._by_items, {}


def _encode_keyed(
    series: Iterable[tuple[rw.LabelKey, list[tuple[int, float]]]], metadata: Iterable[rw.Metadata]
) -> bytes:
    """The request :func:`gpufleet.core.remote_write.encode` makes of the same series, byte for byte, from
    labels already on the wire (:class:`_SeriesKeys`). Setting every sample through the protobuf runtime
    took most of a push; a sample is two fixed fields, written here as proto3 writes them (a zero value and
    a zero time left out), each distinct time once per batch."""
    times: dict[int, tuple[bytes, bytes, bytes]] = {}  # time -> (head with a value, its field, sample with 0)
    parts: list[bytes] = []
    for key, samples in series:
        body = [key]
        for t, v in samples:
            at = times.get(t)
            if at is None:
                field = b"\x10" + _varint(t) if t else b""  # Sample.timestamp, int64
                at = times[t] = (
                    bytes((0x12, 9 + len(field), 0x09)),
                    field,
                    bytes((0x12, len(field))) + field,
                )
            value = _DOUBLE(v)
            if value == _ZERO:
                body.append(at[2])
            else:
                body += (at[0], value, at[1])  # TimeSeries.samples: Sample.value (double), Sample.timestamp
        ts = b"".join(body)
        parts += (b"\x0a", _varint(len(ts)), ts)  # WriteRequest.timeseries
    meta = rw.WriteRequestMessage()
    for m in metadata:
        md = meta.metadata.add()
        md.type = rw.METRIC_TYPES.get(m.type, 0)
        md.metric_family_name = m.name
        md.help = m.help
        md.unit = m.unit
    parts.append(meta.SerializeToString())  # WriteRequest.metadata, after the series as protobuf writes them
    return bytes(cramjam.snappy.compress_raw(b"".join(parts)))


_DOUBLE = struct.Struct("<d").pack
_ZERO = bytes(8)


def _varint(n: int) -> bytes:
    """A protobuf varint; a negative int64 as its 64-bit two's complement, as protobuf writes it."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Pusher:
    """Buffers snapshots and sends them every ``interval`` seconds, or at once when an urgent value changes.

    Batches that fail stay queued (bounded by ``max_pending_samples``; what has to be dropped is counted)
    and are retried in order with backoff and jitter. With a ``spool``, failed batches go to disk instead,
    survive a restart, and are replayed urgent-first once the collector answers again.
    """

    def __init__(
        self,
        url: str,
        *,
        interval: float = 5.0,
        token: str | None = None,
        http: HttpTransport | None = None,
        max_pending_samples: int = 2_000_000,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        spool: Spool | None = None,
        rng: random.Random | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        ca_bundle: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        if http is None:
            http = http_pool(timeout, ca_bundle=ca_bundle, client_cert=client_cert, client_key=client_key)
        self.url = url.rstrip("/") + "/api/v1/write" if not url.rstrip("/").endswith("/api/v1/write") else url
        self._sender = RemoteWriteSender(self.url, http, user_agent="gpufleet-agent", token=token)
        self.interval = interval
        self._max_pending = max_pending_samples
        self._clock = clock
        self._buffer: list[Snapshot] = []
        # Encoded batches waiting to be sent: (body, sample count, holds an urgent change)
        self._queue: deque[tuple[bytes, int, bool]] = deque()
        self._last_urgent: dict[rw.LabelKey, float] = {}
        self._urgent_keys = _SeriesKeys()  # the sampler's thread
        self._batch_keys = _SeriesKeys()  # the pushing thread
        self._lock = threading.Lock()
        self._flush = threading.Event()
        self._flushed_at = clock()
        self._sampled_at: float | None = None
        self._urgent_pending = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent_samples = 0
        self.failed_pushes = 0
        # Samples given up on, by reason: the collector refused them for good, or over max_pending_samples.
        self.dropped_samples: dict[str, int] = {"refused": 0, "pending_limit": 0}
        self._refusals_logged = LineLimit(clock=clock)  # a line per HTTP status a minute
        self.last_error: str | None = None
        self._failures = 0  # consecutive failed sends; 0 while the collector takes batches
        self._retry_after: float | None = None
        self._retry = RetryPolicy(first_s=min_backoff, max_s=max_backoff, rng=rng or random.Random())
        self._spool = spool

    @property
    def spool(self) -> Spool | None:
        return self._spool

    def __call__(self, snap: Snapshot) -> None:
        """Agent sink: take a snapshot; flag an immediate push if an urgent value changed."""
        urgent = False
        keys = self._urgent_keys
        for fam in snap.families:
            if fam.name not in URGENT:
                continue
            for labels, value in fam.samples:
                key = keys(fam.name, labels)
                if self._last_urgent.get(key) != value:
                    # The first sight of a gauge is not news; a counter's first appearance is (an XID happened).
                    if key in self._last_urgent or fam.kind == "counter":
                        urgent = True
                    self._last_urgent[key] = value
        keys.rotate()
        with self._lock:
            self._buffer.append(snap)
            if urgent:
                self._urgent_pending = True
        # The push is due at the first sample at its time, or a little before it: a sampler's tick comes a few
        # milliseconds early or late, so up to half a sample's spacing, and never more than a twentieth of the
        # interval (pushes come no more often than asked). Wake the pusher now, not on a timer of its own, so a
        # push carries the sample just taken and every push of a steady agent as many samples.
        now = self._clock()
        spacing, self._sampled_at = now - (self._sampled_at or now), now
        early = min(spacing / 2, self.interval / 20)
        if urgent or (not self._failures and now - self._flushed_at + early >= self.interval):
            self._flush.set()

    def pending_samples(self) -> int:
        with self._lock:
            queued = sum(n for _, n, _ in self._queue)
            queued += sum(len(f.samples) for snap in self._buffer for f in snap.families)
        return queued + (self._spool.samples if self._spool is not None else 0)

    def _encode_buffer(self) -> None:
        with self._lock:
            snaps, self._buffer = self._buffer, []
            urgent, self._urgent_pending = self._urgent_pending, False
        if not snaps:
            return
        series: dict[rw.LabelKey, list[tuple[int, float]]] = {}
        meta: dict[str, rw.Metadata] = {}
        keys = self._batch_keys
        # name -> id(label dict) -> the series' samples: a series' key is looked up once a batch, not once a
        # sample. Ids are safe within the batch: every snapshot, so every label dict, is alive until it ends.
        by_dict: dict[str, dict[int, list[tuple[int, float]]]] = {}
        n = 0
        for snap in snaps:
            ts = snap.timestamp_ms
            for fam in snap.families:
                name = fam.name
                of_name = by_dict.get(name)
                if of_name is None:
                    of_name = by_dict[name] = {}
                    meta[name] = rw.Metadata(name, fam.kind, fam.help)
                for labels, value in fam.samples:
                    samples = of_name.get(id(labels))
                    if samples is None:
                        key = keys(name, labels)
                        samples = series.get(key)
                        if samples is None:
                            samples = series[key] = []
                        of_name[id(labels)] = samples
                    samples.append((ts, value))
                n += len(fam.samples)
        keys.rotate()
        body = _encode_keyed(series.items(), meta.values())
        with self._lock:
            self._queue.append((body, n, urgent))
            pending = sum(k for _, k, _ in self._queue)
            while pending > self._max_pending and len(self._queue) > 1:
                _, dropped, _ = self._queue.popleft()
                pending -= dropped
                self.dropped_samples["pending_limit"] += dropped
                log.error(
                    "collector unreachable too long: dropped %d oldest samples (limit %d pending)",
                    dropped,
                    self._max_pending,
                )

    def flush(self) -> bool:
        """Encode what is buffered and send every waiting batch in order: the spool first (urgent batches
        ahead of the rest), then the memory queue. True when nothing is left."""
        self._encode_buffer()
        if self._spool is not None:
            self._spool.expire()
            if len(self._spool):
                # Newer batches go behind the spooled ones (or ahead, if urgent): spool them too.
                self._spill()
            while True:
                entries = self._spool.entries()
                if not entries:
                    break
                entry = entries[0]
                try:
                    body = entry.read()
                except FileNotFoundError:  # dropped by the age or size limit meanwhile
                    continue
                outcome = self._send(body, entry.samples, entry.urgent)
                if outcome == "retry":
                    return False
                self._spool.remove(entry, refused=outcome == "refused")
                if outcome == "ok":
                    self.sent_samples += entry.samples
                else:
                    self.dropped_samples["refused"] += entry.samples
        while True:
            with self._lock:
                if not self._queue:
                    return True
                body, n, urgent = self._queue[0]
            outcome = self._send(body, n, urgent)
            if outcome == "retry":
                if self._spool is not None:
                    self._spill()
                return False
            with self._lock:
                self._queue.popleft()
            if outcome == "ok":
                self.sent_samples += n
            else:
                self.dropped_samples["refused"] += n

    def _spill(self) -> None:
        """Move the memory queue to the spool, in order."""
        assert self._spool is not None
        while True:
            with self._lock:
                if not self._queue:
                    return
                body, n, urgent = self._queue[0]
            try:
                self._spool.put(body, n, urgent)
            except OSError as exc:  # disk full, folder gone: keep the batch in memory, say why once
                msg = f"cannot write to spool {self._spool.dir} ({exc}); batches are kept in memory only"
                if msg != self.last_error:
                    log.error(msg)
                self.last_error = msg
                return
            with self._lock:
                self._queue.popleft()

    def _send(self, body: bytes, n: int, urgent: bool = False) -> str:
        """POST one batch: ``ok``, ``refused`` (a 4xx that retrying cannot fix) or ``retry``."""
        result = self._sender.send(body, urgent=urgent)
        if result.verdict is Verdict.OK:
            if self.last_error:
                log.info("collector at %s accepts samples again", self.url)
            self.last_error = None
            self._failures = 0
            self._retry_after = None
            return "ok"
        self.failed_pushes += 1
        if result.verdict is Verdict.REFUSED:
            # The collector refused this batch for what it is; retrying the same bytes cannot succeed, and
            # the batches behind it go on. A sender whose every batch is refused (its clock far off) would
            # log each one: a line per status a minute, counting the ones held back.
            status = result.status or 0
            held = self._refusals_logged.take(status)
            if held is not None:
                log.error(
                    "collector at %s refused a batch of %d samples (HTTP %d), dropped it: %s%s",
                    self.url,
                    n,
                    status,
                    result.detail,
                    held.since_last("refused batches dropped"),
                )
            return "refused"
        where = f"spooled to {self._spool.dir}" if self._spool is not None else "kept in memory"
        msg = f"cannot push to collector at {self.url} ({result.problem}); samples are {where} and retried"
        if msg != self.last_error:
            log.warning(msg)
        self.last_error = msg
        self._failures += 1
        self._retry_after = result.retry_after_s
        return "retry"

    def next_delay(self) -> float:
        """Seconds until the next try: the push interval, or after a failure the retry policy's backoff with
        jitter (so a thousand agents do not return in step), never sooner than the collector's Retry-After."""
        if not self._failures:
            return self.interval
        return self._retry.delay(self._failures - 1, self._retry_after)

    def run(self) -> None:
        while not self._stop.is_set():
            # While pushes go through the samples say when the next is due (see __call__); the timer stands in
            # when no sample comes, twice the interval after the last push. After a failure it is the backoff.
            self._flush.wait(self.next_delay() + (0.0 if self._failures else self.interval))
            self._flush.clear()
            if self._stop.is_set():
                break
            self._flushed_at = self._clock()
            self.flush()
        if not self.flush() and self._spool is not None:
            self._spill()  # what the collector did not take before shutdown waits on disk for the next start

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
