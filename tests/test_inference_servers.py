"""The agent's per-interval quantiles from vLLM, Triton and TGI metrics pages, against the true quantiles.

Each test runs a real HTTP server with the server's own metric names, types, labels and bucket layouts,
drives known request latencies through it, scrapes it with the inference source and checks every
quantile against the true quantile of the latencies of that interval: both must lie in the same bucket,
so they differ by at most the bucket's width.
"""

from __future__ import annotations

import math
import random

import pytest

from gpufleet.agent.inference.config import Endpoint, InferenceSettings, Slo
from gpufleet.agent.sources.inference import InferenceSource
from tests.inference_servers import (
    TGI_DURATION_BUCKETS,
    TRITON_FIRST_RESPONSE_BUCKETS_MS,
    VLLM_ITL_BUCKETS,
    VLLM_REQUEST_BUCKETS,
    VLLM_TTFT_BUCKETS,
    MetricsServer,
    TgiMetrics,
    TritonMetrics,
    VllmMetrics,
)

QS = (0.5, 0.9, 0.99)


def true_quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(math.ceil(q * len(s)) - 1, 0)]


def assert_same_bucket(estimate: float, truth: float, bounds: list[float], what: str) -> None:
    i = next((k for k, b in enumerate(bounds) if truth <= b), len(bounds))
    lower = bounds[i - 1] if i > 0 else 0.0
    upper = bounds[i] if i < len(bounds) else math.inf
    assert lower <= estimate <= upper, (
        f"{what}: estimate {estimate} outside the true value's bucket ({lower}, {upper}] (true {truth})"
    )
    assert abs(estimate - truth) <= upper - lower


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def series(families, name: str, **labels: str) -> dict[str, float]:
    """{quantile or "": value} of one family's samples matching ``labels``."""
    out = {}
    for fam in families:
        if fam.name != name:
            continue
        for lab, v in fam.samples:
            if all(lab.get(k) == x for k, x in labels.items()):
                out[lab.get("quantile", "")] = v
    return out


@pytest.fixture
def clock():
    return Clock()


def make_source(clock, *endpoints: Endpoint, slo: Slo | None = None) -> InferenceSource:
    src = InferenceSource(
        InferenceSettings(endpoints=list(endpoints), interval=10.0, slo=slo), "node-a7", clock=clock
    )
    src.start()
    return src


def lognormal(rng: random.Random, n: int, median: float, sigma: float, lo: float, hi: float) -> list[float]:
    return [min(max(rng.lognormvariate(math.log(median), sigma), lo), hi) for _ in range(n)]


