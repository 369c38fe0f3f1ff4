"""Efficiency: GPU-hours and energy spent without useful work, and what the work costs in energy."""

from __future__ import annotations

from gpufleet.dashboards.inference import GENERATION_TOKENS, REQUESTS
from gpufleet.dashboards.model import DashboardDef, PanelDef, Query, Row, sql_filter
from gpufleet.dashboards.queries import increase_expr, prom_increase_range, sel, sql_counter_deltas

V = ("cluster",)
F = sql_filter(V)
LOW_SM = 0.1  # SM activity under 10 %: the GPU is held, not used
IDLE_UTIL = 0.05
HELD_BYTES = 1 << 30  # holding more than 1 GiB of framebuffer
# Each sample stands for the time until the next one, capped so a gap in the data is not counted as idle.
MAX_SAMPLE_SECONDS = 60

UTIL, MEM, SM = (
    "gpufleet_gpu_utilization_ratio",
    "gpufleet_gpu_memory_used_bytes",
    "gpufleet_gpu_sm_active_ratio",
)
POWER, ENERGY = "gpufleet_gpu_power_watts", "gpufleet_gpu_energy_joules_total"

_idle_sql = (
    f'SELECT u.node AS node, u.gpu AS gpu, max(m.value) AS "memory held",\n'
    f'  avg(CASE WHEN u.value < {IDLE_UTIL} AND m.value > {HELD_BYTES} THEN 1.0 ELSE 0.0 END) AS "idle with memory"\n'
    f"FROM metric_samples u JOIN metric_samples m ON m.uuid = u.uuid AND m.time = u.time AND m.metric = '{MEM}'\n"
    f"WHERE u.metric = '{UTIL}' AND $__timeFilter(u.time) AND {sql_filter(V, 'u.')}\n"
    f"GROUP BY 1, 2\n"
    f"HAVING avg(CASE WHEN u.value < {IDLE_UTIL} AND m.value > {HELD_BYTES} THEN 1.0 ELSE 0.0 END) > 0\n"
    f"ORDER BY 4 DESC, 3 DESC"
)
_idle_share = (
    f"avg_over_time((({sel(UTIL, V)} < bool {IDLE_UTIL}) * ({sel(MEM, V)} > bool {HELD_BYTES}))"
    f"[$__range:$__interval])"
)


def _low_sm_hours_sql(by: str) -> str:
    select_by = f"{by}, " if by else ""
    return (
        f'SELECT {select_by}coalesce(sum(seconds) FILTER (WHERE value < {LOW_SM}), 0) / 3600.0 AS "GPU-hours"\n'
        f"FROM (\n"
        f"  SELECT node, uuid, value,\n"
        f"    least(extract(epoch FROM lead(time) OVER (PARTITION BY uuid ORDER BY time) - time), "
        f"{MAX_SAMPLE_SECONDS}) AS seconds\n"
        f"  FROM metric_samples WHERE metric = '{SM}' AND $__timeFilter(time) AND {F}) s\n"
        + ("GROUP BY 1 ORDER BY 2 DESC" if by else "")
    )


def _low_sm_hours_prom(by: str) -> str:
    # one subquery step per $__interval where the GPU reported: count the low ones, times the step
    group = f"sum by ({by})" if by else "sum"
    return (
        f"{group} (sum_over_time(({sel(SM, V)} < bool {LOW_SM})[$__range:$__interval]))"
        f" * $__interval_ms / 3600000"
    )


_energy_kwh_sql = (
    f"WITH c AS (\n  {sql_counter_deltas((ENERGY,), V)})\n"
    f'SELECT sum({increase_expr()}) / 3.6e6 AS "kWh" FROM c WHERE $__timeFilter(time)'
)
_per_day_sql = (
    f"SELECT time, 'kWh per day' AS metric, sum(w) * 24 / 1000 AS value FROM (\n"
    f"  SELECT $__timeGroupAlias(time, $__interval), uuid, avg(value) AS w FROM metric_samples\n"
    f"  WHERE metric = '{POWER}' AND $__timeFilter(time) AND {F} GROUP BY 1, 2) s\n"
    f"GROUP BY 1, 2 ORDER BY 1"
)


def _node_sum_sql(metric: str, alias: str) -> str:
    return (
        f"SELECT b, node, sum(v) AS {alias} FROM (\n"
        f"    SELECT $__timeGroup(time, $__interval) AS b, node, labels, avg(value) AS v FROM metric_samples\n"
        f"    WHERE metric = '{metric}' AND $__timeFilter(time) AND {F} GROUP BY 1, 2, 3) s GROUP BY 1, 2"
    )


_tokens_per_joule_sql = (
    f"WITH tok AS (\n  {_node_sum_sql(GENERATION_TOKENS, 'tps')}),\n"
    f"pw AS (\n  {_node_sum_sql(POWER, 'watts')})\n"
    f"SELECT tok.b AS time, tok.node AS metric, tok.tps / nullif(pw.watts, 0) AS value\n"
    f"FROM tok JOIN pw USING (b, node)\nORDER BY 1, 2"
)

waste = Row(
    "Waste",
    (
        PanelDef(
            "GPUs idle while holding memory",
            "Which GPUs sat idle with memory allocated (a notebook or a stuck job keeping others off), and for "
            "what share of the range?",
            "table",
            (
                Query(_idle_sql, f"max by (node, gpu) ({_idle_share}) > 0", name="idle with memory"),
                Query(
                    "",
                    f"max by (node, gpu) (max_over_time({sel(MEM, V)}[$__range]) and on (uuid) ({_idle_share} > 0))",
                    name="memory held",
                ),
            ),
            columns=("node", "gpu"),
            width=12,
        ),
        PanelDef(
            "GPU-hours with SM activity under 10 %",
            "How many GPU-hours in this range did almost no work?",
            "stat",
            (Query(_low_sm_hours_sql(""), _low_sm_hours_prom("")),),
            unit="h",
            width=4,
            height=8,
        ),
        PanelDef(
            "Low-activity GPU-hours by node",
            "Where are those idle GPU-hours?",
            "bargauge",
            (Query(_low_sm_hours_sql("node"), _low_sm_hours_prom("node"), "{{node}}"),),
            unit="h",
            min=0,
            width=8,
        ),
    ),
)
energy = Row(
    "Energy",
    (
        PanelDef(
            "Energy used",
            "How much energy did the GPUs use in this range?",
            "stat",
            (Query(_energy_kwh_sql, f"{prom_increase_range(sel(ENERGY, V), '')} / 3.6e6"),),
            unit="kwatth",
            width=4,
            height=8,
        ),
        PanelDef(
            "Energy per day",
            "At each moment's draw, how many kWh a day does the fleet burn?",
            "timeseries",
            (Query(_per_day_sql, f"sum({sel(POWER, V)}) * 24 / 1000", "kWh per day"),),
            unit="kwatth",
            min=0,
            width=10,
        ),
        PanelDef(
            "Tokens per joule",
            "How many generated tokens does each joule buy, per node?",
            "timeseries",
            (
                Query(
                    _tokens_per_joule_sql,
                    f"sum by (node) ({sel(GENERATION_TOKENS, V)}) / sum by (node) ({sel(POWER, V)} and on (node) {sel(REQUESTS, V)})",
                    "{{node}}",
                ),
            ),
            min=0,
            width=10,
        ),
    ),
)

DASHBOARD = DashboardDef(
    "efficiency",
    "GPU efficiency",
    "Where GPU time and energy go without useful work: idle GPUs holding memory, GPU-hours under 10 % SM "
    "activity, energy per day, tokens per joule where inference data exists.",
    V,
    (waste, energy),
)
