"""The one retry policy and the one remote-write sender that the agent's pusher and the collector's forwarder
share: a collector that is busy is tried again later, one that refuses a batch for what it is is not."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpufleet.core import remote_write as rw
from gpufleet.core.retry import RetryPolicy, Verdict, classify, parse_retry_after
from gpufleet.core.sender import RemoteWriteSender, http_pool
from tests.conftest import free_port


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (None, Verdict.RETRY),
        (0, Verdict.RETRY),
        (200, Verdict.OK),
        (204, Verdict.OK),
        (400, Verdict.REFUSED),
        (401, Verdict.REFUSED),
        (404, Verdict.REFUSED),
        (413, Verdict.REFUSED),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_passing_troubles_are_retried_and_refusals_are_not(status, verdict):
    assert classify(status) is verdict


def test_delays_double_from_the_first_up_to_the_cap():
    policy = RetryPolicy(first_s=0.5, max_s=30.0, jitter=0.0)
    assert [policy.delay(a) for a in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.delay(10_000) == 30.0  # a collector down for days does not overflow the arithmetic
    grafana = RetryPolicy(first_s=2.0, max_s=300.0, jitter=0.0).delays()
    assert [next(grafana) for _ in range(10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_jitter_spreads_clients_that_failed_together_and_is_reproducible_with_a_seeded_rng():
    def run(seed: int) -> list[float]:
        policy = RetryPolicy(first_s=1.0, max_s=8.0, jitter=0.5, rng=random.Random(seed))
        return [policy.delay(3) for _ in range(50)]

    delays = run(1)
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) == 50
    assert run(1) == delays and run(2) != delays


def test_the_servers_retry_after_is_taken_as_it_stands_but_capped():
    policy = RetryPolicy(first_s=0.5, max_s=30.0, jitter=0.5, rng=random.Random(0))
    assert policy.delay(0, retry_after_s=5.0) == 5.0
    assert policy.delay(6, retry_after_s=0.0) == 0.0
    assert policy.delay(0, retry_after_s=86_400.0) == 30.0


def test_retry_after_reads_seconds_and_http_dates():
    assert parse_retry_after("7") == 7.0 and parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(formatdate(1_000_120, usegmt=True), now=lambda: 1_000_000.0) == 120.0
    assert parse_retry_after(formatdate(999_000, usegmt=True), now=lambda: 1_000_000.0) == 0.0  # in the past
    assert (
        parse_retry_after(None) is None
        and parse_retry_after("soon") is None
        and parse_retry_after("nan") is None
    )


def test_a_policy_that_cannot_work_is_refused_when_made():
    with pytest.raises(ValueError, match="first"):
        RetryPolicy(first_s=10.0, max_s=1.0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


# ---- the sender, against a real HTTP server ------------------------------------------------------------
class Receiver:
    """A remote-write endpoint that answers each path with a fixed status, noting the requests it saw."""

    ANSWERS = {
        "/ok": (204, {}, b""),
        "/broken": (500, {}, b"database unavailable"),
        "/busy": (429, {"Retry-After": "7"}, b"slow down"),
        "/bad": (400, {}, b"out of order sample"),
    }

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server hook's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                status, headers, text = receiver.ANSWERS[self.path]
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def sender(url: str, **kw) -> RemoteWriteSender:
    return RemoteWriteSender(url, http_pool(timeout=5.0), user_agent="gpufleet-test", **kw)


BODY = rw.encode([rw.Series({"__name__": "gpufleet_gpu_up", "uuid": "GPU-1"}, [(1_700_000_000_000, 1.0)])])


def test_a_batch_the_receiver_takes_is_sent_with_the_remote_write_headers(receiver):
    result = sender(receiver.url + "/ok", token="s3cret").send(BODY, urgent=True)
    assert result.verdict is Verdict.OK and result.status == 204 and result.detail == ""
    path, headers, body = receiver.requests[0]
    assert rw.decode(body).series[0].labels["uuid"] == "GPU-1"
    assert headers["Content-Type"] == "application/x-protobuf" and headers["Content-Encoding"] == "snappy"
    assert headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    assert headers["Authorization"] == "Bearer s3cret" and headers["X-Gpufleet-Urgent"] == "1"
    assert headers["User-Agent"] == "gpufleet-test"


def test_a_server_error_is_retried_later_and_says_why(receiver):
    result = sender(receiver.url + "/broken").send(BODY)
    assert result.verdict is Verdict.RETRY and result.retry_after_s is None
    assert result.problem == "HTTP 500: database unavailable"
    assert (
        "Authorization" not in receiver.requests[0][1] and "X-Gpufleet-Urgent" not in receiver.requests[0][1]
    )


def test_a_rate_limit_is_retried_after_the_wait_the_server_asked_for(receiver):
    result = sender(receiver.url + "/busy").send(BODY)
    assert (result.verdict, result.status, result.retry_after_s) == (Verdict.RETRY, 429, 7.0)


def test_a_batch_refused_for_what_it_is_is_not_retried(receiver):
    result = sender(receiver.url + "/bad").send(BODY)
    assert (result.verdict, result.status, result.detail) == (Verdict.REFUSED, 400, "out of order sample")


def test_no_answer_at_all_is_retried_later_and_never_raises():
    result = sender(f"http://127.0.0.1:{free_port()}/api/v1/write").send(BODY)
    assert result.verdict is Verdict.RETRY and result.status == 0
    assert "refused" in result.problem.lower()
