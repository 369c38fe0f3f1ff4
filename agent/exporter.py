"""``/metrics`` and ``/healthz`` on the agent's port: ``/metrics`` writes the latest snapshot (agent/exposition.py)."""

from __future__ import annotations

import gzip
import json
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import gzip_accepted

from gpufleet.agent.exposition import CONTENT_TYPE, TextExposition
from gpufleet.agent.families import Family
from gpufleet.agent.pipeline import MetricsCollector
from gpufleet.agent.sinks import LatestSnapshot

log = logging.getLogger(__name__)


class SnapshotFamilies:
    """What a scrape shows: the latest snapshot, then the agent's own metrics, read at scrape time.

    ``rename`` maps our families to another naming scheme (dcgm-exporter's) on the way out.
    """

    def __init__(
        self,
        snapshots: LatestSnapshot,
        own: MetricsCollector | None = None,
        rename: Callable[[list[Family]], list[Family]] | None = None,
    ) -> None:
        self._snapshots = snapshots
        self._own = own
        self._rename = rename

    def families(self) -> list[Family]:
        families = list(self._snapshots.latest.families)
        if self._own is not None:
            families += self._own.collect()
        if self._rename:
            families = self._rename(families)
        return families


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds are not news
        return None


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


Route = Callable[[dict, Callable], list[bytes]]


def json_response(start_response: Callable, status: str, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class AgentServer:
    """Serves the agent's HTTP endpoints in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        snapshots: LatestSnapshot,
        *,
        health: Callable[[], dict],
        routes: dict[tuple[str, str], Route] | None = None,
        own: MetricsCollector | None = None,
        rename: Callable[[list[Family]], list[Family]] | None = None,
    ) -> None:
        self._snapshots = SnapshotFamilies(snapshots, own, rename)
        self._exposition = TextExposition()
        self._health = health
        self._routes = routes or {}
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        # handle_request() runs after a readable select; a client that vanished meanwhile holds it 1 s at most
        self._server.timeout = 1.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            data = self._exposition.render(self._snapshots.families())
            headers = [("Content-Type", CONTENT_TYPE)]
            # as prometheus-client decides: a GPU node's text shrinks about tenfold
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                data = gzip.compress(data, compresslevel=6)
                headers.append(("Content-Encoding", "gzip"))
            headers.append(("Content-Length", str(len(data))))
            start_response("200 OK", headers)
            return [data]
        if path == "/healthz":
            body = self._health()
            return json_response(
                start_response, "200 OK" if body.get("ok") else "503 Service Unavailable", body
            )
        route = self._routes.get((method, path))
        if route is not None:
            return route(environ, start_response)
        return json_response(
            start_response,
            "404 Not Found",
            {"error": f"no such endpoint {method} {path}; try /metrics or /healthz"},
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="agent-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        """Answer requests until :meth:`stop`, asleep in between (``serve_forever`` wakes twice a second to
        look for a shutdown, a fifth of an idle agent's CPU time)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._server, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if self._wake_r in ready:
                    return
                self._server.handle_request()

    def stop(self) -> None:
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()
