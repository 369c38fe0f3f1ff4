"""Kubernetes discovery: inference servers on this node, from their pods' annotations.

A pod opts in with annotations, the way Prometheus' ``prometheus.io/scrape`` convention works::

    gpufleet.io/scrape: "true"
    gpufleet.io/port: "8000"            # default: the pod's first declared container port
    gpufleet.io/path: /metrics          # default /metrics
    gpufleet.io/server: vllm            # vllm | triton | tgi | generic; default: told from the metric names
    gpufleet.io/model: llama-3-70b      # for servers that label no model (TGI)
    gpufleet.io/scheme: http            # default http

The pod list comes from a ``PodLister`` (anything returning the pods' JSON objects); production uses the
kubelet's ``/pods`` on this node, so the agent needs no access to the API server.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpufleet.agent.inference.config import Endpoint, Kubernetes
from gpufleet.agent.inference.servers import SERVERS

log = logging.getLogger(__name__)

PREFIX = "gpufleet.io/"


class PodLister(Protocol):
    def __call__(self) -> list[dict[str, Any]]: ...


class KubeletPodLister:
    """Lists the pods of this node from the kubelet's ``/pods`` (read-only port 10255, or 10250 with a token)."""

    def __init__(
        self, kube: Kubernetes, *, timeout: float = 5.0, opener: Callable[..., Any] | None = None
    ) -> None:
        self.url = kube.kubelet.rstrip("/") + "/pods"
        self._kube = kube
        self._timeout = timeout
        self._opener = opener or urllib.request.urlopen
        self._context: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            self._context = ssl.create_default_context(cafile=kube.ca_file)
            if kube.insecure_skip_verify:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def __call__(self) -> list[dict[str, Any]]:
        req = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        if self._kube.token_file:
            with open(self._kube.token_file) as f:  # read each time: service-account tokens rotate
                req.add_header("Authorization", f"Bearer {f.read().strip()}")
        kwargs: dict[str, Any] = {"timeout": self._timeout}
        if self._context is not None:
            kwargs["context"] = self._context
        with self._opener(req, **kwargs) as resp:
            body = json.loads(resp.read())
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ValueError(f"{self.url} did not answer a PodList (no 'items')")
        return items


@dataclass
class Discovered:
    endpoints: list[Endpoint] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why each annotated pod was not taken


def endpoints_from_pods(
    pods: list[dict[str, Any]], gpus_for_pod: Callable[[str, str], list[str]] | None = None
) -> Discovered:
    """The endpoints the annotated, running pods declare; what cannot be used is named in ``skipped``."""
    out = Discovered()
    for pod in pods:
        meta = pod.get("metadata") or {}
        ann = meta.get("annotations") or {}
        if str(ann.get(PREFIX + "scrape", "")).lower() != "true":
            continue
        name, ns = meta.get("name", "?"), meta.get("namespace", "default")
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if status.get("phase") != "Running" or not ip:
            continue  # not serving yet (or any more); picked up on a later refresh
        containers = (pod.get("spec") or {}).get("containers") or []
        port_text = ann.get(PREFIX + "port")
        container = containers[0].get("name") if containers else None
        if port_text is None:
            declared = [
                (c.get("name"), p.get("containerPort")) for c in containers for p in c.get("ports") or []
            ]
            if not declared:
                out.skipped.append(
                    f'{ns}/{name}: no {PREFIX}port annotation and no container port; add {PREFIX}port: "8000"'
                )
                continue
            container, port = declared[0]
        else:
            try:
                port = int(port_text)
            except ValueError:
                out.skipped.append(f"{ns}/{name}: {PREFIX}port {port_text!r} is not a port number")
                continue
            for c in containers:
                if any(p.get("containerPort") == port for p in c.get("ports") or []):
                    container = c.get("name")
        server = ann.get(PREFIX + "server", "auto")
        if server not in (*SERVERS, "auto"):
            out.skipped.append(f"{ns}/{name}: {PREFIX}server {server!r} is not one of {', '.join(SERVERS)}")
            continue
        path = ann.get(PREFIX + "path", "/metrics")
        scheme = ann.get(PREFIX + "scheme", "http")
        host = f"[{ip}]" if ":" in ip else ip
        gpus = tuple(gpus_for_pod(ns, name)) if gpus_for_pod else ()
        out.endpoints.append(
            Endpoint(
                name=f"{ns}/{name}",
                url=f"{scheme}://{host}:{port}/{path.lstrip('/')}",
                server=server,
                model=ann.get(PREFIX + "model"),
                pod=name,
                namespace=ns,
                container=container,
                gpus=gpus,
                histogram=ann.get(PREFIX + "histogram"),
                origin="kubernetes",
            )
        )
    return out
