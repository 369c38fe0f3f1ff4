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


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_app(store: Store, *, tokens: list[str] | None = None, engine: Any = None, limits: Limits | None = None,
               on_write: Any = None, metrics: Metrics | None = None, info: dict | None = None,
               forwarder: Any = None) -> FastAPI:
    """The API. ``tokens``: bearer tokens allowed to write (kept only as SHA-256 hashes); none means open.
    ``forwarder``: gets every stored request body (``submit(body, samples)``) to remote-write onwards."""
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
        dropped_before = dict(store.dropped)
        try:
            # 204 only after the commit: an agent that got it may forget the batch.
            n = await run_in_threadpool(store.write, req.series)
        except StoreUnavailable as exc:
            log.warning("refusing a write while the store is unavailable: %s", exc)
            metrics.requests.labels("unavailable").inc()
            return JSONResponse({"error": f"store unavailable, retry later: {exc}"}, status_code=503,
                                headers={"Retry-After": "5"})
        metrics.write_seconds.observe(time.perf_counter() - t0)
        metrics.samples.inc(n)
        metrics.requests.labels("ok").inc()
        for what, k in store.dropped.items():
            if k > dropped_before.get(what, 0):
                metrics.dropped.labels(what).inc(k - dropped_before.get(what, 0))
        if forwarder is not None:
            forwarder.submit(bytes(body), n)
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
                            "active_since": a["active_since"] / 1000.0} for a in engine.active_alerts()]}

    @app.get("/healthz", summary="Liveness and readiness")
    async def healthz() -> JSONResponse:
        body = {"ok": True, **(info or {})}
        try:
            await run_in_threadpool(store.ping)
        except Exception as exc:
            body.update(ok=False, store_error=str(exc))
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics", summary="The collector's own metrics (Prometheus text format)")
    async def own_metrics() -> Response:
        if engine is not None:
            metrics.evaluations.set(engine.evaluations)
            metrics.notifications.set(engine.sent)
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
