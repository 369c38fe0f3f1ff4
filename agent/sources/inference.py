"""Inference source: per-model latency of the inference servers on this node, next to the GPUs serving them.

Every ``interval`` seconds it scrapes each endpoint's ``/metrics`` (from the configuration and, on
Kubernetes, from annotated pods), reads it with the server's reader (vLLM, Triton, TGI, generic) and turns
the difference with the previous scrape into ``gpufleet_inference_*`` series: request and error rates,
p50/p90/p99 of end-to-end latency, time to first token, inter-token latency and queue time, tokens per
second, running and waiting requests, SLO burn rates and the ratio of p99 to its own baseline. Probe
results and latencies sent by the client API join the same series. See docs/inference.md.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpufleet.agent.families import Family
from gpufleet.agent.inference.config import Endpoint, InferenceSettings
from gpufleet.agent.inference.discovery import KubeletPodLister, PodLister, endpoints_from_pods
from gpufleet.agent.inference.probes import ProbeRunner
from gpufleet.agent.inference.receiver import Receiver
from gpufleet.agent.inference.servers import READERS, Exposition, Reading, detect_server
from gpufleet.agent.inference.state import MULTIWINDOWS, ModelState
from gpufleet.core.metricspec import MetricSpec

log = logging.getLogger(__name__)

Fetch = Callable[[str, float], str]
GpuLookup = Callable[[], list[tuple[str, str]]]  # (index, uuid) of every GPU on the node

_HIST_FAMILIES = {
    "e2e": (
        "gpufleet_inference_request_duration_seconds",
        "End-to-end request latency over the last interval.",
    ),
    "ttft": ("gpufleet_inference_time_to_first_token_seconds", "Time to first token over the last interval."),
    "itl": ("gpufleet_inference_inter_token_latency_seconds", "Inter-token latency over the last interval."),
    "queue": (
        "gpufleet_inference_queue_time_seconds",
        "Time requests waited in the server's queue, last interval.",
    ),
}
_MEAN_FAMILIES = {
    "e2e": (
        "gpufleet_inference_request_duration_mean_seconds",
        "Mean end-to-end latency over the last interval.",
    ),
    "queue": ("gpufleet_inference_queue_time_mean_seconds", "Mean queue time over the last interval."),
    "compute": (
        "gpufleet_inference_compute_time_mean_seconds",
        "Mean model execution time over the last interval.",
    ),
}
_RATE_FAMILIES = {
    "requests": (
        "gpufleet_inference_requests_per_second",
        "Requests finished per second over the last interval.",
    ),
    "errors": ("gpufleet_inference_errors_per_second", "Requests failed per second over the last interval."),
    "prompt_tokens": ("gpufleet_inference_prompt_tokens_per_second", "Prompt tokens processed per second."),
    "generation_tokens": ("gpufleet_inference_generation_tokens_per_second", "Tokens generated per second."),
    "inferences": (
        "gpufleet_inference_inferences_per_second",
        "Inferences per second (a batch of n counts n).",
    ),
}
_GAUGE_FAMILIES = {
    "running": ("gpufleet_inference_requests_running", "Requests being executed now."),
    "waiting": ("gpufleet_inference_requests_waiting", "Requests waiting in the server's queue now."),
    "kv_cache": ("gpufleet_inference_kv_cache_usage_ratio", "Share of the KV cache in use (0..1)."),
}


def http_fetch(url: str, timeout: float) -> str:
    # Ask for the classic text format: prometheus_client servers answer OpenMetrics only when asked.
    req = urllib.request.Request(
        url, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": "gpufleet-agent"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode("utf-8", "replace")


class _EndpointState:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.server: str | None = None if endpoint.server == "auto" else endpoint.server
        self.models: dict[str, ModelState] = {}
        self.up = False
        self.failures = 0
        self.last_error: str | None = None
        self.scrape_seconds = 0.0
        self.last_success_at: float | None = None


class InferenceSource:
    name = "inference"
    # Its series carry the pod of the endpoint from discovery; gpufleet_inference_gpu_info names GPUs by uuid
    # only to join with the GPU series, so it is left as it is.
    names_devices = False

    def __init__(
        self,
        settings: InferenceSettings,
        node: str,
        *,
        cluster: str | None = None,
        fetch: Fetch = http_fetch,
        pod_lister: PodLister | None = None,
        gpus_for_pod: Callable[[str, str], list[str]] | None = None,
        gpu_lookup: GpuLookup | None = None,
        clock: Callable[[], float] = time.time,
        probe_runner: ProbeRunner | None = None,
        receiver: Receiver | None = None,
    ) -> None:
        self.settings = settings
        self._node, self._cluster = node, cluster
        self._fetch = fetch
        if pod_lister is None and settings.kubernetes is not None:
            pod_lister = KubeletPodLister(settings.kubernetes)
        self._pod_lister = pod_lister
        self._gpus_for_pod = gpus_for_pod
        self._gpu_lookup = gpu_lookup
        self._clock = clock
        self.probes = (
            probe_runner
            if probe_runner is not None
            else (ProbeRunner(settings.probes) if settings.probes else None)
        )
        self._receiver_given = receiver
        self.receiver = receiver
        self._endpoints: dict[str, _EndpointState] = {e.name: _EndpointState(e) for e in settings.endpoints}
        self._client_state = _EndpointState(Endpoint("client", "", server="client", origin="client"))
        self._discovered: set[str] = set()
        self._discovery_at: float | None = None
        self._discovery_error: str | None = None
        self.discovery_skipped: list[str] = []
        self._last_scrape: float | None = None
        self._cached: list[Family] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.receiver is None and self.settings.receiver:
            self.receiver = Receiver(self.settings.receiver)
        if self.receiver is not None and self._receiver_given is None:
            self.receiver.start()
        if self.probes is not None:
            self.probes.start()

    def close(self) -> None:
        if self.probes is not None:
            self.probes.stop()
        if self.receiver is not None and self._receiver_given is None:
            self.receiver.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def endpoints(self) -> list[Endpoint]:
        return [s.endpoint for s in self._endpoints.values()]

    # ---- discovery -------------------------------------------------------------------------------
    def _refresh_discovery(self, now: float) -> None:
        kube = self.settings.kubernetes
        refresh = kube.refresh if kube is not None else 30.0
        if self._pod_lister is None or (
            self._discovery_at is not None and now - self._discovery_at < refresh
        ):
            return
        self._discovery_at = now
        try:
            found = endpoints_from_pods(self._pod_lister(), self._gpus_for_pod)
        except Exception as exc:
            msg = (
                f"cannot list pods for inference discovery ({exc}); keeping the {len(self._discovered)} known"
            )
            if msg != self._discovery_error:
                log.warning(msg)
            self._discovery_error = msg
            return
        if self._discovery_error:
            log.info("inference discovery lists pods again")
        self._discovery_error = None
        for why in set(found.skipped) - set(self.discovery_skipped):
            log.warning("inference discovery skips %s", why)
        self.discovery_skipped = found.skipped
        names = {e.name for e in found.endpoints}
        for gone in self._discovered - names:
            self._endpoints.pop(gone, None)
            log.info("inference endpoint %s is gone", gone)
        for e in found.endpoints:
            state = self._endpoints.get(e.name)
            if state is None or state.endpoint != e:
                if state is None:
                    log.info("inference endpoint %s discovered at %s", e.name, e.url)
                self._endpoints[e.name] = _EndpointState(e)
        self._discovered = names

    # ---- scraping --------------------------------------------------------------------------------
    def _scrape(self, state: _EndpointState) -> Reading | None:
        e = state.endpoint
        t0 = time.perf_counter()
        try:
            page = Exposition(self._fetch(e.url, self.settings.scrape_timeout))
            server = state.server or detect_server(page) or ("generic" if e.histogram else None)
            if server is None:
                raise ValueError(
                    "its metric names are not vLLM's, Triton's or TGI's; set server: and, for "
                    "generic, histogram: in the endpoint's configuration"
                )
            state.server = server
            reading = READERS[server](page, e.model or e.name, **e.reader_options())
        except Exception as exc:
            state.scrape_seconds = time.perf_counter() - t0
            state.failures += 1
            msg = f"cannot scrape inference endpoint {e.name} at {e.url}: {exc}"
            if state.up or state.last_error is None:
                log.warning(msg)
            state.up, state.last_error = False, msg
            return None
        state.scrape_seconds = time.perf_counter() - t0
        if not state.up and state.last_error:
            log.info("inference endpoint %s answers again", e.name)
        state.up, state.last_error = True, None
        return reading

    def collect(self) -> list[Family]:
        now = self._clock()
        with self._lock:
            if self._last_scrape is not None and now - self._last_scrape < self.settings.interval:
                return self._cached
            self._last_scrape = now
            self._refresh_discovery(now)
            states = list(self._endpoints.values())
            if len(states) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="inference-scrape")
                readings = list(self._pool.map(self._scrape, states))
            else:
                readings = [self._scrape(s) for s in states]
            pairs = list(zip(states, readings, strict=True))
            if self.receiver is not None:
                pairs.append((self._client_state, self.receiver.reading()))
            self._cached = self._families(pairs, now)
            return self._cached

    # ---- output ----------------------------------------------------------------------------------
    def _gpus(self, e: Endpoint) -> list[tuple[str, str]]:
        if not e.gpus:
            return []
        known = self._gpu_lookup() if self._gpu_lookup else []
        by_index = dict(known)
        by_uuid = {u: i for i, u in known}
        out = []
        for g in e.gpus:
            if g in by_index:
                out.append((g, by_index[g]))
            elif g in by_uuid:
                out.append((by_uuid[g], g))
            else:
                out.append((g, "") if g.isdigit() else ("", g))
        return out

    def _endpoint_labels(self, state: _EndpointState) -> dict[str, str]:
        e = state.endpoint
        labels = {"node": self._node, "endpoint": e.name, "server": state.server or e.server}
        if self._cluster:
            labels["cluster"] = self._cluster
        for key in ("pod", "namespace", "container"):
            if getattr(e, key):
                labels[key] = getattr(e, key)
        gpus = self._gpus(e)
        if gpus:
            labels["gpus"] = ",".join(i or u for i, u in gpus)
        return labels

    def _families(self, pairs: list[tuple[_EndpointState, Reading | None]], now: float) -> list[Family]:
        fam: dict[str, Family] = {}

        def add(name: str, kind: str, help_text: str, labels: dict[str, str], value: float) -> None:
            f = fam.get(name)
            if f is None:
                f = fam[name] = Family(name, kind, help_text)
            f.add(labels, value)

        for state, reading in pairs:
            base = self._endpoint_labels(state)
            e = state.endpoint
            if e.origin != "client":
                add(
                    "gpufleet_inference_up",
                    "gauge",
                    "1 when the endpoint's metrics page was read.",
                    base,
                    1.0 if state.up else 0.0,
                )
                add(
                    "gpufleet_inference_scrape_failures_total",
                    "counter",
                    "Scrapes of the endpoint that failed.",
                    base,
                    state.failures,
                )
                add(
                    "gpufleet_inference_scrape_duration_seconds",
                    "gauge",
                    "Time the last scrape took.",
                    base,
                    state.scrape_seconds,
                )
            if reading is None:
                continue
            slo = e.slo or self.settings.slo
            seen_at, state.last_success_at = state.last_success_at, now
            for model, r in reading.items():
                labels = {**base, "model": model}
                ms = state.models.get(model)
                if ms is None:
                    ms = state.models[model] = ModelState()
                    if seen_at is not None:  # a new model on an endpoint read before: it started from zero
                        ms.seed_empty(seen_at)
                for key, value in r.gauges.items():
                    name, help_text = _GAUGE_FAMILIES[key]
                    add(name, "gauge", help_text, labels, value)
                for i, u in self._gpus(e):
                    add(
                        "gpufleet_inference_gpu_info",
                        "gauge",
                        "A GPU serving the model; join on uuid with gpufleet_gpu_* series. Always 1.",
                        {**labels, "gpu": i, "uuid": u},
                        1.0,
                    )
                result = ms.update(r, now, slo)
                add(
                    "gpufleet_inference_requests_total",
                    "counter",
                    "Requests finished, counted by the agent across server restarts.",
                    labels,
                    ms.totals["requests"],
                )
                add(
                    "gpufleet_inference_errors_total",
                    "counter",
                    "Requests failed, counted by the agent across server restarts.",
                    labels,
                    ms.totals["errors"],
                )
                if slo is not None:
                    add(
                        "gpufleet_inference_latency_slo_objective_seconds",
                        "gauge",
                        "The latency objective: requests should finish within this many seconds.",
                        labels,
                        slo.latency_seconds,
                    )
                    add(
                        "gpufleet_inference_latency_slo_target_ratio",
                        "gauge",
                        "Share of requests that must meet the latency objective.",
                        labels,
                        slo.target,
                    )
                if result is None:
                    continue
                for key, qs in result.quantiles.items():
                    name, help_text = _HIST_FAMILIES[key]
                    for q, v in qs.items():
                        add(name, "gauge", help_text, {**labels, "quantile": f"{q:g}"}, v)
                for key, v in result.means.items():
                    if key in _MEAN_FAMILIES:
                        name, help_text = _MEAN_FAMILIES[key]
                        add(name, "gauge", help_text, labels, v)
                for key, v in result.rates.items():
                    if key in _RATE_FAMILIES:
                        name, help_text = _RATE_FAMILIES[key]
                        add(name, "gauge", help_text, labels, v)
                if result.error_ratio is not None:
                    add(
                        "gpufleet_inference_error_ratio",
                        "gauge",
                        "Share of the interval's requests that failed.",
                        labels,
                        result.error_ratio,
                    )
                for window, rate in result.burn_rates.items():
                    add(
                        "gpufleet_inference_latency_slo_burn_rate",
                        "gauge",
                        "Error-budget burn rate of the latency SLO over the window (1 = exactly on budget).",
                        {**labels, "window": window},
                        rate,
                    )
                for windows, (long, short) in MULTIWINDOWS.items():
                    if long in result.burn_rates and short in result.burn_rates:
                        add(
                            "gpufleet_inference_latency_slo_multiwindow_burn_rate",
                            "gauge",
                            "The smaller of the burn rates over a long and a short window: above the alert's "
                            "rate only while both are.",
                            {**labels, "windows": windows},
                            min(result.burn_rates[long], result.burn_rates[short]),
                        )
                if result.baseline_ratio is not None:
                    add(
                        "gpufleet_inference_latency_baseline_ratio",
                        "gauge",
                        "p99 latency of the last interval over its own slow-moving baseline (2 = doubled).",
                        {**labels, "quantile": "0.99"},
                        result.baseline_ratio,
                    )
        self._probe_families(add)
        if self.receiver is not None:
            rl = {"node": self._node, **({"cluster": self._cluster} if self._cluster else {})}
            add(
                "gpufleet_inference_client_datagrams_total",
                "counter",
                "Latency records received from the client API.",
                rl,
                self.receiver.datagrams,
            )
            for why, n in self.receiver.invalid.items():
                add(
                    "gpufleet_inference_client_dropped_datagrams_total",
                    "counter",
                    "Client datagrams that could not be used, by reason.",
                    {**rl, "reason": why},
                    n,
                )
        if self._pod_lister is not None:
            rl = {"node": self._node, **({"cluster": self._cluster} if self._cluster else {})}
            add(
                "gpufleet_inference_discovered_endpoints",
                "gauge",
                "Endpoints found through Kubernetes pod annotations.",
                rl,
                len(self._discovered),
            )
            add(
                "gpufleet_inference_discovery_skipped_pods",
                "gauge",
                "Annotated pods that could not be scraped (the agent's log says why).",
                rl,
                len(self.discovery_skipped),
            )
        return list(fam.values())

    def _probe_families(self, add: Callable[..., Any]) -> None:
        if self.probes is None:
            return
        runs, failures, last = self.probes.snapshot()
        for p in self.probes.probes:
            labels = {
                "node": self._node,
                "probe": p.name,
                "kind": p.kind,
                **({"cluster": self._cluster} if self._cluster else {}),
            }
            if p.model:
                labels["model"] = p.model
            add("gpufleet_inference_probes_total", "counter", "Probe runs.", labels, runs.get(p.name, 0))
            for (name, reason), n in failures.items():
                if name == p.name:
                    add(
                        "gpufleet_inference_probe_failures_total",
                        "counter",
                        "Probe runs that failed, by reason.",
                        {**labels, "reason": reason},
                        n,
                    )
            r = last.get(p.name)
            if r is None:
                continue
            add(
                "gpufleet_inference_probe_success",
                "gauge",
                "1 when the last probe run succeeded.",
                labels,
                1.0 if r.ok else 0.0,
            )
            if r.ok and r.duration is not None:
                add(
                    "gpufleet_inference_probe_duration_seconds",
                    "gauge",
                    "Total time of the last probe run.",
                    labels,
                    r.duration,
                )
            if r.ok and r.ttft is not None:
                add(
                    "gpufleet_inference_probe_time_to_first_token_seconds",
                    "gauge",
                    "Time to the first streamed token of the last probe run.",
                    labels,
                    r.ttft,
                )


# ---- the series this source emits, for the metric catalogue (tests run the source and compare) ----------
_ENDPOINT = ("cluster", "node", "endpoint", "server", "pod", "namespace", "container", "gpus")
_MODEL = (*_ENDPOINT, "model")
_NODE = ("cluster", "node")
_PROBE = ("cluster", "node", "probe", "kind", "model")
_SCRAPED = "when configured: scraped endpoints"
_SERVED = "after the second read of a model that served requests"


def _specs(
    table: dict[str, tuple[str, str]], unit: str, labels: tuple[str, ...], when: str
) -> tuple[MetricSpec, ...]:
    return tuple(
        MetricSpec(name, "gauge", unit, help_text, labels, when) for name, help_text in table.values()
    )


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "gpufleet_inference_up",
        "gauge",
        "",
        "1 when the endpoint's metrics page was read.",
        _ENDPOINT,
        _SCRAPED,
    ),
    MetricSpec(
        "gpufleet_inference_scrape_failures_total",
        "counter",
        "",
        "Scrapes of the endpoint that failed.",
        _ENDPOINT,
        _SCRAPED,
    ),
    MetricSpec(
        "gpufleet_inference_scrape_duration_seconds",
        "gauge",
        "seconds",
        "Time the last scrape took.",
        _ENDPOINT,
        _SCRAPED,
    ),
    *_specs(_GAUGE_FAMILIES, "", _MODEL, "when the server reports it"),
    MetricSpec(
        "gpufleet_inference_gpu_info",
        "gauge",
        "",
        "A GPU serving the model; join on uuid with gpufleet_gpu_* series. Always 1.",
        (*_MODEL, "gpu", "uuid"),
        "when the endpoint's GPUs are known (Kubernetes pod-resources, or configured)",
    ),
    MetricSpec(
        "gpufleet_inference_requests_total",
        "counter",
        "",
        "Requests finished, counted by the agent across server restarts.",
        _MODEL,
    ),
    MetricSpec(
        "gpufleet_inference_errors_total",
        "counter",
        "",
        "Requests failed, counted by the agent across server restarts.",
        _MODEL,
    ),
    MetricSpec(
        "gpufleet_inference_latency_slo_objective_seconds",
        "gauge",
        "seconds",
        "The latency objective: requests should finish within this many seconds.",
        _MODEL,
        "opt-in: an SLO configured",
    ),
    MetricSpec(
        "gpufleet_inference_latency_slo_target_ratio",
        "gauge",
        "ratio",
        "Share of requests that must meet the latency objective.",
        _MODEL,
        "opt-in: an SLO configured",
    ),
    *_specs(_HIST_FAMILIES, "seconds", (*_MODEL, "quantile"), _SERVED),
    *_specs(_MEAN_FAMILIES, "seconds", _MODEL, _SERVED),
    *_specs(_RATE_FAMILIES, "per second", _MODEL, "after the second read of a model"),
    MetricSpec(
        "gpufleet_inference_error_ratio",
        "gauge",
        "ratio",
        "Share of the interval's requests that failed.",
        _MODEL,
        _SERVED,
    ),
    MetricSpec(
        "gpufleet_inference_latency_slo_burn_rate",
        "gauge",
        "",
        "Error-budget burn rate of the latency SLO over the window (1 = exactly on budget).",
        (*_MODEL, "window"),
        "opt-in: an SLO configured",
    ),
    MetricSpec(
        "gpufleet_inference_latency_slo_multiwindow_burn_rate",
        "gauge",
        "",
        "The smaller of the burn rates over a long and a short window: above the alert's rate only while both are.",
        (*_MODEL, "windows"),
        "opt-in: an SLO configured",
    ),
    MetricSpec(
        "gpufleet_inference_latency_baseline_ratio",
        "gauge",
        "ratio",
        "p99 latency of the last interval over its own slow-moving baseline (2 = doubled).",
        (*_MODEL, "quantile"),
        "after a baseline has formed",
    ),
    MetricSpec(
        "gpufleet_inference_client_datagrams_total",
        "counter",
        "",
        "Latency records received from the client API.",
        _NODE,
        "opt-in: the client receiver",
    ),
    MetricSpec(
        "gpufleet_inference_client_dropped_datagrams_total",
        "counter",
        "",
        "Client datagrams that could not be used, by reason.",
        (*_NODE, "reason"),
        "after an event: an unusable datagram",
    ),
    MetricSpec(
        "gpufleet_inference_discovered_endpoints",
        "gauge",
        "",
        "Endpoints found through Kubernetes pod annotations.",
        _NODE,
        "on Kubernetes (pod discovery)",
    ),
    MetricSpec(
        "gpufleet_inference_discovery_skipped_pods",
        "gauge",
        "",
        "Annotated pods that could not be scraped (the agent's log says why).",
        _NODE,
        "on Kubernetes (pod discovery)",
    ),
    MetricSpec(
        "gpufleet_inference_probes_total", "counter", "", "Probe runs.", _PROBE, "opt-in: probes configured"
    ),
    MetricSpec(
        "gpufleet_inference_probe_failures_total",
        "counter",
        "",
        "Probe runs that failed, by reason.",
        (*_PROBE, "reason"),
        "after an event: a failed probe",
    ),
    MetricSpec(
        "gpufleet_inference_probe_success",
        "gauge",
        "",
        "1 when the last probe run succeeded.",
        _PROBE,
        "opt-in: probes configured",
    ),
    MetricSpec(
        "gpufleet_inference_probe_duration_seconds",
        "gauge",
        "seconds",
        "Total time of the last probe run.",
        _PROBE,
        "opt-in: probes configured",
    ),
    MetricSpec(
        "gpufleet_inference_probe_time_to_first_token_seconds",
        "gauge",
        "seconds",
        "Time to the first streamed token of the last probe run.",
        _PROBE,
        "opt-in: streaming probes",
    ),
)
