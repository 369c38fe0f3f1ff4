"""The collector's HTTP API (FastAPI): remote-write in, GPUs, ranges, alerts, health and its own metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as RunbookName
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpufleet.collector.admission import (
    Refusal,
    RefusalLog,
    Window,
    check_label_sets,
    check_times,
    time_refusal,
)
from gpufleet.collector.auth import (
    Access,
    RateLimit,
    Refused,
    SampleRate,
    Token,
    TokenSet,
    scope_problem,
    silence_scope_problem,
)
from gpufleet.collector.auth import hash_token as hash_token  # kept importable from here
from gpufleet.collector.fleet import (
    FLEET_AGE,
    FLEET_KEEP_WARM,
    FLEET_MAX_GPUS,
    FLEET_POLL_S,
    GPUS_PAGE,
    JsonBody,
    PerPoll,
    fleet_summary,
    gpus_document,
)
from gpufleet.collector.forward import METRICS as FORWARD_METRICS
from gpufleet.collector.runbooks import CSP, Runbooks
from gpufleet.collector.store import BatchRefused, GpuRecord, Store, StoreUnavailable
from gpufleet.collector.store.ranges import (
    QueryCancel,
    QueryCancelled,
    QueryLimits,
    QueryRefused,
    QueryTimedOut,
)
from gpufleet.collector.store.series_limit import RETRY_AFTER_S as SERIES_LIMIT_RETRY_S
from gpufleet.collector.store.series_limit import RefusalLog as SeriesRefusalLog
from gpufleet.collector.store.series_limit import SeriesLimitExceeded
from gpufleet.core import remote_write as rw
from gpufleet.core.loglines import LineLimit
from gpufleet.core.metricspec import MetricSpec

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"  # the fleet page: static HTML, JS and CSS over this API
MAX_UNIX_S = 1e11  # the year 5138: bounds query times well inside 64-bit milliseconds
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
RUNBOOK_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


@dataclass
class Limits:
    """What one remote-write request may hold; past any of these the whole request is refused (4xx)."""

    max_body_bytes: int = 16 << 20
    max_uncompressed_bytes: int = 64 << 20
    max_series: int = 100_000
    max_samples: int = 2_000_000
    max_labels: int = 40
    max_label_length: int = 2048
    # Writes decoded or stored at once; past it the collector answers 503 + Retry-After, never an endless queue.
    max_inflight_writes: int = 64
    # Sample times taken, around the collector's clock (seconds); max_past None: the raw retention. Outside
    # it, 400: the store would drop such samples uncounted, or make partitions for them that nothing retires.
    max_future: float = 3600.0
    max_past: float | None = None
    # Samples a second one write token may send on average (0: no limit), and how many at once (0: ten seconds'
    # worth); past it, 429 + Retry-After, and the agent sends the batch again then.
    write_rate_limit: float = 0.0
    write_burst: int = 0


# The series Metrics exports, as a running collector's /metrics shows them (a test scrapes one and compares).
OWN_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("gpufleet_collector_samples_received_total", "counter", "", "Samples accepted and stored."),
    MetricSpec(
        "gpufleet_collector_refused_samples_total",
        "counter",
        "",
        "Samples of write requests refused for good (400, 413) before anything was stored, by reason.",
        ("reason",),
        "after an event: a refused write",
    ),
    MetricSpec(
        "gpufleet_collector_write_requests_total",
        "counter",
        "",
        "Remote-write requests by outcome.",
        ("outcome",),
    ),
    MetricSpec(
        "gpufleet_collector_dropped_total",
        "counter",
        "",
        "Parts of accepted requests that cannot be stored.",
        ("what",),
        "after an event: a part dropped",
    ),
    MetricSpec(
        "gpufleet_collector_write_duration_seconds",
        "histogram",
        "seconds",
        "Time to store one request.",
        ("le",),
    ),
    MetricSpec("gpufleet_collector_rule_evaluations", "gauge", "", "Rule evaluations since start."),
    MetricSpec("gpufleet_collector_notifications_sent", "gauge", "", "Notifications sent since start."),
    MetricSpec(
        "gpufleet_collector_leader", "gauge", "", "1 while this collector evaluates rules and notifies."
    ),
    MetricSpec("gpufleet_collector_inflight_writes", "gauge", "", "Writes being decoded or stored now."),
    MetricSpec(
        "gpufleet_collector_query_requests_total",
        "counter",
        "",
        "Range queries by outcome: ok, refused (over a cost limit), timeout, busy, cancelled (the client "
        "left), unavailable (the store).",
        ("outcome",),
        "after an event: a range query",
    ),
    MetricSpec("gpufleet_collector_queries_running", "gauge", "", "Range queries running now."),
    MetricSpec(
        "gpufleet_collector_active_series",
        "gauge",
        "",
        "Series with a sample in the last --series-idle-after, as the limits count them.",
    ),
    MetricSpec(
        "gpufleet_collector_label_sets_cached",
        "gauge",
        "",
        "Label sets of stored series kept decoded and checked, so later writes skip that work (at most "
        "1,000,000, then it starts over).",
    ),
    MetricSpec(
        "gpufleet_collector_series_refused_total",
        "counter",
        "",
        "New series of writes refused with 429 for a limit on active series, by token and limit.",
        ("token", "limit"),
        "after an event: a write refused for its new series",
    ),
    MetricSpec(
        "gpufleet_collector_notifications_failed",
        "gauge",
        "",
        "Notifications a notifier refused for good (not retried), since start.",
    ),
    MetricSpec(
        "gpufleet_collector_notifications_queued", "gauge", "", "Notifications waiting in the send queue."
    ),
    MetricSpec(
        "gpufleet_collector_notification_retries",
        "gauge",
        "",
        "Retries after Slack rate limits (429) and server errors, since start.",
    ),
    *FORWARD_METRICS,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.samples = Counter(
            "gpufleet_collector_samples_received", "Samples accepted and stored.", registry=r
        )
        self.refused = Counter(
            "gpufleet_collector_refused_samples",
            "Samples of write requests refused for good (400, 413) before anything was stored, by reason.",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "gpufleet_collector_write_requests", "Remote-write requests by outcome.", ["outcome"], registry=r
        )
        self.dropped = Counter(
            "gpufleet_collector_dropped",
            "Parts of accepted requests that cannot be stored.",
            ["what"],
            registry=r,
        )
        self.write_seconds = Histogram(
            "gpufleet_collector_write_duration_seconds", "Time to store one request.", registry=r
        )
        self.evaluations = Gauge(
            "gpufleet_collector_rule_evaluations", "Rule evaluations since start.", registry=r
        )
        self.notifications = Gauge(
            "gpufleet_collector_notifications_sent", "Notifications sent since start.", registry=r
        )
        self.leader = Gauge(
            "gpufleet_collector_leader", "1 while this collector evaluates rules and notifies.", registry=r
        )
        self.inflight = Gauge(
            "gpufleet_collector_inflight_writes", "Writes being decoded or stored now.", registry=r
        )
        self.queries = Counter(
            "gpufleet_collector_query_requests",
            "Range queries by outcome: ok, refused (over a cost limit), timeout, busy, cancelled (the client "
            "left), unavailable (the store).",
            ["outcome"],
            registry=r,
        )
        self.queries_running = Gauge(
            "gpufleet_collector_queries_running", "Range queries running now.", registry=r
        )
        self.active_series = Gauge(
            "gpufleet_collector_active_series",
            "Series with a sample in the last --series-idle-after, as the limits count them.",
            registry=r,
        )
        self.label_sets_cached = Gauge(
            "gpufleet_collector_label_sets_cached",
            "Label sets of stored series kept decoded and checked, so later writes skip that work (at most "
            "1,000,000, then it starts over).",
            registry=r,
        )
        self.series_refused = Counter(
            "gpufleet_collector_series_refused",
            "New series of writes refused with 429 for a limit on active series, by token and limit.",
            ["token", "limit"],
            registry=r,
        )
        self.notify_failed = Gauge(
            "gpufleet_collector_notifications_failed",
            "Notifications a notifier refused for good (not retried), since start.",
            registry=r,
        )
        self.notify_queued = Gauge(
            "gpufleet_collector_notifications_queued", "Notifications waiting in the send queue.", registry=r
        )
        self.notify_retries = Gauge(
            "gpufleet_collector_notification_retries",
            "Retries after Slack rate limits (429) and server errors, since start.",
            registry=r,
        )


class ErrorBody(BaseModel):
    error: str


class DetailBody(BaseModel):
    detail: str


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(k[1:]): {"model": ErrorBody, "description": v} for k, v in codes.items()}


WRITE_RESPONSES = {
    204: {"description": "Stored, every sample of it."},
    **_errors(
        e400="Not a valid remote-write body, a series breaks a label rule, a sample is outside the "
        "collector's time window (--max-past, --max-future), or the store cannot hold the data; nothing was "
        "stored: do not send it again.",
        e401="Tokens are configured and the request has none of them.",
        e403="The token is scoped to another cluster than a series carries; nothing was stored.",
        e413="Over a size cap (body, inflated body, series or samples per request); nothing was stored.",
        e429="It would create series past --max-active-series or --max-active-series-per-cluster; nothing "
        "was stored.",
        e503="The store cannot take writes now (database down or busy), or a --forward target's queue is "
        "full; nothing was stored: retry after Retry-After seconds.",
    ),
}
WRITE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A snappy-compressed (block format) protobuf "
        "prometheus.WriteRequest, as remote-write 1.0 sends it.",
        "content": {"application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}},
    }
}


JSON_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
READ_REFUSALS = _errors(
    e401="Tokens are configured and the request has no read or write token of them.",
    e403="The token is scoped to a cluster and the request reaches beyond it.",
)
SILENCE_REFUSALS = _errors(
    e401="Tokens are configured and the request has no write token of them.",
    e403='The token is scoped to a cluster and the silence is not pinned to it (cluster="…"); nothing changed.',
    e429="Over the token's silence changes per minute; retry after Retry-After seconds.",
)
LATEST_MS = 4_102_444_800_000  # 2100-01-01: later times are typing mistakes
SILENCE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["matchers"],
                    "description": "Give `endsAt` (Unix seconds) or `duration` (e.g. 2h).",
                    "properties": {
                        "matchers": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "value"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "value": {"type": "string"},
                                    "isRegex": {"type": "boolean"},
                                    "isEqual": {"type": "boolean"},
                                },
                            },
                        },
                        "startsAt": {"type": "number"},
                        "endsAt": {"type": "number"},
                        "duration": {"type": "string", "example": "2h"},
                        "createdBy": {"type": "string"},
                        "comment": {"type": "string"},
                    },
                }
            }
        },
    }
}


def create_app(
    store: Store,
    *,
    tokens: TokenSet | list[str | Token] | None = None,
    engine: Any = None,
    limits: Limits | None = None,
    on_write: Any = None,
    metrics: Metrics | None = None,
    info: dict | None = None,
    silences: Any = None,
    forwarder: Any = None,
    runbooks: Runbooks | None = None,
    read_tokens: TokenSet | list[str | Token] | None = None,
    silence_changes_per_minute: int = 30,
    fleet_max_gpus: int = FLEET_MAX_GPUS,
    query_limits: QueryLimits | None = None,
) -> FastAPI:
    """The API. ``tokens``: bearer tokens allowed to write (kept only as SHA-256 hashes, optionally scoped
    to a cluster, see :mod:`gpufleet.collector.auth`); none means open. ``read_tokens``: tokens that may
    only read; once any token is configured, reads need one of either kind. /healthz, /metrics, the
    runbooks, the fleet page's files and /openapi.json stay open. ``silence_changes_per_minute``: silences
    one token (or, open, one address) may add or expire per minute; past it, 429.
    ``silences``: where silences live (add_silence, list_silences, expire_silence), for /api/v1/silences.
    ``forwarder``: gets every stored request body (``submit(body, samples, series)``) to remote-write
    onwards; its ``backlog(samples, bytes)`` refuses a write before it is stored while a target is full.
    ``runbooks``: the pages served at /runbooks/ (default: the rule pack's own). ``fleet_max_gpus``: GPUs
    /api/v1/fleet lists (see fleet.py), and the largest page of /api/v1/gpus. ``query_limits``: what one
    /api/v1/query_range may cost, and how many run at once (see ``QueryLimits``)."""
    limits = limits or Limits()
    query_limits = query_limits or QueryLimits()
    # Range queries hold a worker thread each while they run: bounded, so that writes, /api/v1/gpus and
    # /healthz always find threads of the same pool free.
    query_slots = asyncio.Semaphore(query_limits.max_concurrent)
    runbooks = runbooks if runbooks is not None else Runbooks.shipped()
    metrics = metrics or Metrics()
    token_set = tokens if isinstance(tokens, TokenSet) else TokenSet.parse(tokens or [])
    read_set = read_tokens if isinstance(read_tokens, TokenSet) else TokenSet.parse(read_tokens or [])
    access = Access(token_set, read_set)
    silence_rate = RateLimit(silence_changes_per_minute)
    write_rate = (
        SampleRate(limits.write_rate_limit, limits.write_burst or 10 * limits.write_rate_limit)
        if limits.write_rate_limit > 0
        else None
    )
    write_rate_logged = LineLimit()

    def read_scope(request: Request) -> str | None:
        """The cluster a read keeps to (None: every cluster); Refused (401) without a token of ours. A
        dependency of every read, so it runs before the request's parameters are looked at."""
        token = access.reader(request.headers.get("authorization"))
        return token.cluster if token is not None else None

    def silence_changer(request: Request) -> Token | None:
        """The write token adding or expiring a silence (None: writes are open), within its rate."""
        token = access.writer(request.headers.get("authorization"))
        who = (
            token.digest if token is not None else f"address {request.client.host if request.client else '?'}"
        )
        wait = silence_rate.take(who)
        if wait:
            name = token.name if token is not None else who
            raise Refused(
                429,
                f"{name} changed {silence_rate.per_minute} silences in the last minute, the most allowed "
                f"(--max-silence-changes-per-minute); retry in {math.ceil(wait)} s",
                wait,
            )
        return token

    inflight = 0
    known_label_sets = rw.KnownLabelSets()  # label sets of stored requests, decoded and checked once
    metrics.label_sets_cached.set_function(lambda: len(known_label_sets))
    refusals = RefusalLog()
    series_refusals = SeriesRefusalLog()
    active_series = store.ingest.active_series
    if active_series is not None:
        metrics.active_series.set_function(lambda: active_series.total)
    # By default as far back as raw samples are kept: older ones would be dropped unseen at the next pass.
    if limits.max_past is None and store.retention.raw_ms is not None:
        limits = dataclasses.replace(limits, max_past=store.retention.raw_ms / 1000)
    app = FastAPI(
        title="gpufleet collector",
        version="0.1.0",
        description="Receives Prometheus remote-write from gpufleet agents, stores GPU time series, "
        "evaluates alert rules.",
    )
    app.state.metrics = metrics

    def fail(status: int, outcome: str, message: str) -> JSONResponse:
        metrics.requests.labels(outcome).inc()
        return JSONResponse({"error": message}, status_code=status)

    def refuse(refusal: Refusal, samples: int) -> JSONResponse:
        """A request refused for good: counted by reason, logged (a line per reason a minute), answered."""
        metrics.refused.labels(refusal.reason).inc(samples)
        refusals.note(refusal, samples)
        return fail(refusal.status, "too_large" if refusal.status == 413 else "bad_request", refusal.message)

    @app.post(
        "/api/v1/write",
        status_code=204,
        summary="Prometheus remote-write 1.0 receiver",
        responses=WRITE_RESPONSES,
        openapi_extra=WRITE_BODY,
        response_class=Response,
    )
    async def write(request: Request) -> Response:
        nonlocal inflight
        token = token_set.check(request.headers.get("authorization")) if token_set else None
        if token_set and token is None:
            return fail(
                401,
                "unauthorised",
                "missing or wrong bearer token; set the agent's --token "
                "(GPUFLEET_TOKEN) to one of the collector's tokens",
            )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return fail(
                413,
                "too_large",
                f"body of {length} bytes is over the {limits.max_body_bytes}-byte limit; "
                "send smaller batches",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                return fail(
                    413,
                    "too_large",
                    f"body is over the {limits.max_body_bytes}-byte limit; send smaller batches",
                )
        # A slot from here on: decoding a large request costs about as much as storing it.
        if inflight >= limits.max_inflight_writes:
            metrics.requests.labels("busy").inc()
            return JSONResponse(
                {"error": f"collector busy ({inflight} writes being decoded or stored); retry later"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        inflight += 1
        metrics.inflight.set(inflight)
        try:
            return await decode_and_store(request, token, body)
        finally:
            inflight -= 1
            metrics.inflight.set(inflight)

    large_decodes = asyncio.Semaphore(LARGE_DECODES)

    def decode_slot(body: bytearray) -> AbstractAsyncContextManager[object]:
        """Large requests decode one at a time. Decoding is Python holding the interpreter lock: more of them
        at once go no faster, they only take turns with each other and with the event loop (/healthz waited
        1.6 s behind eight 2-million-sample requests decoding in eight threads)."""
        try:
            inflated = rw.uncompressed_length(bytes(body[:10]))
        except rw.RemoteWriteError:  # decode_batch says what is wrong with it
            return contextlib.nullcontext()
        # One over --max-uncompressed-bytes is refused unread: no slot needed for that.
        large = LARGE_DECODE_BYTES <= inflated <= limits.max_uncompressed_bytes
        return large_decodes if large else contextlib.nullcontext()

    def decode_and_check(body: bytes) -> tuple[rw.SeriesBatch, Refusal | None]:
        """Decoding and the checks before storing, in one worker thread's turn: one hop off the event loop
        per write, not one for each."""
        req = rw.decode_batch(body, limits.max_uncompressed_bytes, known_label_sets)
        return req, _validate(req, limits)

    async def decode_and_store(request: Request, token: Token | None, body: bytearray) -> Response:
        """A write from its buffered body on, holding one of the --max-inflight-writes slots. Decoding and
        checking run in a worker thread, so the event loop goes on answering (/healthz) meanwhile."""
        try:
            async with decode_slot(body):
                req, refusal = await run_in_threadpool(decode_and_check, bytes(body))
        except rw.TooLarge as exc:
            return fail(413, "too_large", str(exc))
        except rw.RemoteWriteError as exc:
            return fail(400, "bad_request", str(exc))
        if refusal is not None:
            return refuse(refusal, req.sample_count)
        if token is not None:
            problem = scope_problem(token, (ls.labels for ls in req.label_sets))
            if problem:
                log.warning("refused a write: %s", problem)
                return fail(403, "forbidden", problem)
        if write_rate is not None:  # per token: one client cannot take every other one's share of the CPU
            name = f"token {token.name}" if token is not None else "open writes"
            wait = write_rate.take(name, req.sample_count)
            if wait > 0:
                metrics.requests.labels("rate_limited").inc()
                message = (
                    f"{name} sent more than --write-rate-limit {limits.write_rate_limit:g} samples/s (bursts "
                    f"of {write_rate.burst:g}); nothing was stored, send it again in {wait:.1f} s, or raise "
                    "--write-rate-limit / --write-burst (GPUFLEET_WRITE_RATE_LIMIT, GPUFLEET_WRITE_BURST)"
                )
                held = write_rate_logged.take(name)  # a line a minute per token; the metric counts each
                if held is not None:
                    log.warning("refused a write: %s%s", message, held.since_last("refused"))
                return JSONResponse(
                    {"error": message},
                    status_code=429,
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        # Refused before it is stored, so the agent keeps the batch: a target's forward queue is full.
        backlog = forwarder.backlog(req.sample_count, len(body)) if forwarder is not None else None
        if backlog is not None:
            metrics.requests.labels("forward_backlog").inc()
            return JSONResponse(
                {"error": backlog.message},
                status_code=503,
                headers={"Retry-After": str(backlog.retry_after_s)},
            )
        t0 = time.perf_counter()
        dropped_before = dict(store.dropped)
        try:
            # 204 only after the commit: an agent that got it may forget the batch.
            n = await run_in_threadpool(store.write_batch, req)
        except BatchRefused as exc:  # data past the checks above that the database cannot hold
            return refuse(
                Refusal("store_refused", f"the store cannot hold this batch: {exc}; nothing was stored"),
                req.sample_count,
            )
        except SeriesLimitExceeded as exc:  # refused whole, before anything of it was stored
            name = token.name if token is not None else "open"  # its hash's prefix, never the secret
            series_refusals.note(f"token {name}" if token is not None else "open writes", exc)
            metrics.series_refused.labels(name, exc.flag[2:]).inc(exc.new)
            metrics.requests.labels("series_limit").inc()
            return JSONResponse(
                {"error": exc.message}, status_code=429, headers={"Retry-After": str(SERIES_LIMIT_RETRY_S)}
            )
        except (StoreUnavailable, PoolTimeout) as exc:
            # The driver's words (which may quote SQL) are in the store's log line, never in the answer.
            why = str(exc) if isinstance(exc, StoreUnavailable) else "no database connection free in time"
            log.warning("refusing a write while the store is unavailable: %s", why)
            metrics.requests.labels("unavailable").inc()
            return JSONResponse(
                {"error": f"store unavailable, retry later: {why}"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        # Stored: later requests skip decoding and checking these label sets. Only now, so a refused
        # request (out of scope, over a limit, not held by the database) leaves nothing behind here.
        known_label_sets.admit(req.new)
        metrics.write_seconds.observe(time.perf_counter() - t0)
        metrics.samples.inc(n)
        metrics.requests.labels("ok").inc()
        for what, k in store.dropped.items():
            if k > dropped_before.get(what, 0):
                metrics.dropped.labels(what).inc(k - dropped_before.get(what, 0))
        if forwarder is not None:
            forwarder.submit(bytes(body), req.sample_count, req.label_sets)
        if req.histograms_ignored:
            metrics.dropped.labels("native_histogram").inc(req.histograms_ignored)
            log.warning(
                "%d native histogram samples were not stored: this collector stores float samples only",
                req.histograms_ignored,
            )
        if on_write is not None and request.headers.get("x-gpufleet-urgent"):
            on_write({ls.name for ls in req.label_sets})
        return Response(status_code=204)

    # Both fleet answers come from one read of the store, made at most once a poll interval however many
    # pages and `gpufleet top`s ask, and each is encoded once for all of them; while they are being asked
    # for, they are worked out ahead, so a page's poll does not wait behind writes and rule evaluations;
    # once asked for, they are kept warm (for 1 % of a core at most), so a page opened after a quiet spell
    # answers at once too, with an answer a few seconds old, and its next poll with a fresh one.
    # Both are bounded: /api/v1/gpus answers a page of GPUs at a time (the first page is the one kept), and
    # /api/v1/fleet lists at most fleet_max_gpus GPUs, however many GPUs writers make up.
    fleet_records = PerPoll(store.gpus, FLEET_POLL_S)
    gpus_body = PerPoll(
        lambda: JsonBody(gpus_document(fleet_records.get())),
        FLEET_POLL_S,
        ahead=True,
        keep_warm=FLEET_KEEP_WARM,
    )
    fleet_body = PerPoll(
        lambda: JsonBody(
            fleet_summary(
                fleet_records.get(),
                engine.active_alerts() if engine is not None else [],
                max_gpus=fleet_max_gpus,
            )
        ),
        FLEET_POLL_S,
        ahead=True,
        keep_warm=FLEET_KEEP_WARM,
    )

    app.state.kept_warm = (gpus_body, fleet_body)  # closed with the collector

    def json_answer(request: Request, body: JsonBody) -> Response:
        if "gzip" not in request.headers.get("accept-encoding", ""):
            return Response(body.raw, media_type="application/json", headers={"Vary": "Accept-Encoding"})
        return Response(
            body.gzipped(),
            media_type="application/json",
            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
        )

    # A token scoped to a cluster sees that cluster's GPUs and alerts only, answered once a poll per cluster.
    scoped_bodies: dict[tuple[str, str], PerPoll[JsonBody]] = {}

    def cluster_records(cluster: str) -> list[GpuRecord]:
        return [g for g in fleet_records.get() if g.label("cluster") == cluster]

    def scoped_body(view: Literal["gpus", "fleet"], cluster: str) -> PerPoll[JsonBody]:
        def build() -> JsonBody:
            mine = cluster_records(cluster)
            if view == "gpus":
                return JsonBody(gpus_document(mine))
            active = engine.active_alerts() if engine is not None else []
            return JsonBody(
                fleet_summary(
                    mine,
                    [a for a in active if a["labels"].get("cluster") == cluster],
                    max_gpus=fleet_max_gpus,
                )
            )

        return scoped_bodies.setdefault((view, cluster), PerPoll(build, FLEET_POLL_S, ahead=True))

    @app.get(
        "/api/v1/gpus",
        summary="Every GPU known, with its newest values, a page at a time (follow `next` for the rest)",
        response_class=Response,
        responses={
            200: {
                "description": f"A page of the GPUs in fleet order (cluster, node, GPU index), {FLEET_AGE}: "
                "`gpus`, `total` (all GPUs), `offset`, and `next`, the address of the next page (null on the "
                "last).",
                **JSON_OBJECT,
            },
            **READ_REFUSALS,
        },
    )
    async def gpus(
        request: Request,
        scope: str | None = Depends(read_scope),
        offset: int = Query(0, ge=0, le=2**31, description="GPUs to skip, in fleet order"),
        limit: int = Query(
            GPUS_PAGE, ge=1, le=max(GPUS_PAGE, fleet_max_gpus), description="GPUs in the page at most"
        ),
    ) -> Response:
        if offset == 0 and limit == GPUS_PAGE:  # the page most asked for, kept for every caller
            body = gpus_body if scope is None else scoped_body("gpus", scope)
            return json_answer(request, await run_in_threadpool(body.get))

        def page() -> JsonBody:
            records = fleet_records.get() if scope is None else cluster_records(scope)
            return JsonBody(gpus_document(records, offset, limit))

        return json_answer(request, await run_in_threadpool(page))

    @app.get(
        "/api/v1/query_range",
        summary="One metric over a time range",
        response_class=Response,
        responses={
            200: {
                "description": "Every matching series with values in the range (`data.result`): its labels "
                "(`metric`) and its `[unix_seconds, value]` pairs (`values`).",
                **JSON_OBJECT,
            },
            400: {"model": DetailBody, "description": "Bad metric name, range or step."},
            422: {
                "description": "Over a cost limit: more series than --query-max-series match, or series x "
                "steps (or the samples to read) is over --query-max-samples; the error names the count, the "
                "limit and the fix. Or parameters that are not valid.",
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                {"$ref": "#/components/schemas/ErrorBody"},
                                {"$ref": "#/components/schemas/HTTPValidationError"},
                            ]
                        }
                    }
                },
            },
            503: {
                "model": ErrorBody,
                "description": "--query-max-concurrent range queries are running (retry after Retry-After "
                "seconds), the query ran past --query-timeout and was stopped, or the store is unavailable.",
            },
            **READ_REFUSALS,
        },
    )
    async def query_range(
        request: Request,
        scope: str | None = Depends(read_scope),
        metric: str = Query(pattern=_METRIC_NAME.pattern, max_length=200),
        # found by fuzzing: times past 64-bit milliseconds overflowed into a 500
        start: float = Query(ge=0, le=MAX_UNIX_S, description="Unix seconds"),
        end: float = Query(ge=0, le=MAX_UNIX_S, description="Unix seconds"),
        step: float = Query(15.0, gt=0, le=MAX_UNIX_S, description="Seconds"),
    ) -> Response:
        if not _METRIC_NAME.match(metric):
            raise HTTPException(400, f"metric {metric!r} is not a metric name")
        if end < start:
            raise HTTPException(400, "end is before start")
        if step <= 0 or (end - start) / step > 11_000:
            raise HTTPException(
                400, "step too small for this range: at most 11,000 points per series; raise step"
            )
        matchers = {
            k: v for k, v in request.query_params.items() if k not in ("metric", "start", "end", "step")
        }
        if scope is not None and matchers.setdefault("cluster", scope) != scope:
            raise Refused(
                403, f"this token reads cluster {scope!r} only, not cluster={matchers['cluster']!r}"
            )
        try:
            await asyncio.wait_for(query_slots.acquire(), QUERY_SLOT_WAIT_S)
        except asyncio.TimeoutError:
            metrics.queries.labels("busy").inc()
            raise Refused(
                503,
                f"{query_limits.max_concurrent} range queries are running, the most at once "
                "(--query-max-concurrent); retry in 1 s",
                1,
            ) from None
        cancel = QueryCancel()
        metrics.queries_running.inc()
        try:
            pieces = await _unless_client_leaves(
                request,
                run_in_threadpool(
                    store.query_range_json, metric, matchers, start, end, step, query_limits, cancel
                ),
                cancel,
            )
        except QueryRefused as exc:
            metrics.queries.labels("refused").inc()
            log.info("refused a range query: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=422)
        except QueryTimedOut as exc:
            metrics.queries.labels("timeout").inc()
            log.warning("%s", exc)
            return JSONResponse({"error": str(exc)}, status_code=503)
        except QueryCancelled as exc:
            metrics.queries.labels("cancelled").inc()
            log.info("%s", exc)
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
        except (StoreUnavailable, PoolTimeout) as exc:
            metrics.queries.labels("unavailable").inc()
            log.warning("a range query failed, the store is unavailable: %s", exc)
            return JSONResponse(
                {"error": "store unavailable, retry later"}, status_code=503, headers={"Retry-After": "5"}
            )
        finally:
            query_slots.release()
            metrics.queries_running.dec()
        metrics.queries.labels("ok").inc()
        if sum(map(len, pieces)) < SMALL_ANSWER_BYTES:
            return Response(b"".join(_matrix_parts(pieces)), media_type="application/json")
        return StreamingResponse(_matrix_blocks(pieces), media_type="application/json")

    @app.get("/api/v1/alerts", summary="Alerts pending or firing now", responses=READ_REFUSALS)
    async def alerts(scope: str | None = Depends(read_scope)) -> dict:
        if engine is None:
            return {"alerts": []}
        return {
            "alerts": [
                {
                    "rule": a["rule"],
                    "state": a["state"],
                    "labels": a["labels"],
                    "annotations": a["annotations"],
                    "value": a["value"],
                    "active_since": a["active_since"] / 1000.0,
                    "muted_by": a.get("muted_by"),
                }
                for a in engine.active_alerts()
                if scope is None or a["labels"].get("cluster") == scope
            ]
        }

    @app.get(
        "/api/v1/silences",
        summary="Every silence: active, pending, expired and disabled (a stored regex this version refuses)",
        responses=READ_REFUSALS,
    )
    async def list_silences(scope: str | None = Depends(read_scope)) -> dict:
        if silences is None:
            return {"silences": []}
        now = int(time.time() * 1000)
        return {
            "silences": [
                s.to_api(now)
                for s in await run_in_threadpool(silences.list_silences)
                if scope is None or s.pins("cluster", scope)
            ]
        }

    @app.post(
        "/api/v1/silences",
        summary="Add a silence: matchers, endsAt (or duration), createdBy, comment",
        status_code=201,
        openapi_extra=SILENCE_BODY,
        responses={
            201: {"description": "The silence, with its id."},
            **_errors(
                e400="Not a valid silence (body, matchers, regexes or times); nothing was added.",
                e404="This collector keeps no silences.",
            ),
            **SILENCE_REFUSALS,
        },
    )
    async def add_silence(request: Request) -> JSONResponse:
        token = silence_changer(request)
        if silences is None:
            return JSONResponse({"error": "this collector keeps no silences"}, status_code=404)
        from gpufleet.collector.rules.dispatch import Matcher, Silence
        from gpufleet.collector.rules.model import parse_duration

        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            now = int(time.time() * 1000)
            matchers = body.get("matchers")
            if not isinstance(matchers, list):
                raise ValueError("'matchers' must be a list of {name, value, isRegex, isEqual}")
            starts = int(float(body.get("startsAt", now / 1000)) * 1000)
            if "endsAt" in body:
                ends = int(float(body["endsAt"]) * 1000)
            elif "duration" in body:
                ends = starts + int(parse_duration(body["duration"]) * 1000)
            else:
                raise ValueError("give 'endsAt' (Unix seconds) or 'duration' (e.g. 2h)")
            if not (0 <= starts < ends <= LATEST_MS):
                raise ValueError(
                    "startsAt must come before endsAt, both between 1970 and 2100 (Unix seconds)"
                )
            s = Silence.new(
                [Matcher.from_api(m) for m in matchers],
                starts,
                ends,
                str(body.get("createdBy", "")),
                str(body.get("comment", "")),
                now,
            )
            json.dumps(s.to_api()).encode("utf-8")  # lone surrogates cannot be stored (found by schemathesis)
        except (ValueError, OverflowError) as exc:  # json.JSONDecodeError, UnicodeEncodeError are ValueErrors
            return JSONResponse({"error": f"bad silence: {exc}"}, status_code=400)
        problem = silence_scope_problem(token, s.matchers)
        if problem:
            log.warning("refused a silence: %s", problem)
            raise Refused(403, problem)
        await run_in_threadpool(silences.add_silence, s)
        log.info("silence %s added by %s until %s: %s", s.id, s.created_by, s.ends_at_ms, s.comment)
        return JSONResponse({"silenceID": s.id, "silence": s.to_api()}, status_code=201)

    @app.delete(
        "/api/v1/silences/{silence_id}",
        summary="Expire a silence now",
        responses={
            200: {"description": "The silence, now expired."},
            **_errors(e404="No such silence, or this collector keeps no silences."),
            **SILENCE_REFUSALS,
        },
    )
    async def expire_silence(silence_id: str, request: Request) -> JSONResponse:
        token = silence_changer(request)
        if silences is None:
            return JSONResponse({"error": "this collector keeps no silences"}, status_code=404)
        if token is not None and token.cluster is not None:
            found = await run_in_threadpool(silences.get_silence, silence_id)
            if found is not None and not found.pins("cluster", token.cluster):
                raise Refused(
                    403,
                    f"token {token.name} is scoped to cluster {token.cluster!r} and may only expire silences "
                    f'pinned to it (cluster="{token.cluster}"); silence {silence_id} is not. Nothing changed',
                )
        s = await run_in_threadpool(silences.expire_silence, silence_id, int(time.time() * 1000))
        if s is None:
            return JSONResponse(
                {"error": f"no silence {silence_id}; list them with GET /api/v1/silences"}, status_code=404
            )
        return JSONResponse({"silence": s.to_api()})

    @app.get(
        "/api/v1/fleet",
        summary="Every GPU by node with its key numbers, each node's worst GPU, active alerts, fleet totals",
        response_class=Response,
        responses={
            200: {
                "description": f"The fleet, {FLEET_AGE}. Past --fleet-max-gpus GPUs its lists are "
                "cut (the totals count every GPU) and `truncated` says what was left out.",
                **JSON_OBJECT,
            },
            **READ_REFUSALS,
        },
    )
    async def fleet(request: Request, scope: str | None = Depends(read_scope)) -> Response:
        body = fleet_body if scope is None else scoped_body("fleet", scope)
        return json_answer(request, await run_in_threadpool(body.get))

    @app.get(
        "/api/v1/report",
        summary="Efficiency report over a time range (GPU-hours by state, waste, throttling, errors, energy)",
        responses={
            200: {
                "description": "The report as JSON, Markdown or HTML (`format`).",
                "content": {"application/json": {}, "text/markdown": {}, "text/html": {}},
            },
            400: {"model": DetailBody, "description": "`since`/`until` do not make a range."},
            **READ_REFUSALS,
        },
    )
    async def report(
        scope: str | None = Depends(read_scope),
        since: str = "7d",
        until: float | None = None,
        format: Literal["json", "markdown", "html"] = "json",
    ) -> Response:
        from gpufleet.collector.report import ReportError, build_report, parse_since, render

        if scope is not None:
            raise Refused(
                403,
                f"the report covers every cluster, and this token reads cluster {scope!r} only; use a token "
                "not scoped to a cluster",
            )

        try:
            start, end = parse_since(since, until)
        except ReportError as exc:
            raise HTTPException(400, str(exc)) from None
        rep = await run_in_threadpool(build_report, store.engine, start, end)
        if format == "json":
            return JSONResponse(rep.to_dict())
        body = render(rep, format)
        return HTMLResponse(body) if format == "html" else PlainTextResponse(body, media_type="text/markdown")

    @app.get(
        "/runbooks/",
        summary="Every runbook the collector serves",
        response_class=HTMLResponse,
        responses={
            200: {
                "description": "An HTML page linking each runbook by its title.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    )
    async def runbook_index() -> HTMLResponse:
        return HTMLResponse(runbooks.index_page(), headers=RUNBOOK_HEADERS)

    # The name is only ever looked up among the runbook files, never used as a path.
    @app.get(
        "/runbooks/{name}",
        summary="One runbook (rendered from its Markdown) by name, e.g. xid-critical",
        response_class=HTMLResponse,
        responses={
            200: {
                "description": "The runbook as a self-contained HTML page.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            },
            404: {
                "description": "No runbook of that name; the page lists those there are.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            },
        },
    )
    async def runbook(
        name: str = RunbookName(
            description="The runbook's file name without .md: lower-case words joined by hyphens.",
            examples=["xid-critical"],
        ),
    ) -> HTMLResponse:
        page = runbooks.page(name)
        if page is None:
            return HTMLResponse(runbooks.not_found_page(name), status_code=404, headers=RUNBOOK_HEADERS)
        return HTMLResponse(page, headers=RUNBOOK_HEADERS)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException) -> Response:
        # Paths under /runbooks/ the route does not match (slashes, %2F, a newline: found by schemathesis) get
        # the same HTML page as an unknown name, not the router's JSON.
        prefix = "/runbooks/"
        if exc.status_code == 404 and request.url.path.startswith(prefix):
            return HTMLResponse(
                runbooks.not_found_page(request.url.path[len(prefix) :]),
                status_code=404,
                headers=RUNBOOK_HEADERS,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.retry_after_s:
            headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/", include_in_schema=False)
    async def fleet_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get(
        "/healthz",
        summary="Liveness and readiness",
        responses={
            200: {"description": "Up, and the store answers."},
            503: {"description": "Up, but the store does not answer (body says why)."},
        },
    )
    async def healthz() -> JSONResponse:
        body = {"ok": True, **(info or {})}
        try:
            await run_in_threadpool(store.ping)
        except Exception as exc:
            body.update(ok=False, store_error=str(exc))
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get(
        "/metrics",
        summary="The collector's own metrics (Prometheus text format)",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def own_metrics() -> Response:
        if engine is not None:
            metrics.evaluations.set(engine.evaluations)
            metrics.notifications.set(engine.sent)
            metrics.notify_failed.set(engine.send_failures)
            metrics.notify_queued.set(engine.queue.pending())
            metrics.notify_retries.set(engine.queue.retries)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# Requests that inflate to this size or more decode LARGE_DECODES at a time (an agent's push is ~100 KiB).
LARGE_DECODE_BYTES = 4 << 20
LARGE_DECODES = 1
QUERY_SLOT_WAIT_S = 2.0  # a range query waits this long for a slot: a page's burst of queries, not an attack
SMALL_ANSWER_BYTES = 1 << 20  # answers up to this size go in one piece, with Content-Length
_T = TypeVar("_T")


async def _unless_client_leaves(request: Request, work: Awaitable[_T], cancel: QueryCancel) -> _T:
    """``work``'s result; if the client hangs up first, ``cancel`` stops it, the database's part included,
    and QueryCancelled comes out of ``work``."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await run_in_threadpool(cancel.cancel)
        return await task
    finally:
        gone.cancel()
        del task  # it holds the exception, whose traceback holds this frame: a cycle only a collection breaks


async def _hung_up(request: Request) -> None:
    """Returns when the client has closed the connection (a GET's body is empty: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _matrix_parts(pieces: list[bytes]) -> list[bytes]:
    return [b'{"status":"success","data":{"resultType":"matrix","result":[', b",".join(pieces), b"]}}"]


async def _matrix_blocks(pieces: list[bytes]) -> AsyncIterator[bytes]:
    """A large range answer from its series' JSON, in blocks of about 64 KiB as the client takes them: each
    series' text is let go once sent, and none is copied whole again."""
    yield b'{"status":"success","data":{"resultType":"matrix","result":['
    pieces.reverse()
    block = bytearray()
    while pieces:
        block += pieces.pop()
        if pieces:
            block += b","
        if len(block) >= 1 << 16:
            yield bytes(block)
            block.clear()
    yield bytes(block) + b"]}}"


def _validate(req: rw.SeriesBatch, limits: Limits, now_ms: int | None = None) -> Refusal | None:
    """The first reason to refuse the whole request, or None (see :mod:`gpufleet.collector.admission`). Runs
    before anything is stored. Label sets accepted before passed these checks then, so only the request's
    new ones are checked; sample times are checked on every request."""
    if len(req.label_sets) > limits.max_series:
        return Refusal(
            "too_many_series",
            f"too many series: {len(req.label_sets)} in one request, over the limit of {limits.max_series}; "
            "send smaller batches",
            413,
        )
    n = req.sample_count
    if n > limits.max_samples:
        return Refusal(
            "too_many_samples",
            f"too many samples: {n} in one request, over the limit of {limits.max_samples}; send smaller batches",
            413,
        )
    refusal = check_label_sets(
        req.new.values(), max_labels=limits.max_labels, max_label_length=limits.max_label_length
    )
    if refusal is not None:
        return refusal
    window = Window(limits.max_future, limits.max_past)
    lo, hi = window.bounds(now_ms if now_ms is not None else int(time.time() * 1000))
    at = check_times(req.timestamps, lo, hi)
    if at is not None:
        return time_refusal(req.label_sets[at], req.timestamps[at], lo, hi, window)
    return None