def test_vllm_quantiles_come_from_the_last_interval_not_the_servers_lifetime(clock):
    rng = random.Random(6)
    vllm = VllmMetrics("meta-llama/Llama-3.1-8B-Instruct", engines=2)
    server = MetricsServer(vllm.render)
    src = make_source(clock, Endpoint("llama", server.url))
    try:
        # a long calm past: fast requests
        for _ in range(3000):
            vllm.request(
                rng.uniform(0.3, 0.9),
                ttft=rng.uniform(0.005, 0.05),
                itl=[0.02] * 4,
                queue=0.0,
                prompt_tokens=20,
                engine=rng.randrange(2),
            )
        src.collect()
        clock.now += 10
        # the interval that matters: slow, spread over both data-parallel engines
        e2e = lognormal(rng, 800, 6.0, 0.6, 0.31, 7000)
        ttft = lognormal(rng, 800, 0.4, 0.9, 0.0011, 2500)
        itl = lognormal(rng, 4000, 0.09, 0.5, 0.011, 79)
        queue = lognormal(rng, 800, 1.2, 0.8, 0.31, 7000)
        for i in range(800):
            vllm.request(
                e2e[i],
                ttft=ttft[i],
                itl=itl[5 * i : 5 * i + 5],
                queue=queue[i],
                prompt_tokens=100,
                engine=i % 2,
                reason="error" if i < 40 else "stop",
            )
        fams = src.collect()
    finally:
        server.close()
        src.close()
    model = "meta-llama/Llama-3.1-8B-Instruct"
    labels = {"model": model, "server": "vllm", "endpoint": "llama", "node": "node-a7"}
    for name, values, bounds in (
        ("gpufleet_inference_request_duration_seconds", e2e, VLLM_REQUEST_BUCKETS),
        ("gpufleet_inference_time_to_first_token_seconds", ttft, VLLM_TTFT_BUCKETS),
        ("gpufleet_inference_inter_token_latency_seconds", itl, VLLM_ITL_BUCKETS),
        ("gpufleet_inference_queue_time_seconds", queue, VLLM_REQUEST_BUCKETS),
    ):
        got = series(fams, name, **labels)
        for q in QS:
            assert_same_bucket(got[f"{q:g}"], true_quantile(values, q), bounds, f"{name} q={q}")
    # the lifetime p50 would sit below 1 s; the interval's is several seconds
    assert series(fams, "gpufleet_inference_request_duration_seconds", **labels)["0.5"] > 2.5
    assert series(fams, "gpufleet_inference_requests_per_second", **labels)[""] == pytest.approx(80.0)
    assert series(fams, "gpufleet_inference_errors_per_second", **labels)[""] == pytest.approx(4.0)
    assert series(fams, "gpufleet_inference_error_ratio", **labels)[""] == pytest.approx(0.05)
    assert series(fams, "gpufleet_inference_prompt_tokens_per_second", **labels)[""] == pytest.approx(8000.0)
    assert series(fams, "gpufleet_inference_generation_tokens_per_second", **labels)[""] == pytest.approx(
        480.0
    )
    assert series(fams, "gpufleet_inference_requests_total", **labels)[""] == 800
    assert series(fams, "gpufleet_inference_up", endpoint="llama")[""] == 1.0


def test_a_restarted_vllm_server_gives_the_new_processes_latencies_and_no_negative_rates(clock):
    rng = random.Random(7)
    vllm = VllmMetrics("m")
    server = MetricsServer(vllm.render)
    src = make_source(clock, Endpoint("m", server.url))
    try:
        for _ in range(500):
            vllm.request(rng.uniform(10, 50), ttft=0.5, itl=[0.1], queue=0.5, prompt_tokens=10)
        src.collect()
        clock.now += 10
        fresh = VllmMetrics("m")  # the process restarted: every counter starts from zero
        server.render = fresh.render
        after = lognormal(rng, 200, 0.7, 0.3, 0.31, 100)
        for x in after:
            fresh.request(x, ttft=0.05, itl=[0.02], queue=0.0, prompt_tokens=10)
        fams = src.collect()
    finally:
        server.close()
        src.close()
    got = series(fams, "gpufleet_inference_request_duration_seconds", model="m")
    for q in QS:
        assert_same_bucket(got[f"{q:g}"], true_quantile(after, q), VLLM_REQUEST_BUCKETS, f"q={q}")
    assert series(fams, "gpufleet_inference_requests_per_second", model="m")[""] == pytest.approx(20.0)
    assert series(fams, "gpufleet_inference_requests_total", model="m")[""] == 200


