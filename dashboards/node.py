"""Node / GPU drill-down: everything about the GPUs of one node (or a few), field by field."""

from __future__ import annotations

from gpufleet.agent.fields import FIELDS, GPM_FIELDS
from gpufleet.dashboards.model import DashboardDef, PanelDef, Query, Row, sql_filter
from gpufleet.dashboards.queries import GPU_LEGEND, GPU_SERIES_SQL, sel, sql_counter_series, sql_series

V = ("cluster", "node", "gpu")
F = sql_filter(V)
HAS_POD = 'pod!=""'


def _unit(name: str) -> str:
    for suffix, unit in (
        ("_ratio", "percentunit"),
        ("_bytes", "bytes"),
        ("_celsius", "celsius"),
        ("_watts", "watt"),
        ("_hertz", "hertz"),
        ("_joules_total", "watt"),
    ):
        if name.endswith(suffix):
            return unit
    return ""


def _field_panel(name: str, kind: str, help_text: str, labels: tuple[str, ...]) -> PanelDef:
    """One panel per agent field, so a new row in the field table shows up here with no new code."""
    series_sql = GPU_SERIES_SQL + "".join(f" || ' {lb}=' || (labels ->> '{lb}')" for lb in labels)
    legend = GPU_LEGEND + "".join(f" {lb}={{{{{lb}}}}}" for lb in labels)
    if kind == "counter":  # per-second rate of the counter (energy: joules/s = watts)
        sql = sql_counter_series(name, V, series=series_sql).replace(
            "sum(CASE WHEN delta < 0 THEN value ELSE delta END) AS value",
            "sum(CASE WHEN delta < 0 THEN value ELSE delta END) / $__interval_ms * 1000 AS value",
        )
        promql = f"rate({sel(name, V)}[$__rate_interval])"
        title = name.removeprefix("gpufleet_gpu_") + " (per second)"
    else:
        sql, promql, title = (
            sql_series(name, V, series=series_sql),
            sel(name, V),
            name.removeprefix("gpufleet_gpu_"),
        )
    return PanelDef(
        title.replace("_", " "),
        help_text,
        "timeseries",
        (Query(sql, promql, legend),),
        unit=_unit(name),
        width=8,
        height=7,
    )


every_field = Row(
    "Every field the agent collects",
    tuple(
        # Per-link NVLink series are opt-in (--nvlink-per-link); their per-GPU sums have panels here.
        [_field_panel(f.name, f.kind, f.help, f.labels) for f in FIELDS if not f.per_link]
        + [_field_panel(g.name, "gauge", g.help, ()) for g in GPM_FIELDS]
    ),
)

