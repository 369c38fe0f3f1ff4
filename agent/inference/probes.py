"""Active probes: what a user of the model would see, measured from the node.

* ``openai-chat`` / ``openai-completions``: a streaming request with a tiny prompt to an OpenAI-compatible
  server (vLLM, TGI, Triton's OpenAI frontend, …); measures time to the first token and the total time.
* ``http``: any URL; measures the time to a complete answer with the expected status.

Every run ends as a success or a failure with a reason (``timeout``, ``connection``, ``http_503``,
``no_tokens``, ``bad_response``); failures are counted, never raised.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpufleet.agent.inference.config import Probe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str = ""  # why it failed; empty on success
    duration: float | None = None
    ttft: float | None = None
    tokens: int = 0


class _Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _api_base(url: str) -> str:
    i = url.find("/v1/")
    return url[:i] if i >= 0 else url.rsplit("/", 2)[0]


class ProbeRunner:
    """Runs each probe every ``probe.interval`` seconds in a background thread and keeps its tallies."""

    def __init__(
        self,
        probes: list[Probe],
        *,
        clock: Callable[[], float] = time.perf_counter,
        opener: Callable[..., Any] = urllib.request.urlopen,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.probes = list(probes)
        self._clock = clock
        self._open = opener
        self._env = os.environ if environ is None else environ
        self._models: dict[str, str] = {}
        self._lock = threading.Lock()
        self.runs: dict[str, int] = defaultdict(int)
        self.failures: dict[tuple[str, str], int] = defaultdict(int)
        self.last: dict[str, ProbeResult] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- one run --------------------------------------------------------------------------------
    def run_once(self, probe: Probe) -> ProbeResult:
        try:
            result = self._http(probe) if probe.kind == "http" else self._openai(probe)
        except _Failed as exc:
            result = ProbeResult(False, exc.reason)
        except Exception as exc:  # a probe must never take the agent down
            log.exception("probe %s failed unexpectedly", probe.name)
            result = ProbeResult(False, type(exc).__name__)
        with self._lock:
            self.runs[probe.name] += 1
            if not result.ok:
                self.failures[(probe.name, result.reason)] += 1
            previous = self.last.get(probe.name)
            self.last[probe.name] = result
        if not result.ok and (previous is None or previous.ok):
            log.warning("probe %s of %s fails: %s", probe.name, probe.url, result.reason)
        elif result.ok and previous is not None and not previous.ok:
            log.info("probe %s of %s succeeds again", probe.name, probe.url)
        return result

    def _headers(self, probe: Probe) -> dict[str, str]:
        headers = {"User-Agent": "gpufleet-agent-probe"}
        if probe.api_key_env:
            token = self._env.get(probe.api_key_env)
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(self, probe: Probe, url: str, body: dict | None = None, method: str = "GET") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = self._headers(probe)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return self._open(req, timeout=probe.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise _Failed(f"http_{exc.code}") from None
        except TimeoutError:
            raise _Failed("timeout") from None
        except urllib.error.URLError as exc:
            raise _Failed(
                "timeout" if isinstance(exc.reason, (TimeoutError, socket.timeout)) else "connection"
            ) from None
        except OSError:
            raise _Failed("connection") from None

    def _http(self, probe: Probe) -> ProbeResult:
        t0 = self._clock()
        with self._request(probe, probe.url, method=probe.method) as resp:
            try:
                resp.read()
            except TimeoutError:
                raise _Failed("timeout") from None
            status = resp.status
        duration = self._clock() - t0
        if probe.expect_status is not None and status != probe.expect_status:
            raise _Failed(f"http_{status}")
        if duration > probe.timeout:
            raise _Failed("timeout")
        return ProbeResult(True, duration=duration)

    def _model(self, probe: Probe) -> str:
        if probe.model:
            return probe.model
        if probe.name in self._models:
            return self._models[probe.name]
        with self._request(probe, _api_base(probe.url) + "/v1/models") as resp:
            try:
                model = json.loads(resp.read())["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise _Failed("bad_response") from None
        self._models[probe.name] = model
        return model

    def _openai(self, probe: Probe) -> ProbeResult:
        model = self._model(probe)
        body: dict[str, Any] = {"model": model, "max_tokens": probe.max_tokens, "stream": True}
        if probe.kind == "openai-chat":
            body["messages"] = [{"role": "user", "content": probe.prompt}]
        else:
            body["prompt"] = probe.prompt
        t0 = self._clock()
        deadline = t0 + probe.timeout
        ttft, tokens = None, 0
        with self._request(probe, probe.url, body, method="POST") as resp:
            try:
                for raw in resp:
                    if self._clock() > deadline:
                        raise _Failed("timeout")
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event: lines
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        choices = json.loads(payload).get("choices") or []
                    except (ValueError, AttributeError):
                        raise _Failed("bad_response") from None
                    for choice in choices:
                        text = (
                            (choice.get("delta") or {}).get("content")
                            if probe.kind == "openai-chat"
                            else choice.get("text")
                        )
                        if text:
                            tokens += 1
                            if ttft is None:
                                ttft = self._clock() - t0
            except TimeoutError:
                raise _Failed("timeout") from None
        duration = self._clock() - t0
        if duration > probe.timeout:
            raise _Failed("timeout")
        if ttft is None:
            raise _Failed("no_tokens")
        return ProbeResult(True, duration=duration, ttft=ttft, tokens=tokens)

    # ---- schedule -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.probes and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="inference-probes", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        next_at = {p.name: time.monotonic() for p in self.probes}
        while not self._stop.is_set():
            now = time.monotonic()
            for p in self.probes:
                if now >= next_at[p.name]:
                    self.run_once(p)
                    next_at[p.name] = max(next_at[p.name] + p.interval, time.monotonic())
            self._stop.wait(max(min(next_at.values()) - time.monotonic(), 0.05))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, ProbeResult]]:
        with self._lock:
            return dict(self.runs), dict(self.failures), dict(self.last)