def test_triton_counters_give_mean_latencies_and_its_histogram_gives_time_to_first_response(clock):
    rng = random.Random(8)
    triton = TritonMetrics("resnet50")
    server = MetricsServer(triton.render)
    src = make_source(clock, Endpoint("triton", server.url))
    try:
        for _ in range(100):
            triton.request(0.01, 0.001, 0.008, 0.05)
        src.collect()
        clock.now += 10
        req = lognormal(rng, 600, 0.04, 0.5, 0.001, 10)
        queue = [r * 0.3 for r in req]
        first = lognormal(rng, 600, 0.4, 1.0, 0.001, 20)
        for r, qd, f in zip(req, queue, first, strict=True):
            triton.request(r, qd, r * 0.6, f, batch=4)
        triton.failure_backend = 6
        fams = src.collect()
    finally:
        server.close()
        src.close()
    labels = {"model": "resnet50", "server": "triton"}
    # Triton's default counters hold sums, so the interval gives exact means (to the microsecond rounding)
    assert series(fams, "gpufleet_inference_request_duration_mean_seconds", **labels)[""] == pytest.approx(
        sum(req) / len(req), abs=2e-6
    )
    assert series(fams, "gpufleet_inference_queue_time_mean_seconds", **labels)[""] == pytest.approx(
        sum(queue) / len(queue), abs=2e-6
    )
    bounds = [b / 1000 for b in TRITON_FIRST_RESPONSE_BUCKETS_MS]
    ttft = series(fams, "gpufleet_inference_time_to_first_token_seconds", **labels)
    for q in QS:
        assert_same_bucket(ttft[f"{q:g}"], true_quantile(first, q), bounds, f"first response q={q}")
    # the summary quantiles are Triton's own, passed through in seconds
    e2e = series(fams, "gpufleet_inference_request_duration_seconds", **labels)
    assert e2e["0.99"] == pytest.approx(true_quantile([0.01] * 100 + req, 0.99), rel=1e-3)
    assert series(fams, "gpufleet_inference_requests_per_second", **labels)[""] == pytest.approx(60.6)
    assert series(fams, "gpufleet_inference_errors_per_second", **labels)[""] == pytest.approx(0.6)
    assert series(fams, "gpufleet_inference_inferences_per_second", **labels)[""] == pytest.approx(240.0)


def test_tgi_histograms_with_its_geometric_buckets(clock):
    rng = random.Random(9)
    tgi = TgiMetrics()
    server = MetricsServer(tgi.render)
    src = make_source(clock, Endpoint("tgi", server.url, model="mistral-7b"))
    try:
        for _ in range(50):
            tgi.request(0.2, 0.001, 0.01, 20)
        src.collect()
        clock.now += 10
        dur = lognormal(rng, 500, 2.0, 0.7, 0.001, 140)
        queue = lognormal(rng, 500, 0.05, 1.2, 0.0002, 140)
        per_token = lognormal(rng, 500, 0.03, 0.3, 0.0002, 140)
        for d, qd, p in zip(dur, queue, per_token, strict=True):
            tgi.request(d, qd, p, 64)
        tgi.failures = 10
        fams = src.collect()
    finally:
        server.close()
        src.close()
    labels = {"model": "mistral-7b", "server": "tgi", "endpoint": "tgi"}
    for name, values in (
        ("gpufleet_inference_request_duration_seconds", dur),
        ("gpufleet_inference_queue_time_seconds", queue),
        ("gpufleet_inference_inter_token_latency_seconds", per_token),
    ):
        got = series(fams, name, **labels)
        for q in QS:
            assert_same_bucket(got[f"{q:g}"], true_quantile(values, q), TGI_DURATION_BUCKETS, f"{name} q={q}")
    assert series(fams, "gpufleet_inference_requests_per_second", **labels)[""] == pytest.approx(51.0)
    assert series(fams, "gpufleet_inference_errors_per_second", **labels)[""] == pytest.approx(1.0)
    assert series(fams, "gpufleet_inference_generation_tokens_per_second", **labels)[""] == pytest.approx(
        3200.0
    )


def test_a_generic_histogram_in_milliseconds_split_by_its_model_label(clock):
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    reg = CollectorRegistry()
    bounds_ms = [5, 10, 25, 50, 100, 250, 500, 1000, 2500]
    h = Histogram("app_inference_latency_milliseconds", "latency", ["model"], buckets=bounds_ms, registry=reg)
    server = MetricsServer(lambda: generate_latest(reg).decode())
    src = make_source(
        clock,
        Endpoint(
            "app",
            server.url,
            server="generic",
            histogram="app_inference_latency_milliseconds",
            scale=0.001,
            model_label="model",
        ),
    )
    rng = random.Random(10)
    try:
        src.collect()
        clock.now += 10
        a = lognormal(rng, 300, 40, 0.5, 1, 2400)
        b = lognormal(rng, 300, 300, 0.5, 1, 2400)
        for x in a:
            h.labels("ranker").observe(x)
        for x in b:
            h.labels("embedder").observe(x)
        fams = src.collect()
    finally:
        server.close()
        src.close()
    for model, values in (("ranker", a), ("embedder", b)):
        got = series(fams, "gpufleet_inference_request_duration_seconds", model=model, server="generic")
        for q in QS:
            assert_same_bucket(
                got[f"{q:g}"],
                true_quantile(values, q) / 1000,
                [x / 1000 for x in bounds_ms],
                f"{model} q={q}",
            )


