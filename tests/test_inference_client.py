"""An application without a metrics page reports latencies through gpufleet.inference_client."""

from __future__ import annotations

import math
import random

import pytest

from gpufleet.agent.inference.config import InferenceSettings
from gpufleet.agent.inference.receiver import CLIENT_BUCKETS, Receiver
from gpufleet.agent.sources.inference import InferenceSource
from gpufleet.inference_client import Reporter, latency
from tests.conftest import free_port, wait_until


def true_quantile(values, q):
    s = sorted(values)
    return s[max(math.ceil(q * len(s)) - 1, 0)]


@pytest.fixture(params=["udp", "unix"])
def receiver(request, tmp_path):
    address = (
        f"udp://127.0.0.1:{free_port()}" if request.param == "udp" else f"unix://{tmp_path}/inference.sock"
    )
    r = Receiver(address)
    r.start()
    yield r
    r.stop()


def test_recorded_latencies_become_the_models_quantiles(receiver):
    rep = Reporter(receiver.address)
    now = [0.0]
    src = InferenceSource(
        InferenceSettings(receiver=receiver.address), "node-a7", receiver=receiver, clock=lambda: now[0]
    )
    src.collect()
    rng = random.Random(3)
    values = [rng.lognormvariate(math.log(0.25), 0.8) for _ in range(400)]
    for i, v in enumerate(values):
        assert rep.record("ranker", v, ok=i % 50 != 0, ttft=v / 4, tokens=3)
        if i % 5 == 4:  # let the receiver keep up: a burst beyond the socket queue is dropped by design
            wait_until(lambda n=i + 1: receiver.datagrams == n, interval=0.002)
    now[0] += 10
    fams = src.collect()
    got = {
        lab["quantile"]: v
        for f in fams
        if f.name == "gpufleet_inference_request_duration_seconds"
        for lab, v in f.samples
        if lab["model"] == "ranker"
    }
    bounds = list(CLIENT_BUCKETS)
    for q in (0.5, 0.9, 0.99):
        truth = true_quantile(values, q)
        i = next(k for k, b in enumerate(bounds) if truth <= b)
        assert bounds[i - 1] <= got[f"{q:g}"] <= bounds[i]
    rates = {f.name: v for f in fams for lab, v in f.samples if lab.get("model") == "ranker"}
    assert rates["gpufleet_inference_requests_per_second"] == pytest.approx(40.0)
    assert rates["gpufleet_inference_errors_per_second"] == pytest.approx(0.8)
    assert rates["gpufleet_inference_generation_tokens_per_second"] == pytest.approx(120.0)
    labels = next(lab for f in fams if f.name == "gpufleet_inference_requests_total" for lab, _ in f.samples)
    assert labels["server"] == "client" and labels["endpoint"] == "client"


def test_the_context_manager_and_decorator_time_calls_and_mark_exceptions_as_errors(receiver):
    rep = Reporter(receiver.address)

    @latency("embedder", reporter=rep)
    def embed(x):
        return x * 2

    assert embed(21) == 42
    with latency("chat", reporter=rep) as t:
        t.first_token()
        t.tokens += 5
    with pytest.raises(KeyError), latency("chat", reporter=rep):
        raise KeyError("boom")
    wait_until(lambda: receiver.datagrams == 3)
    reading = receiver.reading()
    assert reading["embedder"].counters == {"requests": 1, "errors": 0, "generation_tokens": 0}
    assert reading["chat"].counters == {"requests": 2, "errors": 1, "generation_tokens": 5}
    assert reading["chat"].histograms["ttft"].count == 1


def test_without_an_agent_records_are_dropped_and_counted_never_raised(tmp_path):
    rep = Reporter(f"unix://{tmp_path}/no-agent.sock")
    with latency("m", reporter=rep):
        pass
    assert rep.record("m", 0.1) is False
    assert rep.dropped == 2 and rep.sent == 0


def test_datagrams_that_are_not_latency_records_are_counted(receiver):
    for junk in (b"not json", b'{"m": "x"}', b'{"m": "", "d": 1}', b'{"m": "x", "d": -1}'):
        receiver.handle(junk)
    receiver.handle(b'{"v":1,"m":"x","d":0.5}')
    assert receiver.invalid == {"not a latency record": 4}
    assert receiver.datagrams == 1


def test_a_bad_address_says_what_to_write():
    with pytest.raises(ValueError, match="udp://HOST:PORT or unix:///PATH"):
        Reporter("tcp://127.0.0.1:1")
