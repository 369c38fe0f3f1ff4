"""Probes of a local OpenAI-compatible streaming server: time to first token, total time, counted failures."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpufleet.agent.inference.config import InferenceSettings, Probe
from gpufleet.agent.inference.probes import ProbeRunner
from gpufleet.agent.sources.inference import InferenceSource


class OpenAIServer:
    """Streams ``tokens`` chat chunks: the first after ``first_delay`` s, the rest ``gap`` s apart."""

    def __init__(self) -> None:
        self.first_delay, self.gap, self.tokens, self.status = 0.2, 0.05, 4, 200
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                body = json.dumps(
                    {"object": "list", "data": [{"id": "tiny-llm", "object": "model"}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(req)
                outer.headers.append(dict(self.headers))
                if outer.status != 200:
                    self.send_error(outer.status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                # the probe may give up (its timeout): what a real server sees too
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._stream(req)

            def _stream(self, req: dict) -> None:
                time.sleep(outer.first_delay)
                for i in range(outer.tokens):
                    if i:
                        time.sleep(outer.gap)
                    chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}
                    if req.get("prompt") is not None:
                        chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def openai():
    s = OpenAIServer()
    yield s
    s.close()


def test_a_streaming_chat_probe_measures_time_to_first_token_and_total_time(openai):
    probe = Probe(
        "chat",
        openai.base + "/v1/chat/completions",
        kind="openai-chat",
        prompt="Hi",
        max_tokens=4,
        api_key_env="PROBE_KEY",
    )
    runner = ProbeRunner([probe], environ={"PROBE_KEY": "sk-probe"})
    r = runner.run_once(probe)
    assert r.ok and r.tokens == 4
    # the server held the first token 0.2 s and spaced the other three 0.05 s apart
    assert r.ttft >= 0.2
    assert r.duration >= r.ttft + 0.15
    sent = openai.requests[-1]
    assert sent == {
        "model": "tiny-llm",
        "max_tokens": 4,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    assert openai.headers[-1]["Authorization"] == "Bearer sk-probe"


def test_a_completions_probe_with_a_named_model(openai):
    probe = Probe("cmpl", openai.base + "/v1/completions", kind="openai-completions", model="m")
    r = ProbeRunner([probe]).run_once(probe)
    assert r.ok and r.ttft >= 0.2 and openai.requests[-1]["prompt"] == "Say OK."


def test_probe_failures_are_counted_by_reason(openai):
    chat = Probe("chat", openai.base + "/v1/chat/completions", kind="openai-chat", model="m", timeout=1.0)
    runner = ProbeRunner([chat])
    openai.status = 503
    assert runner.run_once(chat).reason == "http_503"
    openai.status, openai.tokens = 200, 0
    assert runner.run_once(chat).reason == "no_tokens"
    openai.tokens, openai.first_delay = 2, 1.5
    assert runner.run_once(chat).reason == "timeout"
    dead = Probe("dead", "http://127.0.0.1:9/v1/chat/completions", kind="openai-chat", model="m", timeout=1.0)
    assert runner.run_once(dead).reason == "connection"
    runs, failures, _ = runner.snapshot()
    assert runs == {"chat": 3, "dead": 1}
    assert failures == {
        ("chat", "http_503"): 1,
        ("chat", "no_tokens"): 1,
        ("chat", "timeout"): 1,
        ("dead", "connection"): 1,
    }


def test_an_http_probe_checks_the_status_and_the_source_exports_probe_series(openai):
    ok = Probe("models", openai.base + "/v1/models", kind="http", expect_status=200)
    wrong = Probe("wrong", openai.base + "/nope", kind="http")
    runner = ProbeRunner([ok, wrong])
    runner.run_once(ok)
    runner.run_once(wrong)
    src = InferenceSource(InferenceSettings(probes=[ok, wrong]), "node-a7", probe_runner=runner)
    fams = {f.name: f for f in src.collect()}
    success = {lab["probe"]: v for lab, v in fams["gpufleet_inference_probe_success"].samples}
    assert success == {"models": 1.0, "wrong": 0.0}
    failures = {
        (lab["probe"], lab["reason"]): v for lab, v in fams["gpufleet_inference_probe_failures_total"].samples
    }
    assert failures == {("wrong", "http_404"): 1}
    assert [lab["probe"] for lab, _ in fams["gpufleet_inference_probe_duration_seconds"].samples] == [
        "models"
    ]
