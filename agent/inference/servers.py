"""What each inference server exposes, read into one shape: per model, histograms, counters and gauges.

The metric names, types, labels and units are the servers' own:

* vLLM (``vllm/v1/metrics/loggers.py``): histograms ``vllm:e2e_request_latency_seconds``,
  ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:request_queue_time_seconds``; counters ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:request_success_total{finished_reason}``; gauges ``vllm:num_requests_running`` / ``_waiting``,
  ``vllm:kv_cache_usage_perc``; labels ``model_name`` and ``engine`` (one per data-parallel engine, summed here).
* Triton: cumulative microsecond counters ``nv_inference_request_duration_us``, ``nv_inference_queue_duration_us``,
  ``nv_inference_compute_infer_duration_us`` with ``nv_inference_request_success`` / ``_failure{reason}`` and
  ``nv_inference_count``; optional summaries ``nv_inference_request_summary_us`` / ``nv_inference_queue_summary_us``
  (``--metrics-config summary_latencies=true``) and the first-response histogram
  ``nv_inference_first_response_histogram_ms`` (``histogram_latencies=true``, decoupled models); labels
  ``model`` and ``version`` (versions are summed).
* TGI (router): histograms in seconds ``tgi_request_duration``, ``tgi_request_queue_duration``,
  ``tgi_request_mean_time_per_token_duration``; counters ``tgi_request_count``, ``tgi_request_failure{err}``;
  gauges ``tgi_queue_size``, ``tgi_batch_current_size``. TGI serves one model and labels none, so the model
  comes from the endpoint's configuration.
* generic: any Prometheus histogram named in the configuration.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.agent.inference.histogram import INF, Histogram

log = logging.getLogger(__name__)

SERVERS = ("vllm", "triton", "tgi", "generic")


@dataclass
class ModelReading:
    """One scrape of one model: cumulative histograms (seconds), cumulative counters and current gauges.

    Histogram keys: ``e2e``, ``ttft``, ``itl``, ``queue``. Counter keys: ``requests``, ``errors``,
    ``prompt_tokens``, ``generation_tokens``, ``inferences``, and for servers that only sum durations
    (Triton) ``e2e_seconds`` / ``queue_seconds`` / ``compute_seconds`` with ``timed_requests``.
    Gauge keys: ``running``, ``waiting``, ``kv_cache``. ``quantiles`` holds quantiles the server
    computed itself (Triton's summaries), in seconds.
    """

    histograms: dict[str, Histogram] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    quantiles: dict[str, dict[float, float]] = field(default_factory=dict)


Reading = dict[str, ModelReading]


class Exposition:
    """A parsed ``/metrics`` page, by family name (counters without ``_total``, as the parser names them)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.families)

    def samples(self, family: str, suffix: str = "") -> list[Sample]:
        fam = self.families.get(family)
        if fam is None:
            return []
        want = family + suffix
        return [s for s in fam.samples if s.name == want]

    def counter(
        self,
        family: str,
        model_label: str | None,
        default_model: str,
        keep: Callable[[dict[str, str]], bool] = lambda labels: True,
    ) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        fam = self.families.get(family)
        if fam is None:
            return {}
        for s in fam.samples:
            # counters read as NAME_total (the parser adds it); untyped pages keep the bare name
            if s.name not in (family + "_total", family) or not keep(s.labels):
                continue
            out[_model(s.labels, model_label, default_model)] += s.value
        return dict(out)

    def gauge(
        self, family: str, model_label: str | None, default_model: str, combine: str = "sum"
    ) -> dict[str, float]:
        groups: dict[str, list[float]] = defaultdict(list)
        for s in self.samples(family):
            groups[_model(s.labels, model_label, default_model)].append(s.value)
        if combine == "mean":
            return {m: sum(v) / len(v) for m, v in groups.items()}
        return {m: sum(v) for m, v in groups.items()}

    def histogram(
        self, family: str, model_label: str | None, default_model: str, scale: float = 1.0
    ) -> dict[str, Histogram]:
        """Per model, the family's histograms summed over its other labels (e.g. vLLM's ``engine``)."""
        fam = self.families.get(family)
        if fam is None:
            return {}
        series: dict[tuple, dict] = defaultdict(lambda: {"buckets": [], "sum": 0.0, "count": None})
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            key = tuple(sorted(labels.items()))
            entry = series[key]
            entry["model"] = _model(labels, model_label, default_model)
            if s.name == family + "_bucket":
                entry["buckets"].append((_le(s.labels.get("le", "+Inf")), s.value))
            elif s.name == family + "_sum":
                entry["sum"] = s.value
            elif s.name == family + "_count":
                entry["count"] = s.value
        out: dict[str, Histogram] = {}
        for entry in series.values():
            if not entry["buckets"]:
                continue
            h = Histogram.from_buckets(entry["buckets"], entry["sum"], entry["count"]).scaled(scale)
            model = entry["model"]
            if model in out:
                try:
                    out[model] = out[model] + h
                except ValueError:
                    log.warning(
                        "%s for model %s has series with different buckets; keeping the first", family, model
                    )
            else:
                out[model] = h
        return out

    def summary(
        self, family: str, model_label: str | None, default_model: str, scale: float = 1.0
    ) -> dict[str, dict[float, float]]:
        """Per model, the summary's quantiles (the largest value over series of one model: a conservative merge)."""
        out: dict[str, dict[float, float]] = defaultdict(dict)
        for s in self.samples(family):
            if (
                "quantile" not in s.labels or s.value != s.value
            ):  # NaN: no observation in the summary's window
                continue
            q = float(s.labels["quantile"])
            model = _model(s.labels, model_label, default_model)
            out[model][q] = max(out[model].get(q, 0.0), s.value * scale)
        return dict(out)


