"""Inference: how fast each model answers, next to how busy the GPUs serving it are."""

from __future__ import annotations

from gpufleet.dashboards.model import DashboardDef, PanelDef, Query, Row, sql_filter
from gpufleet.dashboards.queries import sel, sql_fleet_sum

V = ("cluster",)
F = sql_filter(V)

# Series the agent's inference source writes, labelled model and server (and node, cluster).
# Latencies are quantile gauges labelled quantile="0.5" / "0.99".
REQUEST_DURATION = "gpufleet_inference_request_duration_seconds"
REQUESTS = "gpufleet_inference_requests_per_second"
TTFT = "gpufleet_inference_time_to_first_token_seconds"
ITL = "gpufleet_inference_inter_token_latency_seconds"
QUEUE = "gpufleet_inference_queue_time_seconds"
GENERATION_TOKENS = "gpufleet_inference_generation_tokens_per_second"
PROMPT_TOKENS = "gpufleet_inference_prompt_tokens_per_second"
ERRORS = "gpufleet_inference_errors_per_second"


def _quantile_sql(metric: str, quantile: str) -> str:
    # max over servers: the slowest server of a model is the one its users wait for
    return (
        f"SELECT $__timeGroupAlias(time, $__interval), model || ' p{quantile[2:]}' AS metric, max(value) AS value\n"
        f"FROM metric_samples WHERE metric = '{metric}' AND labels ->> 'quantile' = '{quantile}'\n"
        f"  AND $__timeFilter(time) AND {F}\nGROUP BY 1, 2 ORDER BY 1, 2"
    )


def _quantile_matcher(q: str) -> str:
    return 'quantile="' + q + '"'


def _quantiles(metric: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            _quantile_sql(metric, q),
            f"max by (model) ({sel(metric, V, _quantile_matcher(q))})",
            f"{{{{model}}}} p{q[2:]}",
        )
        for q in ("0.5", "0.99")
    )


def _per_model(metric: str) -> Query:
    return Query(sql_fleet_sum(metric, V, by="model"), f"sum by (model) ({sel(metric, V)})", "{{model}}")


_serving_nodes = (
    "SELECT DISTINCT node FROM metric_samples WHERE metric = '" + REQUESTS + "' AND $__timeFilter(time)"
)

traffic = Row(
    "Traffic",
    (
        PanelDef(
            "Requests per second",
            "How much traffic does each model serve?",
            "timeseries",
            (_per_model(REQUESTS),),
            unit="reqps",
            min=0,
            width=6,
        ),
        PanelDef(
            "Tokens generated per second",
            "How many tokens does each model generate?",
            "timeseries",
            (_per_model(GENERATION_TOKENS),),
            min=0,
            width=6,
        ),
        PanelDef(
            "Prompt tokens per second",
            "How many prompt tokens does each model read (prefill)?",
            "timeseries",
            (_per_model(PROMPT_TOKENS),),
            min=0,
            width=6,
        ),
        PanelDef(
            "Errors per second",
            "Is any model failing requests?",
            "timeseries",
            (_per_model(ERRORS),),
            unit="reqps",
            min=0,
            width=6,
        ),
    ),
)
latency = Row(
    "Latency",
    (
        PanelDef(
            "Request latency p50 / p99",
            "How long does a whole request take, typically and at the tail?",
            "timeseries",
            _quantiles(REQUEST_DURATION),
            unit="s",
            min=0,
            width=12,
        ),
        PanelDef(
            "Time to first token",
            "How long do users wait before the first token streams back?",
            "timeseries",
            _quantiles(TTFT),
            unit="s",
            min=0,
            width=12,
        ),
        PanelDef(
            "Inter-token latency",
            "How fast does the answer stream once it started?",
            "timeseries",
            _quantiles(ITL),
            unit="s",
            min=0,
            width=12,
        ),
        PanelDef(
            "Queue time",
            "How long do requests wait before a GPU starts on them (too few replicas)?",
            "timeseries",
            _quantiles(QUEUE),
            unit="s",
            min=0,
            width=12,
        ),
    ),
)
gpus = Row(
    "Serving GPUs",
    (
        PanelDef(
            "SM activity of the serving GPUs",
            "Are the GPUs behind these models busy? High latency with idle SMs points at the server, not the GPU.",
            "timeseries",
            (
                Query(
                    f"SELECT $__timeGroupAlias(time, $__interval), node AS metric, avg(value) AS value\n"
                    f"FROM metric_samples WHERE metric = 'gpufleet_gpu_sm_active_ratio' AND $__timeFilter(time) AND {F}\n"
                    f"  AND node IN ({_serving_nodes})\nGROUP BY 1, 2 ORDER BY 1, 2",
                    f"avg by (node) ({sel('gpufleet_gpu_sm_active_ratio', V)} and on (node) {sel(REQUESTS, V)})",
                    "{{node}}",
                ),
            ),
            unit="percentunit",
            min=0,
            max=1,
            width=24,
        ),
    ),
)

DASHBOARD = DashboardDef(
    "inference",
    "Inference",
    "Per model: request rate, p50/p99 latency, time to first token, inter-token latency, queue time, tokens/s "
    "and errors, next to the SM activity of the GPUs serving it.",
    V,
    (traffic, latency, gpus),
)
