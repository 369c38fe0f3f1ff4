"""Remote-write out: the collector forwards every batch it has stored to other Prometheus-compatible stores
(Prometheus with --web.enable-remote-write-receiver, Mimir, Thanos Receive, VictoriaMetrics).

Each URL is a target with a bounded queue (samples and bytes) and ``shards`` sender threads, each sending
one request at a time over its own connection, so a slow or dead target never holds up the other targets.
Bodies are forwarded as received (already snappy-compressed remote-write 1.0). A batch is retried on
connection errors, 5xx, 408 and 429 (after the target's Retry-After, else with backoff and jitter); a batch
the target refuses for good (any other 4xx) is dropped, counted and logged.

When a queue is full, ``when_full`` decides. ``block`` (back-pressure): the collector refuses new writes
with 503 + Retry-After *before* storing them (:meth:`Forwarder.backlog`), so agents keep their batches and
send them again; nothing acknowledged is dropped for want of room. ``drop``: writes are stored as usual
and the batches that do not fit are dropped for this target, counted and logged; the collector's own store
never stops for a target that is down.

Order: Prometheus refuses a sample older than its series' newest (unless its TSDB has an
out_of_order_time_window), and refuses the whole request with it (HTTP 400), so a series' batches must
reach a target in the order they were stored. A batch goes to the shard that still holds an unsent batch
with one of its series, else to the shard its first series hashes to; an agent's batches carry the same
series, so they follow each other through one shard. A batch whose series are waiting in several shards
(any client may mix series freely) is sent only after those shards have sent the batches it follows.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.core.metricspec import MetricSpec
from gpufleet.core.remote_write import LabelSet
from gpufleet.core.retry import RetryPolicy, Verdict
from gpufleet.core.sender import HttpTransport, RemoteWriteSender, SendResult, http_pool

log = logging.getLogger(__name__)

WhenFull = Literal["block", "drop"]
WHEN_FULL: tuple[WhenFull, ...] = ("block", "drop")
DEFAULT_MAX_QUEUE_SAMPLES = 5_000_000
DEFAULT_MAX_QUEUE_BYTES = 256 << 20
DEFAULT_SHARDS = 4
# As Prometheus' remote_timeout: a target that pauses (a compaction, a GC) answers late rather than twice.
DEFAULT_TIMEOUT_S = 30.0
# How Prometheus (out of order sample, duplicate sample for timestamp) and Mimir (err-mimir-sample-out-of-order)
# refuse samples older than their series' newest.
_ALREADY_STORED = re.compile(r"out of order|out-of-order|duplicate sample", re.IGNORECASE)
# Series whose last batch is known to a target; past it, those already sent are forgotten.
_MAX_TRACKED_SERIES = 2_000_000
# What a refused write tells its sender to wait: a target that sends is draining its queue within about a
# second; one whose sends fail (down, overloaded) frees nothing until it is back, and the longer it has been
# failing the longer agents wait, so that a long outage does not have every agent resend every few seconds.
_RETRY_AFTER_DRAINING_S = 1
_RETRY_AFTER_FAILING_S = (5, 30)  # at first, at most; a quarter of the time the target has been failing

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_collector_forward_queued_samples",
        "gauge",
        "",
        "Samples stored and waiting to be forwarded to a remote-write target.",
        ("url",),
        "when configured: --forward",
    ),
    MetricSpec(
        "gpufleet_collector_forward_queued_bytes",
        "gauge",
        "bytes",
        "Compressed request bytes waiting to be forwarded to a remote-write target.",
        ("url",),
        "when configured: --forward",
    ),
    MetricSpec(
        "gpufleet_collector_forward_sent_samples_total",
        "counter",
        "",
        "Samples a remote-write target accepted.",
        ("url",),
        "when configured: --forward",
    ),
    MetricSpec(
        "gpufleet_collector_forward_dropped_samples_total",
        "counter",
        "",
        "Samples not forwarded: refused by the target for good (4xx), or no room in the queue "
        "(--forward-when-full drop).",
        ("url", "reason"),
        "when configured: --forward",
    ),
    MetricSpec(
        "gpufleet_collector_forward_failed_sends_total",
        "counter",
        "",
        "Requests to a remote-write target that failed (each retry counts).",
        ("url",),
        "when configured: --forward",
    ),
    MetricSpec(
        "gpufleet_collector_forward_backpressure_writes_total",
        "counter",
        "",
        "Writes refused (503) because a remote-write target's queue was full (--forward-when-full block).",
        ("url",),
        "when configured: --forward",
    ),
    MetricSpec(
        "gpufleet_collector_forward_shards",
        "gauge",
        "",
        "Concurrent connections sending to a remote-write target.",
        ("url",),
        "when configured: --forward",
    ),
)


def display_url(url: str) -> str:
    """``url`` fit for logs, metric labels and answers to agents: no user, password or query (credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class Backlog:
    """Why a write is refused: a target's queue is full (see :meth:`RemoteWriteTarget.backlog`)."""

    message: str
    retry_after_s: int


@dataclass(slots=True)
class _Batch:
    body: bytes
    samples: int
    seq: int  # order of submission to this target
    after: tuple[tuple[int, int], ...]  # (shard, seq): batches of other shards that must be sent first


class RemoteWriteTarget:
    def __init__(
        self,
        url: str,
        *,
        http: HttpTransport | None = None,
        shards: int = DEFAULT_SHARDS,
        max_queue_samples: int = DEFAULT_MAX_QUEUE_SAMPLES,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        when_full: WhenFull = "block",
        headers: dict[str, str] | None = None,
        max_backoff: float = 30.0,
        sleep: Callable[[float], object] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        rng: random.Random | None = None,
        max_tracked_series: int = _MAX_TRACKED_SERIES,
    ) -> None:
        if shards < 1:
            raise ValueError(f"a remote-write target needs at least one shard, not {shards}")
        if when_full not in WHEN_FULL:
            raise ValueError(
                f"when a forward queue is full: one of {', '.join(WHEN_FULL)}, not {when_full!r}"
            )
        self.url = url
        self.display_url = display_url(url)
        # A connection pool per shard: each shard has one request in flight, on its own keep-alive connection.
        self._senders = [
            RemoteWriteSender(
                url,
                http if http is not None else http_pool(timeout),
                user_agent="gpufleet-collector",
                headers=headers,
            )
            for _ in range(shards)
        ]
        self.shards = shards
        self.max_queue_samples = max_queue_samples
        self.max_queue_bytes = max_queue_bytes
        self.when_full: WhenFull = when_full
        self._retry = RetryPolicy(
            first_s=min(0.2, max_backoff), max_s=max_backoff, rng=rng or random.Random()
        )
        self._queues: list[deque[_Batch]] = [deque() for _ in range(shards)]
        self._done = [0] * shards  # seq of the last batch each shard finished with (sent or dropped)
        self._seq = 0
        self._owner: dict[Hashable, tuple[int, int]] = {}  # series -> (shard, seq) of its last batch
        self._max_tracked = self._prune_at = max_tracked_series
        self._queued_samples = 0
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self.sent_samples = 0
        self.dropped: dict[str, int] = {"refused": 0, "queue_full": 0}
        self.failed_sends = 0
        self.backpressure_writes = 0
        self._blocking = False  # writes are being refused for this target's full queue (block mode)
        self._dropping_since_log = 0  # samples dropped for a full queue since the episode began (drop mode)
        self.last_error: str | None = None
        self._failing_since: float | None = None  # monotonic time of the first failed send since one worked
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"forward-{i}-{self.display_url}", daemon=True)
            for i in range(shards)
        ]

    def start(self) -> RemoteWriteTarget:
        for t in self._threads:
            t.start()
        return self

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def dropped_samples(self) -> int:
        return sum(self.dropped.values())

    def _full(self, samples: int, nbytes: int) -> bool:
        """No room for one more batch. An empty queue always takes one, however large: it would never fit."""
        return bool(self._queued_samples) and (
            self._queued_samples + samples > self.max_queue_samples
            or self._queued_bytes + nbytes > self.max_queue_bytes
        )

    def backlog(self, samples: int, nbytes: int) -> Backlog | None:
        """Why a write of ``samples`` in ``nbytes`` must be refused before it is stored (``block``: the queue
        is full), or None. Writes being stored meanwhile still join the queue: it may pass its bound by
        those (at most --max-inflight-writes requests)."""
        if self.when_full != "block":
            return None
        with self._cond:
            if not self._full(samples, nbytes):
                if self._blocking:
                    self._blocking = False
                    log.info("remote-write to %s has room again: writes are taken", self.display_url)
                return None
            self.backpressure_writes += 1
            queued, queued_bytes = self._queued_samples, self._queued_bytes
            failing_since = self._failing_since
            first = not self._blocking
            self._blocking = True
        if first:
            log.warning(
                "remote-write to %s is behind by %d samples, at its queue limit: writes are refused (503) "
                "until it catches up (--forward-when-full block)",
                self.display_url,
                queued,
            )
        if failing_since is None:
            wait, state = _RETRY_AFTER_DRAINING_S, "it is sending"
        else:
            least, most = _RETRY_AFTER_FAILING_S
            failing_s = time.monotonic() - failing_since
            wait, state = min(most, max(least, round(failing_s / 4))), f"its sends fail for {failing_s:.0f} s"
        return Backlog(
            f"not stored: forwarding to {self.display_url} is behind by {queued:,} samples "
            f"({queued_bytes / 1048576:.1f} MiB; {state}), at its queue limit of {self.max_queue_samples:,} "
            f"samples or {self.max_queue_bytes / 1048576:.0f} MiB; retry in {wait} s. The collector's operator "
            "can raise --forward-max-queue-samples / --forward-max-queue-bytes, or set --forward-when-full "
            "drop to keep storing while a target lags",
            wait,
        )

    def submit(self, body: bytes, samples: int, series: Sequence[LabelSet] = ()) -> None:
        """Queue a stored batch. ``series``: its label sets, which keep each series' batches in order."""
        nbytes = len(body)
        keys: list[Hashable] = [ls.key for ls in series] if series else [None]
        with self._cond:
            if self.when_full == "drop" and self._full(samples, nbytes):
                self.dropped["queue_full"] += samples
                if not self._dropping_since_log:
                    log.error(
                        "remote-write to %s is behind by %d samples (queue full); dropping batches for it "
                        "(--forward-when-full drop) until it catches up",
                        self.display_url,
                        self._queued_samples,
                    )
                self._dropping_since_log += samples
                return
            if self._dropping_since_log:
                log.warning(
                    "remote-write to %s has room again; %d samples were dropped for it meanwhile",
                    self.display_url,
                    self._dropping_since_log,
                )
                self._dropping_since_log = 0
            self._seq += 1
            shard, after = self._place(keys, self._seq)
            self._queues[shard].append(_Batch(body, samples, self._seq, after))
            self._queued_samples += samples
            self._queued_bytes += nbytes
            self._cond.notify_all()

    def _place(self, keys: list[Hashable], seq: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The shard for the batch ``seq`` holding series ``keys``, and what it must wait for. Holds the lock."""
        if self.shards == 1:
            return 0, ()
        owner, done = self._owner, self._done
        pending: dict[int, int] = {}
        for mark in set(map(owner.get, keys)):
            if mark is not None and done[mark[0]] < mark[1] and pending.get(mark[0], 0) < mark[1]:
                pending[mark[0]] = mark[1]
        shard = max(pending, key=pending.__getitem__) if pending else hash(keys[0]) % self.shards
        if len(owner) + len(keys) > self._prune_at:
            self._owner = owner = {k: m for k, m in owner.items() if done[m[0]] < m[1]}
            # all of them still waiting: prune again only once as many more have come
            self._prune_at = max(self._max_tracked, 2 * len(owner))
        owner.update(dict.fromkeys(keys, (shard, seq)))
        return shard, tuple((s, q) for s, q in pending.items() if s != shard)

    def _ready(self, batch: _Batch) -> bool:
        return all(self._done[s] >= q for s, q in batch.after)

    def _run(self, shard: int) -> None:
        queue, sender = self._queues[shard], self._senders[shard]
        failures = 0
        unanswered = False  # a try of the batch at the head got no answer: the target may have stored it
        while True:
            with self._cond:
                while not self._stop.is_set() and not (queue and self._ready(queue[0])):
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                batch = queue[0]
            result = sender.send(batch.body)
            verdict, retry_after = self._verdict(result, batch.samples, unanswered)
            if verdict is Verdict.RETRY:
                unanswered = unanswered or not result.status
                self._sleep(self._retry.delay(failures, retry_after))
                failures += 1
                continue
            failures, unanswered = 0, False
            with self._cond:
                queue.popleft()
                self._done[shard] = batch.seq
                self._queued_samples -= batch.samples
                self._queued_bytes -= len(batch.body)
                if verdict is Verdict.OK:
                    self.sent_samples += batch.samples
                else:
                    self.dropped["refused"] += batch.samples
                self._cond.notify_all()

    def _verdict(self, result: SendResult, n: int, unanswered: bool) -> tuple[Verdict, float | None]:
        """What to do with a batch of ``n`` samples after ``result``, logged and counted."""
        if (
            result.verdict is Verdict.REFUSED
            and unanswered
            and result.status == 400
            and _ALREADY_STORED.search(result.detail)
        ):
            # A try that timed out (the target stalled) was stored after all; this one repeats samples that
            # are now no longer the newest of their series, which Prometheus and Mimir refuse as out of order.
            log.info(
                "remote-write target %s refused a batch of %d samples as out of order after an earlier try "
                "got no answer: that try was stored (HTTP %d: %s)",
                self.display_url,
                n,
                result.status,
                result.detail,
            )
            result = SendResult(Verdict.OK, result.status, result.detail)
        if result.verdict is Verdict.OK:
            if self.last_error:
                log.info("remote-write to %s works again", self.display_url)
            self.last_error = None
            self._failing_since = None
            return result.verdict, None
        with self._cond:
            self.failed_sends += 1
            if self._failing_since is None and result.verdict is Verdict.RETRY:
                self._failing_since = time.monotonic()
        if result.verdict is Verdict.REFUSED:
            log.error(
                "remote-write target %s refused a batch of %d samples (HTTP %d: %s); dropped it",
                self.display_url,
                n,
                result.status,
                result.detail,
            )
            return result.verdict, None
        msg = f"cannot remote-write to {self.display_url} ({result.problem}); retrying"
        if msg != self.last_error:
            log.warning(msg)
        self.last_error = msg
        return result.verdict, result.retry_after_s

    def drain(self, timeout: float) -> bool:
        """Wait until the queue is empty (True) or ``timeout`` seconds have passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued_samples and time.monotonic() < deadline:
                self._cond.wait(min(0.5, max(deadline - time.monotonic(), 0.0)))
            return not self._queued_samples

    def stop(self, timeout: float = 5.0) -> None:
        self.drain(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=timeout)
        if self._queued_samples:
            log.error(
                "remote-write to %s stopped with %d samples unsent (within %g s); they are in this "
                "collector's store but not in the target",
                self.display_url,
                self._queued_samples,
                timeout,
            )


class Forwarder:
    """Every stored batch goes to every target."""

    def __init__(
        self,
        urls: list[str],
        *,
        http: HttpTransport | None = None,
        shards: int = DEFAULT_SHARDS,
        max_queue_samples: int = DEFAULT_MAX_QUEUE_SAMPLES,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        when_full: WhenFull = "block",
    ) -> None:
        self.targets = [
            RemoteWriteTarget(
                u,
                http=http,
                shards=shards,
                max_queue_samples=max_queue_samples,
                max_queue_bytes=max_queue_bytes,
                when_full=when_full,
            )
            for u in urls
        ]

    def start(self) -> Forwarder:
        for t in self.targets:
            t.start()
        return self

    def backlog(self, samples: int, nbytes: int) -> Backlog | None:
        """The reason to refuse a write before it is stored: a target whose queue is full (``block``)."""
        for t in self.targets:
            full = t.backlog(samples, nbytes)
            if full is not None:
                return full
        return None

    def submit(self, body: bytes, samples: int, series: Sequence[LabelSet] = ()) -> None:
        for t in self.targets:
            t.submit(body, samples, series)

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued, waiting up to ``timeout`` seconds for all targets together."""
        deadline = time.monotonic() + timeout
        for t in self.targets:
            t.stop(max(deadline - time.monotonic(), 0.1))


class ForwardMetrics(Collector):
    """The forwarder's queues and counters per target, read when /metrics is scraped (see :data:`METRICS`)."""

    def __init__(self, forwarder: Forwarder | None) -> None:
        self._targets = forwarder.targets if forwarder is not None else []

    def collect(self) -> Iterator[Metric]:
        specs = {m.name: m for m in METRICS}

        def family(name: str) -> GaugeMetricFamily | CounterMetricFamily:
            spec = specs[name]
            if spec.kind == "counter":
                return CounterMetricFamily(name.removesuffix("_total"), spec.help, labels=spec.labels)
            return GaugeMetricFamily(name, spec.help, labels=spec.labels)

        queued = family("gpufleet_collector_forward_queued_samples")
        queued_bytes = family("gpufleet_collector_forward_queued_bytes")
        sent = family("gpufleet_collector_forward_sent_samples_total")
        dropped = family("gpufleet_collector_forward_dropped_samples_total")
        failed = family("gpufleet_collector_forward_failed_sends_total")
        refused = family("gpufleet_collector_forward_backpressure_writes_total")
        shards = family("gpufleet_collector_forward_shards")
        for t in self._targets:
            url = [t.display_url]
            queued.add_metric(url, t.queued_samples)
            queued_bytes.add_metric(url, t.queued_bytes)
            sent.add_metric(url, t.sent_samples)
            for reason, n in sorted(t.dropped.items()):
                dropped.add_metric([*url, reason], n)
            failed.add_metric(url, t.failed_sends)
            refused.add_metric(url, t.backpressure_writes)
            shards.add_metric(url, t.shards)
        yield from (queued, queued_bytes, sent, dropped, failed, refused, shards)
