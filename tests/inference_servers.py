"""Inference servers' metrics pages as the real servers write them, served over HTTP from a thread.

The names, types, labels and bucket layouts are the servers' own (see agent/inference/servers.py for the
sources). vLLM is built with prometheus_client, as vLLM itself is; Triton's page is prometheus-cpp's text
format (counters without ``_total``); TGI's is metrics-exporter-prometheus' (likewise).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

VLLM_TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
VLLM_ITL_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
VLLM_REQUEST_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
TRITON_FIRST_RESPONSE_BUCKETS_MS = [100, 500, 2000, 5000]
TGI_DURATION_BUCKETS = [0.0001 * 1.5 ** (i + 1) for i in range(35)]


class MetricsServer:
    """Serves ``render()`` at /metrics on a free loopback port until ``close()``."""

    def __init__(self, render: Callable[[], str], port: int = 0) -> None:
        self.render = render
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = outer.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class VllmMetrics:
    """vLLM v1's PrometheusStatLogger families (labels model_name, engine)."""

    def __init__(
        self, model: str, engines: int = 1, reasons: tuple[str, ...] = ("stop", "length", "abort", "error")
    ) -> None:
        self.registry = CollectorRegistry()
        r, ln = self.registry, ["model_name", "engine"]
        self.model, self.engines = model, engines
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            ln,
            buckets=VLLM_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            ln,
            buckets=VLLM_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ln,
            buckets=VLLM_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ln,
            buckets=VLLM_ITL_BUCKETS,
            registry=r,
        )
        self.prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ln, registry=r)
        self.generation = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", ln, registry=r
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ln + ["finished_reason"],
            registry=r,
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", ln, registry=r
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", ln, registry=r
        )
        self.kv = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", ln, registry=r
        )
        for e in range(engines):
            for reason in reasons:  # v1 shows every reason from the start; v0 had no "error" reason
                self.success.labels(model, str(e), reason)

    def request(
        self,
        e2e: float,
        *,
        ttft: float,
        itl: list[float],
        queue: float,
        prompt_tokens: int,
        engine: int = 0,
        reason: str = "stop",
    ) -> None:
        labels = (self.model, str(engine))
        self.e2e.labels(*labels).observe(e2e)
        self.queue.labels(*labels).observe(queue)
        self.ttft.labels(*labels).observe(ttft)
        for x in itl:
            self.itl.labels(*labels).observe(x)
        self.prompt.labels(*labels).inc(prompt_tokens)
        self.generation.labels(*labels).inc(len(itl) + 1)
        self.success.labels(*labels, reason).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def _cumulative(bounds: list[float], values: list[float]) -> list[tuple[str, int]]:
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    out, total = [], 0
    for b, c in zip([*bounds, math.inf], counts, strict=True):
        total += c
        out.append(("+Inf" if b == math.inf else repr(float(b)), total))
    return out


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(math.ceil(q * len(s)) - 1, 0)]