def test_slo_burn_rate_counts_requests_slower_than_the_objective(clock):
    vllm = VllmMetrics("m")
    server = MetricsServer(vllm.render)
    # objective on a bucket bound: 99% within 2.5 s, so the count above it is exact
    src = make_source(clock, Endpoint("m", server.url), slo=Slo(2.5, 0.99))
    try:
        src.collect()
        for _ in range(6):
            clock.now += 10
            for i in range(100):
                vllm.request(4.0 if i < 5 else 1.0, ttft=0.1, itl=[], queue=0.0, prompt_tokens=1)
            fams = src.collect()
    finally:
        server.close()
        src.close()
    burn = {
        lab["window"]: v
        for f in fams
        if f.name == "gpufleet_inference_latency_slo_burn_rate"
        for lab, v in f.samples
    }
    # 5% of requests miss a 1% budget: burning 5 times too fast, over every window seen so far
    assert burn == {w: pytest.approx(5.0) for w in ("5m", "30m", "1h", "6h")}
    multi = series(fams, "gpufleet_inference_latency_slo_multiwindow_burn_rate", windows="1h,5m")
    assert multi[""] == pytest.approx(5.0)


def test_an_unreachable_endpoint_reads_down_and_the_others_go_on(clock):
    vllm = VllmMetrics("m")
    server = MetricsServer(vllm.render)
    dead = MetricsServer(lambda: "")
    dead_url = dead.url
    dead.close()
    src = make_source(clock, Endpoint("ok", server.url), Endpoint("dead", dead_url))
    try:
        fams = src.collect()
    finally:
        server.close()
        src.close()
    assert series(fams, "gpufleet_inference_up", endpoint="ok")[""] == 1.0
    assert series(fams, "gpufleet_inference_up", endpoint="dead")[""] == 0.0
    assert series(fams, "gpufleet_inference_scrape_failures_total", endpoint="dead")[""] == 1


def test_a_model_that_has_failed_no_request_reports_zero_errors_not_no_data(clock):
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    old_vllm = VllmMetrics("qwen", reasons=("stop", "length", "abort"))  # vLLM v0: no "error" reason at all
    tgi = TgiMetrics()  # TGI shows tgi_request_failure only after the first failure
    reg = CollectorRegistry()
    app = Histogram("app_latency_seconds", "latency", ["model"], registry=reg)
    Counter("app_failures", "failed requests", ["model"], registry=reg)  # labelled: no series until a failure
    servers = [
        MetricsServer(old_vllm.render),
        MetricsServer(tgi.render),
        MetricsServer(lambda: generate_latest(reg).decode()),
    ]
    src = make_source(
        clock,
        Endpoint("qwen", servers[0].url, server="vllm"),
        Endpoint("tgi", servers[1].url, server="tgi"),
        Endpoint(
            "app",
            servers[2].url,
            server="generic",
            histogram="app_latency_seconds",
            model_label="model",
            errors_counter="app_failures_total",
        ),
    )
    try:
        src.collect()
        clock.now += 10
        for _ in range(50):
            old_vllm.request(0.4, ttft=0.02, itl=[0.02] * 3, queue=0.0, prompt_tokens=10)
            tgi.request(0.4, 0.01, 0.02, 16)
            app.labels("ranker").observe(0.03)
        fams = src.collect()
    finally:
        for s in servers:
            s.close()
        src.close()
    for endpoint in ("qwen", "tgi", "app"):
        assert series(fams, "gpufleet_inference_requests_per_second", endpoint=endpoint)[""] == pytest.approx(
            5.0
        )
        assert series(fams, "gpufleet_inference_errors_per_second", endpoint=endpoint) == {"": 0.0}, endpoint
        assert series(fams, "gpufleet_inference_error_ratio", endpoint=endpoint) == {"": 0.0}, endpoint
