"""The local end of the client API: latencies applications send to the agent as datagrams.

An application that serves a model without a metrics page uses ``gpufleet.inference_client``; each
request becomes one small JSON datagram on a loopback UDP port or a unix datagram socket::

    {"v": 1, "m": "MODEL", "d": SECONDS, "ok": true, "ttft": SECONDS, "tok": TOKENS}

Here they are counted into histograms per model, and the inference source reads them like any server's
page (server ``client``). Datagrams that cannot be read are counted and the first of each kind is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections import defaultdict
from urllib.parse import urlsplit

from gpufleet.agent.inference.histogram import Recorder, log_buckets
from gpufleet.agent.inference.servers import ModelReading, Reading

log = logging.getLogger(__name__)

# 0.5 ms to ~4 min, each bucket 25% wider than the last: any quantile within 25% of the truth.
CLIENT_BUCKETS = log_buckets(0.0005, 1.25, 60)
MAX_MODELS = 1000  # a runaway label (a request id sent as the model) must not grow the agent without bound


class Receiver:
    def __init__(self, address: str) -> None:
        parts = urlsplit(address)
        self.address = address
        if parts.scheme == "udp":
            self._sock = socket.socket(
                socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET, socket.SOCK_DGRAM
            )
            self._sock.bind((parts.hostname, parts.port))
        elif parts.scheme == "unix":
            self._path = parts.path
            if os.path.exists(self._path):
                os.unlink(self._path)  # a socket left by an agent that did not stop cleanly
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(self._path)
            os.chmod(self._path, 0o666)  # applications run as other users
        else:
            raise ValueError(f"receiver {address!r} is not udp://HOST:PORT or unix:///PATH")
        # bursts of records arrive faster than one thread reads them; the kernel caps this at net.core.rmem_max
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.settimeout(0.5)
        self._lock = threading.Lock()
        self._e2e: dict[str, Recorder] = {}
        self._ttft: dict[str, Recorder] = {}
        self._counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.datagrams = 0
        self.invalid: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        name = self._sock.getsockname()
        return name[1] if isinstance(name, tuple) else None

    def handle(self, data: bytes) -> None:
        """Count one datagram (public so the loop and tests share one path)."""
        try:
            msg = json.loads(data)
            model, duration = msg["m"], float(msg["d"])
            if not isinstance(model, str) or not model or duration < 0 or duration != duration:
                raise ValueError
            ok = bool(msg.get("ok", True))
            ttft = msg.get("ttft")
            tokens = float(msg.get("tok") or 0)
        except (ValueError, KeyError, TypeError):
            self._reject("not a latency record")
            return
        with self._lock:
            if model not in self._e2e:
                if len(self._e2e) >= MAX_MODELS:
                    self._reject("too many models")
                    return
                self._e2e[model] = Recorder(CLIENT_BUCKETS)
            self.datagrams += 1
            self._e2e[model].observe(duration)
            counters = self._counters[model]
            counters["requests"] += 1
            counters["errors"] += 0 if ok else 1
            counters["generation_tokens"] += tokens
            if ttft is not None:
                with contextlib.suppress(TypeError, ValueError):
                    self._ttft.setdefault(model, Recorder(CLIENT_BUCKETS)).observe(float(ttft))

    def _reject(self, why: str) -> None:
        self.invalid[why] += 1
        if self.invalid[why] == 1:
            log.warning(
                "inference receiver %s dropped a datagram: %s (further ones are only counted)",
                self.address,
                why,
            )

    def reading(self) -> Reading:
        with self._lock:
            out: Reading = {}
            for model, rec in self._e2e.items():
                r = ModelReading(histograms={"e2e": rec.snapshot()}, counters=dict(self._counters[model]))
                if model in self._ttft:
                    r.histograms["ttft"] = self._ttft[model].snapshot()
                out[model] = r
            return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                continue
            self.handle(data)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-receiver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sock.close()
        if getattr(self, "_path", None) and os.path.exists(self._path):
            os.unlink(self._path)
