"""Report inference latency to the local gpufleet agent. Standard library only; never blocks the caller.

    from gpufleet.inference_client import latency

    with latency("llama-3-8b") as t:        # one request
        for token in generate(prompt):
            t.first_token()                  # optional: marks time to first token
            t.tokens += 1

    @latency("resnet50")                     # or as a decorator
    def predict(batch): ...

Each request becomes one datagram to the agent (``GPUFLEET_INFERENCE_SOCKET``, default
``udp://127.0.0.1:9447``; ``unix:///PATH`` for a socket shared into a container). Sending never
waits: when the agent is absent or behind, the record is dropped and counted in ``reporter().dropped``.
An exception leaving the block records the request as an error and propagates unchanged.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

DEFAULT_ADDRESS = "udp://127.0.0.1:9447"


class Reporter:
    def __init__(self, address: str | None = None) -> None:
        self.address = address or os.environ.get("GPUFLEET_INFERENCE_SOCKET") or DEFAULT_ADDRESS
        parts = urlsplit(self.address)
        if parts.scheme == "udp" and parts.hostname and parts.port:
            family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
            self._target: Any = (parts.hostname, parts.port)
        elif parts.scheme == "unix" and parts.path:
            family, self._target = socket.AF_UNIX, parts.path
        else:
            raise ValueError(f"{self.address!r} is not udp://HOST:PORT or unix:///PATH")
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.sent = 0
        self.dropped = 0

    def record(
        self, model: str, seconds: float, *, ok: bool = True, ttft: float | None = None, tokens: int = 0
    ) -> bool:
        """Send one request's latency; False (and ``dropped`` + 1) when it could not be handed over."""
        msg: dict[str, Any] = {"v": 1, "m": model, "d": round(seconds, 9), "ok": ok}
        if ttft is not None:
            msg["ttft"] = round(ttft, 9)
        if tokens:
            msg["tok"] = tokens
        try:
            self._sock.sendto(json.dumps(msg, separators=(",", ":")).encode(), self._target)
        except OSError:  # no agent socket, buffer full: the caller's request matters more than the record
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()


_default: Reporter | None = None
_default_lock = threading.Lock()


def reporter() -> Reporter:
    """The process-wide reporter (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Reporter()
        return _default


class latency:  # noqa: N801 - reads as a verb at the call site: with latency("model"):
    """Time one request (context manager) or every call of a function (decorator)."""

    def __init__(self, model: str, reporter: Reporter | None = None) -> None:
        self.model = model
        self._reporter = reporter
        self.tokens = 0
        self._t0 = 0.0
        self._ttft: float | None = None

    def first_token(self) -> None:
        if self._ttft is None:
            self._ttft = time.perf_counter() - self._t0

    def __enter__(self) -> latency:
        self.tokens, self._ttft = 0, None
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        (self._reporter or reporter()).record(
            self.model,
            time.perf_counter() - self._t0,
            ok=exc_type is None,
            ttft=self._ttft,
            tokens=self.tokens,
        )

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with latency(self.model, self._reporter):  # a fresh timer per call: safe across threads
                return fn(*args, **kwargs)

        return timed