class TritonMetrics:
    """Triton's per-model families: counters, summaries (summary_latencies=true), first-response histogram."""

    def __init__(self, model: str, version: str = "1") -> None:
        self.labels = f'model="{model}",version="{version}"'
        self.success = self.failure_backend = self.failure_rejected = self.inferences = 0
        self.request_us = self.queue_us = self.compute_us = 0.0
        self.request_all: list[float] = []
        self.queue_all: list[float] = []
        self.first_response_ms: list[float] = []
        self.pending = 0

    def request(
        self, request_s: float, queue_s: float, compute_s: float, first_response_s: float, batch: int = 1
    ) -> None:
        self.success += 1
        self.inferences += batch
        self.request_us += request_s * 1e6
        self.queue_us += queue_s * 1e6
        self.compute_us += compute_s * 1e6
        self.request_all.append(request_s * 1e6)
        self.queue_all.append(queue_s * 1e6)
        self.first_response_ms.append(first_response_s * 1e3)

    def render(self) -> str:
        lab = self.labels
        lines = [
            "# HELP nv_inference_request_success Number of successful inference requests, all batch sizes",
            "# TYPE nv_inference_request_success counter",
            f"nv_inference_request_success{{{lab}}} {self.success}",
            "# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes",
            "# TYPE nv_inference_request_failure counter",
            f'nv_inference_request_failure{{{lab},reason="REJECTED"}} {self.failure_rejected}',
            f'nv_inference_request_failure{{{lab},reason="CANCELED"}} 0',
            f'nv_inference_request_failure{{{lab},reason="BACKEND"}} {self.failure_backend}',
            f'nv_inference_request_failure{{{lab},reason="OTHER"}} 0',
            "# HELP nv_inference_count Number of inferences performed (does not include cached requests)",
            "# TYPE nv_inference_count counter",
            f"nv_inference_count{{{lab}}} {self.inferences}",
            "# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds",
            "# TYPE nv_inference_request_duration_us counter",
            f"nv_inference_request_duration_us{{{lab}}} {self.request_us:.0f}",
            "# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds",
            "# TYPE nv_inference_queue_duration_us counter",
            f"nv_inference_queue_duration_us{{{lab}}} {self.queue_us:.0f}",
            "# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds",
            "# TYPE nv_inference_compute_infer_duration_us counter",
            f"nv_inference_compute_infer_duration_us{{{lab}}} {self.compute_us:.0f}",
            "# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution",
            "# TYPE nv_inference_pending_request_count gauge",
            f"nv_inference_pending_request_count{{{lab}}} {self.pending}",
        ]
        for family, values in (
            ("nv_inference_request_summary_us", self.request_all),
            ("nv_inference_queue_summary_us", self.queue_all),
        ):
            lines += [
                f"# HELP {family} Summary of inference durations in microseconds",
                f"# TYPE {family} summary",
                f"{family}_count{{{lab}}} {len(values)}",
                f"{family}_sum{{{lab}}} {sum(values):.0f}",
            ]
            for q in (0.5, 0.9, 0.95, 0.99, 0.999):
                v = _quantile(values, q) if values else float("nan")
                lines.append(f'{family}{{{lab},quantile="{q}"}} {v}')
        fam = "nv_inference_first_response_histogram_ms"
        lines += [
            f"# HELP {fam} Duration from request to first response in milliseconds",
            f"# TYPE {fam} histogram",
        ]
        for le, n in _cumulative(TRITON_FIRST_RESPONSE_BUCKETS_MS, self.first_response_ms):
            lines.append(f'{fam}_bucket{{{lab},le="{le}"}} {n}')
        lines += [
            f"{fam}_sum{{{lab}}} {sum(self.first_response_ms)}",
            f"{fam}_count{{{lab}}} {len(self.first_response_ms)}",
        ]
        return "\n".join(lines) + "\n"


class TgiMetrics:
    """TGI router families (metrics-exporter-prometheus: no labels on these, counters without _total)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.queues: list[float] = []
        self.per_token: list[float] = []
        self.generated: list[float] = []
        self.failures = 0
        self.queue_size = 0

    def request(self, duration: float, queue: float, per_token: float, tokens: int) -> None:
        self.durations.append(duration)
        self.queues.append(queue)
        self.per_token.append(per_token)
        self.generated.append(tokens)

    def render(self) -> str:
        lines = [
            "# TYPE tgi_request_count counter",
            f"tgi_request_count {len(self.durations) + self.failures}",
            "# TYPE tgi_request_success counter",
            f"tgi_request_success {len(self.durations)}",
        ]
        if self.failures:
            lines += [
                "# TYPE tgi_request_failure counter",
                f'tgi_request_failure{{err="generation"}} {self.failures}',
            ]
        lines += ["# TYPE tgi_queue_size gauge", f"tgi_queue_size {self.queue_size}"]
        for fam, values in (
            ("tgi_request_duration", self.durations),
            ("tgi_request_queue_duration", self.queues),
            ("tgi_request_mean_time_per_token_duration", self.per_token),
        ):
            lines.append(f"# TYPE {fam} histogram")
            for le, n in _cumulative(TGI_DURATION_BUCKETS, values):
                lines.append(f'{fam}_bucket{{le="{le}"}} {n}')
            lines += [f"{fam}_sum {sum(values)}", f"{fam}_count {len(values)}"]
        gen_bounds = [(2048 / 100) * (x + 1) for x in range(100)]
        lines.append("# TYPE tgi_request_generated_tokens histogram")
        for le, n in _cumulative(gen_bounds, self.generated):
            lines.append(f'tgi_request_generated_tokens_bucket{{le="{le}"}} {n}')
        lines += [
            f"tgi_request_generated_tokens_sum {sum(self.generated)}",
            f"tgi_request_generated_tokens_count {len(self.generated)}",
        ]
        return "\n".join(lines) + "\n"