_reasons_sql = (
    f"SELECT $__timeGroupAlias(time, $__interval), labels ->> 'reason' AS metric, max(value) AS value\n"
    f"FROM metric_samples WHERE metric = 'gpufleet_gpu_clock_event_active' AND $__timeFilter(time) AND {F}\n"
    f"GROUP BY 1, 2 ORDER BY 1, 2"
)
overview = Row(
    "At a glance",
    (
        PanelDef(
            "Utilization versus SM activity",
            "Is each GPU doing real work, or only keeping a kernel resident (utilization high, SM activity low)?",
            "timeseries",
            (
                Query(
                    sql_series(
                        "gpufleet_gpu_utilization_ratio", V, series=GPU_SERIES_SQL + " || ' utilization'"
                    ),
                    sel("gpufleet_gpu_utilization_ratio", V),
                    GPU_LEGEND + " utilization",
                ),
                Query(
                    sql_series("gpufleet_gpu_sm_active_ratio", V, series=GPU_SERIES_SQL + " || ' SM active'"),
                    sel("gpufleet_gpu_sm_active_ratio", V),
                    GPU_LEGEND + " SM active",
                ),
            ),
            unit="percentunit",
            min=0,
            max=1,
            width=12,
        ),
        PanelDef(
            "Throttle reasons",
            "Why are the clocks down: power cap, thermal, hardware slowdown, power brake?",
            "timeseries",
            (
                Query(
                    _reasons_sql,
                    f"max by (reason) ({sel('gpufleet_gpu_clock_event_active', V)})",
                    "{{reason}}",
                ),
            ),
            min=0,
            max=1,
            width=12,
            stacked=True,
        ),
        PanelDef(
            "Temperature and its limits",
            "How close is each GPU to the temperature where it slows down?",
            "timeseries",
            (
                Query(
                    sql_series("gpufleet_gpu_temperature_celsius", V),
                    sel("gpufleet_gpu_temperature_celsius", V),
                    GPU_LEGEND,
                ),
                Query(
                    sql_series(
                        "gpufleet_gpu_slowdown_temperature_celsius",
                        V,
                        series=GPU_SERIES_SQL + " || ' slowdown'",
                    ),
                    sel("gpufleet_gpu_slowdown_temperature_celsius", V),
                    GPU_LEGEND + " slowdown",
                ),
            ),
            unit="celsius",
            width=12,
        ),
        PanelDef(
            "Power and its limit",
            "How close is each GPU to its power limit?",
            "timeseries",
            (
                Query(
                    sql_series("gpufleet_gpu_power_watts", V), sel("gpufleet_gpu_power_watts", V), GPU_LEGEND
                ),
                Query(
                    sql_series("gpufleet_gpu_power_limit_watts", V, series=GPU_SERIES_SQL + " || ' limit'"),
                    sel("gpufleet_gpu_power_limit_watts", V),
                    GPU_LEGEND + " limit",
                ),
            ),
            unit="watt",
            width=12,
        ),
    ),
)

# Pods come from the agent's Kubernetes attribution (pod / namespace labels on every GPU series);
# processes from its per-process series (opt-in on the agent).
_pods_sql = (
    f'SELECT node, gpu, namespace, pod, max(time) AS "last seen"\n'
    f"FROM metric_samples WHERE metric = 'gpufleet_gpu_utilization_ratio' AND pod IS NOT NULL\n"
    f"  AND $__timeFilter(time) AND {F}\nGROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
)
_procs_sql = (
    f"SELECT node, gpu, labels ->> 'pid' AS pid, labels ->> 'command' AS command,\n"
    f'  max(value) AS "memory used"\n'
    f"FROM metric_samples WHERE metric = 'gpufleet_gpu_process_memory_used_bytes' AND $__timeFilter(time) "
    f"AND {F}\nGROUP BY 1, 2, 3, 4 ORDER BY 5 DESC"
)
workloads = Row(
    "Pods and processes",
    (
        PanelDef(
            "Pods on these GPUs",
            "Which Kubernetes pods held these GPUs in this range?",
            "table",
            (
                Query(
                    _pods_sql,
                    f"max by (node, gpu, namespace, pod) ({sel('gpufleet_gpu_utilization_ratio', V, HAS_POD)})",
                    name="utilization",
                ),
            ),
            columns=("node", "gpu", "namespace", "pod"),
            width=12,
        ),
        PanelDef(
            "Processes on these GPUs",
            "Which processes hold GPU memory, and how much?",
            "table",
            (
                Query(
                    _procs_sql,
                    f"max by (node, gpu, pid, command) "
                    f"(max_over_time({sel('gpufleet_gpu_process_memory_used_bytes', V)}[$__range]))",
                    name="memory used",
                ),
            ),
            columns=("node", "gpu", "pid", "command"),
            unit="bytes",
            width=12,
        ),
    ),
)

DASHBOARD = DashboardDef(
    "node-gpu",
    "GPU node drill-down",
    "One node or GPU in depth: activity, throttling, temperature and power against their limits, the pods and "
    "processes on it, and every field the agent collects.",
    V,
    (overview, workloads, every_field),
)
