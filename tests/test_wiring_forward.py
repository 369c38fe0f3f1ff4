"""Remote-write out (`--forward`): a target that errors, rate-limits or is not up yet gets every batch once it
answers, in order, and nothing is dropped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpufleet.collector.forward import Forwarder
from gpufleet.core import remote_write as rw
from tests.conftest import free_port, wait_until


class Receiver:
    """A remote-write receiver on a real port that answers the scripted statuses first, then 204."""

    def __init__(self, port: int = 0, script: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.script = list(script or [])
        self.answers: list[int] = []
        self.stored: list[bytes] = []  # bodies answered 204, in arrival order
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status, headers = receiver.script.pop(0) if receiver.script else (204, {})
                receiver.answers.append(status)
                if status == 204:
                    receiver.stored.append(body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/api/v1/write"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def batches(n: int) -> list[bytes]:
    return [
        rw.encode([rw.Series({"__name__": "gpufleet_gpu_up", "uuid": f"GPU-{i}"}, [(1000 + i, 1.0)])])
        for i in range(n)
    ]


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    started: list[Forwarder] = []
    yield started
    for f in started:
        f.stop(timeout=1)


def forward(forwarders: list[Forwarder], url: str, bodies: list[bytes]) -> Forwarder:
    f = Forwarder([url]).start()
    forwarders.append(f)
    for body in bodies:
        f.submit(body, 1)
    return f


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([(500, {}), (502, {})], id="server-errors"),
        pytest.param([(429, {"Retry-After": "1"})], id="rate-limited-with-retry-after"),
    ],
)
def test_a_target_that_fails_before_it_answers_gets_every_batch_once_and_in_order(forwarders, script):
    receiver = Receiver(script=script)
    try:
        sent = batches(3)
        (target,) = forward(forwarders, receiver.url, sent).targets
        wait_until(lambda: target.sent_samples == 3)
        assert receiver.stored == sent
        assert receiver.answers == [s for s, _ in script] + [204, 204, 204]
        assert target.dropped_samples == 0 and target.failed_sends == len(script)
    finally:
        receiver.close()


def test_a_target_that_comes_up_late_gets_what_was_forwarded_while_it_was_down(forwarders):
    port = free_port()
    sent = batches(3)
    (target,) = forward(forwarders, f"http://127.0.0.1:{port}/api/v1/write", sent).targets
    wait_until(lambda: target.failed_sends >= 1)  # connection refused, and retrying
    assert "cannot remote-write" in (target.last_error or "")
    receiver = Receiver(port)
    try:
        wait_until(lambda: target.sent_samples == 3, timeout=60)
        assert receiver.stored == sent and target.dropped_samples == 0 and target.last_error is None
    finally:
        receiver.close()