def _le(text: str) -> float:
    return INF if text in ("+Inf", "Inf", "inf") else float(text)


def _model(labels: dict[str, str], model_label: str | None, default_model: str) -> str:
    if model_label and labels.get(model_label):
        return labels[model_label]
    return default_model


def _assemble(models: Iterable[str], **parts: dict[str, dict]) -> Reading:
    """Turn ``{kind: {key: {model: value}}}`` into ``{model: ModelReading}``."""
    out: Reading = {m: ModelReading() for m in models}
    for kind, by_key in parts.items():
        for key, per_model in by_key.items():
            for model, value in per_model.items():
                getattr(out.setdefault(model, ModelReading()), kind)[key] = value
    return out


def _zero_when_absent(counter: dict[str, float], models: Iterable[str]) -> dict[str, float]:
    """A labelled counter has no series until its first increment: a model that serves requests and shows no
    error series has failed none, and says 0 rather than nothing (a healthy model must not read "No data")."""
    return {m: counter.get(m, 0.0) for m in set(counter) | set(models)}


def read_vllm(page: Exposition, default_model: str, **_: object) -> Reading:
    ml = "model_name"
    itl = "vllm:inter_token_latency_seconds"
    if itl not in page.families:  # vLLM before 0.11 named it time_per_output_token
        itl = "vllm:time_per_output_token_seconds"
    kv = (
        "vllm:kv_cache_usage_perc"
        if "vllm:kv_cache_usage_perc" in page.families
        else "vllm:gpu_cache_usage_perc"
    )
    hists = {
        "e2e": page.histogram("vllm:e2e_request_latency_seconds", ml, default_model),
        "ttft": page.histogram("vllm:time_to_first_token_seconds", ml, default_model),
        "itl": page.histogram(itl, ml, default_model),
        "queue": page.histogram("vllm:request_queue_time_seconds", ml, default_model),
    }
    counters = {
        "prompt_tokens": page.counter("vllm:prompt_tokens", ml, default_model),
        "generation_tokens": page.counter("vllm:generation_tokens", ml, default_model),
    }
    if "vllm:request_success" in page.families:
        counters["requests"] = page.counter("vllm:request_success", ml, default_model)
        # finished_reason is stop / length / abort / error; an abort is the client hanging up, not a failure
        # vLLM before v1 has no "error" reason, and a server shows a reason only once it has happened
        errors = page.counter(
            "vllm:request_success",
            ml,
            default_model,
            keep=lambda labels: labels.get("finished_reason") == "error",
        )
        counters["errors"] = _zero_when_absent(errors, counters["requests"])
    gauges = {
        "running": page.gauge("vllm:num_requests_running", ml, default_model),
        "waiting": page.gauge("vllm:num_requests_waiting", ml, default_model),
        "kv_cache": page.gauge(kv, ml, default_model, combine="mean"),
    }
    models = set(hists["e2e"]) | set(gauges["running"])
    return _assemble(models, histograms=hists, counters=counters, gauges=gauges)


