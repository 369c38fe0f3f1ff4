"""The collector's HTTP API (FastAPI): remote-write in, GPUs, ranges, alerts, health and its own metrics."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from collector.store import Store, StoreUnavailable
from gpufleet import remote_write as rw

log = logging.getLogger(__name__)

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


class Limits:
    max_body_bytes = 16 << 20
    max_uncompressed_bytes = 64 << 20
    max_series = 100_000
    max_labels = 40
    max_label_length = 2048


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.samples = Counter("gpufleet_collector_samples_received", "Samples accepted and stored.", registry=r)
        self.requests = Counter("gpufleet_collector_write_requests", "Remote-write requests by outcome.",
                                ["outcome"], registry=r)
        self.dropped = Counter("gpufleet_collector_dropped", "Parts of accepted requests that cannot be stored.",
                               ["what"], registry=r)
        self.write_seconds = Histogram("gpufleet_collector_write_duration_seconds", "Time to store one request.",
                                       registry=r)
        self.evaluations = Gauge("gpufleet_collector_rule_evaluations", "Rule evaluations since start.", registry=r)
        self.notifications = Gauge("gpufleet_collector_notifications_sent", "Notifications sent since start.",
                                   registry=r)
        self.notify_failed = Gauge("gpufleet_collector_notifications_failed",
                                   "Notifications a notifier refused for good (not retried), since start.", registry=r)
        self.notify_queued = Gauge("gpufleet_collector_notifications_queued",
                                   "Messages waiting in the per-channel Slack send queues.", registry=r)
        self.notify_retries = Gauge("gpufleet_collector_notification_retries",
                                    "Retries after Slack rate limits (429) and server errors, since start.", registry=r)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_app(store: Store, *, tokens: list[str] | None = None, engine: Any = None, limits: Limits | None = None,
               on_write: Any = None, metrics: Metrics | None = None, info: dict | None = None,
               silences: Any = None) -> FastAPI:
    """The API. ``tokens``: bearer tokens allowed to write (kept only as SHA-256 hashes); none means open.
    ``silences``: where silences live (add_silence, list_silences, expire_silence), for /api/v1/silences."""
    limits = limits or Limits()
    metrics = metrics or Metrics()
    token_hashes = [hash_token(t) for t in tokens or []]
    app = FastAPI(title="gpufleet collector", version="0.1.0",
                  description="Receives Prometheus remote-write from gpufleet agents, stores GPU time series, "
                              "evaluates alert rules.")
    app.state.metrics = metrics

    def authorised(request: Request) -> bool:
        if not token_hashes:
            return True
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return False
        offered = hash_token(header[7:].strip())
        ok = False
        for h in token_hashes:  # compare with every hash, in constant time, whatever matches first
            ok |= hmac.compare_digest(offered, h)
        return ok

    def fail(status: int, outcome: str, message: str) -> JSONResponse:
        metrics.requests.labels(outcome).inc()
        return JSONResponse({"error": message}, status_code=status)

    @app.post("/api/v1/write", status_code=204, summary="Prometheus remote-write 1.0 receiver")
    async def write(request: Request) -> Response:
        if not authorised(request):
            return fail(401, "unauthorised", "missing or wrong bearer token; set the agent's --token "
                        "(GPUFLEET_TOKEN) to one of the collector's tokens")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return fail(413, "too_large", f"body of {length} bytes is over the {limits.max_body_bytes}-byte limit; "
                        "send smaller batches")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                return fail(413, "too_large", f"body is over the {limits.max_body_bytes}-byte limit; send smaller batches")
        try:
            req = rw.decode(bytes(body), limits.max_uncompressed_bytes)
        except rw.TooLarge as exc:
            return fail(413, "too_large", str(exc))
        except rw.RemoteWriteError as exc:
            return fail(400, "bad_request", str(exc))
        problem = _validate(req, limits)
        if problem:
            return fail(400, "bad_request", problem)
        t0 = time.perf_counter()
        try:
            n = await run_in_threadpool(store.write, req.series)
        except StoreUnavailable as exc:
            log.warning("refusing a write while the store is unavailable: %s", exc)
            metrics.requests.labels("unavailable").inc()
            return JSONResponse({"error": f"store unavailable, retry later: {exc}"}, status_code=503,
                                headers={"Retry-After": "5"})
        metrics.write_seconds.observe(time.perf_counter() - t0)
        metrics.samples.inc(n)
        metrics.requests.labels("ok").inc()
        if req.histograms_ignored:
            metrics.dropped.labels("native_histogram").inc(req.histograms_ignored)
            log.warning("%d native histogram samples were not stored: this collector stores float samples only",
                        req.histograms_ignored)
        if on_write is not None and request.headers.get("x-gpufleet-urgent"):
            on_write({s.name for s in req.series})
        return Response(status_code=204)

    @app.get("/api/v1/gpus", summary="Every GPU known, with its newest values")
    async def gpus() -> dict:
        return {"gpus": await run_in_threadpool(store.gpus)}

    @app.get("/api/v1/query_range", summary="One metric over a time range")
    async def query_range(request: Request, metric: str, start: float, end: float, step: float = 15.0) -> dict:
        if not _METRIC_NAME.match(metric):
            raise HTTPException(400, f"metric {metric!r} is not a metric name")
        if end < start:
            raise HTTPException(400, "end is before start")
        if step <= 0 or (end - start) / step > 11_000:
            raise HTTPException(400, "step too small for this range: at most 11,000 points per series; raise step")
        matchers = {k: v for k, v in request.query_params.items() if k not in ("metric", "start", "end", "step")}
        result = await run_in_threadpool(store.query_range, metric, matchers, start, end, step)
        return {"status": "success", "data": {"resultType": "matrix", "result": result}}

    @app.get("/api/v1/alerts", summary="Alerts pending or firing now")
    async def alerts() -> dict:
        if engine is None:
            return {"alerts": []}
        return {"alerts": [{"rule": a["rule"], "state": a["state"], "labels": a["labels"],
                            "annotations": a["annotations"], "value": a["value"],
                            "active_since": a["active_since"] / 1000.0, "muted_by": a.get("muted_by")}
                           for a in engine.active_alerts()]}

    @app.get("/api/v1/silences", summary="Every silence: active, pending and expired")
    async def list_silences() -> dict:
        if silences is None:
            return {"silences": []}
        now = int(time.time() * 1000)
        return {"silences": [s.to_api(now) for s in await run_in_threadpool(silences.list_silences)]}

    @app.post("/api/v1/silences", summary="Add a silence: matchers, endsAt (or duration), createdBy, comment")
    async def add_silence(request: Request) -> JSONResponse:
        if not authorised(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        if silences is None:
            return JSONResponse({"error": "this collector keeps no silences"}, status_code=404)
        from collector.rules.dispatch import Matcher, Silence
        from collector.rules.model import parse_duration

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
            s = Silence.new([Matcher.from_api(m) for m in matchers], starts, ends, str(body.get("createdBy", "")),
                            str(body.get("comment", "")), now)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return JSONResponse({"error": f"bad silence: {exc}"}, status_code=400)
        await run_in_threadpool(silences.add_silence, s)
        log.info("silence %s added by %s until %s: %s", s.id, s.created_by, s.ends_at_ms, s.comment)
        return JSONResponse({"silenceID": s.id, "silence": s.to_api()}, status_code=201)

    @app.delete("/api/v1/silences/{silence_id}", summary="Expire a silence now")
    async def expire_silence(silence_id: str, request: Request) -> JSONResponse:
        if not authorised(request):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        if silences is None:
            return JSONResponse({"error": "this collector keeps no silences"}, status_code=404)
        s = await run_in_threadpool(silences.expire_silence, silence_id, int(time.time() * 1000))
        if s is None:
            return JSONResponse({"error": f"no silence {silence_id}; list them with GET /api/v1/silences"},
                                status_code=404)
        return JSONResponse({"silence": s.to_api()})

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz() -> JSONResponse:
        body = {"ok": True, **(info or {})}
        try:
            await run_in_threadpool(store.counts)
        except Exception as exc:
            body.update(ok=False, store_error=str(exc))
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics", summary="The collector's own metrics (Prometheus text format)")
    async def own_metrics() -> Response:
        if engine is not None:
            metrics.evaluations.set(engine.evaluations)
            metrics.notifications.set(engine.sent)
            queues = [n.queue for n in getattr(engine, "notifiers", []) if hasattr(n, "queue")]
            metrics.notify_failed.set(engine.send_failures + sum(q.failed for q in queues))
            metrics.notify_queued.set(sum(q.pending() for q in queues))
            metrics.notify_retries.set(sum(q.retries for q in queues))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _validate(req: rw.WriteRequest, limits: Limits) -> str | None:
    if len(req.series) > limits.max_series:
        return f"{len(req.series)} series in one request, over the limit of {limits.max_series}; send smaller batches"
    for s in req.series:
        if not s.labels.get("__name__"):
            return f"a series has no __name__ label (labels {dict(list(s.labels.items())[:5])})"
        if len(s.labels) > limits.max_labels:
            return f"series {s.name} has {len(s.labels)} labels, over the limit of {limits.max_labels}"
        for k, v in s.labels.items():
            if not _LABEL_NAME.match(k) and k != "__name__":
                return f"series {s.name}: {k!r} is not a valid label name"
            if len(v) > limits.max_label_length:
                return f"series {s.name}: label {k} is {len(v)} characters, over the limit of {limits.max_label_length}"
    return None