def read_triton(page: Exposition, default_model: str, **_: object) -> Reading:
    ml, us, ms = "model", 1e-6, 1e-3
    success = page.counter("nv_inference_request_success", ml, default_model)
    failure = page.counter("nv_inference_request_failure", ml, default_model)
    counters = {
        "requests": {m: success.get(m, 0.0) + failure.get(m, 0.0) for m in set(success) | set(failure)},
        "errors": {m: failure.get(m, 0.0) for m in set(success) | set(failure)},
        # the duration counters are summed over successful requests (Triton's docs compare them to _success)
        "timed_requests": success,
        "inferences": page.counter("nv_inference_count", ml, default_model),
    }
    for key, family in (
        ("e2e_seconds", "nv_inference_request_duration_us"),
        ("queue_seconds", "nv_inference_queue_duration_us"),
        ("compute_seconds", "nv_inference_compute_infer_duration_us"),
    ):
        counters[key] = {m: v * us for m, v in page.counter(family, ml, default_model).items()}
    hists = {"ttft": page.histogram("nv_inference_first_response_histogram_ms", ml, default_model, scale=ms)}
    quantiles = {
        "e2e": page.summary("nv_inference_request_summary_us", ml, default_model, scale=us),
        "queue": page.summary("nv_inference_queue_summary_us", ml, default_model, scale=us),
    }
    gauges = {"waiting": page.gauge("nv_inference_pending_request_count", ml, default_model)}
    return _assemble(success, histograms=hists, counters=counters, gauges=gauges, quantiles=quantiles)


def read_tgi(page: Exposition, default_model: str, **_: object) -> Reading:
    m = default_model
    hists = {
        "e2e": page.histogram("tgi_request_duration", None, m),
        "queue": page.histogram("tgi_request_queue_duration", None, m),
        # TGI's closest to inter-token latency: each request's inference time over its generated tokens
        "itl": page.histogram("tgi_request_mean_time_per_token_duration", None, m),
    }
    counters = {
        "requests": page.counter("tgi_request_count", None, m),
        "errors": page.counter("tgi_request_failure", None, m),
    }
    for key, family in (
        ("generation_tokens", "tgi_request_generated_tokens"),
        ("prompt_tokens", "tgi_request_input_length"),
    ):
        sums = page.samples(family, "_sum")  # token-count histograms: their sum is the tokens
        if sums:
            counters[key] = {m: sum(s.value for s in sums)}
    # TGI shows the failure counter only after the first failure
    counters["errors"] = _zero_when_absent(counters["errors"], counters["requests"])
    gauges = {
        "waiting": page.gauge("tgi_queue_size", None, m),
        "running": page.gauge("tgi_batch_current_size", None, m),
    }
    return _assemble(
        set(hists["e2e"]) | set(counters["requests"]), histograms=hists, counters=counters, gauges=gauges
    )


def read_generic(
    page: Exposition,
    default_model: str,
    *,
    histogram: str | None = None,
    ttft_histogram: str | None = None,
    scale: float = 1.0,
    model_label: str | None = None,
    errors_counter: str | None = None,
    **_: object,
) -> Reading:
    if not histogram:
        raise ValueError("a generic endpoint needs 'histogram': the name of its latency histogram")
    hists = {"e2e": page.histogram(histogram, model_label, default_model, scale=scale)}
    if ttft_histogram:
        hists["ttft"] = page.histogram(ttft_histogram, model_label, default_model, scale=scale)
    counters = {}
    if errors_counter:
        errors = page.counter(errors_counter.removesuffix("_total"), model_label, default_model)
        counters["errors"] = _zero_when_absent(errors, hists["e2e"])
    return _assemble(hists["e2e"], histograms=hists, counters=counters)


READERS: dict[str, Callable[..., Reading]] = {
    "vllm": read_vllm,
    "triton": read_triton,
    "tgi": read_tgi,
    "generic": read_generic,
}


def detect_server(page: Exposition) -> str | None:
    """Which server wrote this page, from its metric names; None when it is none we know."""
    if page.has_prefix("vllm:"):
        return "vllm"
    if page.has_prefix("nv_inference_"):
        return "triton"
    if page.has_prefix("tgi_"):
        return "tgi"
    return None
