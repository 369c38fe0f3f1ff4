"""Fleet overview: is the fleet healthy, and is it doing useful work?"""

from __future__ import annotations

from gpufleet.dashboards.model import DashboardDef, PanelDef, Query, Row, sql_filter
from gpufleet.dashboards.queries import prom_increase_range, sel, sql_counter_deltas, sql_fleet_sum

V = ("cluster",)
F = sql_filter(V)
UP = sel("gpufleet_gpu_up", V)
THROTTLE_REASONS = ("hw_thermal", "sw_thermal", "hw_slowdown", "hw_power_brake")
# A GPU that has reported in the range but not in this long is stale: its node or agent stopped talking.
STALE_AFTER = "interval '2 minutes'"

_latest_up = (
    f"SELECT DISTINCT ON (uuid) uuid, time, value FROM metric_samples\n"
    f"  WHERE metric = 'gpufleet_gpu_up' AND $__timeFilter(time) AND {F}\n"
    f"  ORDER BY uuid, time DESC"
)


def _count(condition: str, name: str) -> str:
    return (
        f"WITH latest AS (\n  {_latest_up})\n"
        f'SELECT count(*) FILTER (WHERE {condition}) AS "{name}" FROM latest'
    )


FRESH = f"time > $__timeTo()::timestamptz - {STALE_AFTER}"

status = Row(
    "Status",
    (
        PanelDef(
            "GPUs up",
            "How many GPUs answer NVML right now?",
            "stat",
            (Query(_count(f"value = 1 AND {FRESH}", "up"), f"sum({UP} == bool 1)"),),
            width=5,
            height=4,
        ),
        PanelDef(
            "GPUs down",
            "How many GPUs are lost (fell off the bus, stopped answering NVML)?",
            "stat",
            (Query(_count(f"value = 0 AND {FRESH}", "down"), f"sum({UP} == bool 0)"),),
            width=5,
            height=4,
        ),
        PanelDef(
            "GPUs stale",
            "How many GPUs reported earlier in the range but have gone silent (agent or node down)?",
            "stat",
            (
                Query(
                    _count(f"NOT ({FRESH})", "stale"),
                    f"count(max_over_time({UP}[$__range]) unless {UP}) or vector(0)",
                ),
            ),
            width=5,
            height=4,
        ),
        PanelDef(
            "Alerts",
            "Which alerts fired and resolved in this range (posted by the collector as annotations)?",
            "annotations",
            width=9,
            height=8,
            tags=("gpufleet",),
        ),
    ),
)

activity = Row(
    "Activity",
    (
        PanelDef(
            "Utilization versus SM activity",
            "Is 'utilization' real work? NVML utilization counts any kernel running; SM activity counts busy "
            "SMs. The gap is capacity paid for and wasted.",
            "timeseries",
            (
                Query(
                    f"SELECT $__timeGroupAlias(time, $__interval), 'utilization' AS metric, avg(value) AS value\n"
                    f"FROM metric_samples WHERE metric = 'gpufleet_gpu_utilization_ratio' AND $__timeFilter(time) AND {F}\n"
                    f"GROUP BY 1, 2 ORDER BY 1",
                    f"avg({sel('gpufleet_gpu_utilization_ratio', V)})",
                    "utilization",
                ),
                Query(
                    f"SELECT $__timeGroupAlias(time, $__interval), 'SM activity' AS metric, avg(value) AS value\n"
                    f"FROM metric_samples WHERE metric = 'gpufleet_gpu_sm_active_ratio' AND $__timeFilter(time) AND {F}\n"
                    f"GROUP BY 1, 2 ORDER BY 1",
                    f"avg({sel('gpufleet_gpu_sm_active_ratio', V)})",
                    "SM activity",
                ),
                Query(
                    f"SELECT $__timeGroupAlias(u.time, $__interval), 'gap (wasted)' AS metric, avg(u.value - s.value) AS value\n"
                    f"FROM metric_samples u JOIN metric_samples s\n"
                    f"  ON s.uuid = u.uuid AND s.time = u.time AND s.metric = 'gpufleet_gpu_sm_active_ratio'\n"
                    f"WHERE u.metric = 'gpufleet_gpu_utilization_ratio' AND $__timeFilter(u.time) AND {sql_filter(V, 'u.')}\n"
                    f"GROUP BY 1, 2 ORDER BY 1",
                    f"avg({sel('gpufleet_gpu_utilization_ratio', V)} - {sel('gpufleet_gpu_sm_active_ratio', V)})",
                    "gap (wasted)",
                ),
            ),
            unit="percentunit",
            min=0,
            max=1,
            width=12,
        ),
        PanelDef(
            "Framebuffer memory in use",
            "How much GPU memory does each node hold?",
            "timeseries",
            (
                Query(
                    sql_fleet_sum("gpufleet_gpu_memory_used_bytes", V),
                    f"sum by (node) ({sel('gpufleet_gpu_memory_used_bytes', V)})",
                    "{{node}}",
                ),
            ),
            unit="bytes",
            min=0,
            width=12,
            stacked=True,
        ),
        PanelDef(
            "Power draw",
            "How many watts does each node's GPUs draw?",
            "timeseries",
            (
                Query(
                    sql_fleet_sum("gpufleet_gpu_power_watts", V),
                    f"sum by (node) ({sel('gpufleet_gpu_power_watts', V)})",
                    "{{node}}",
                ),
            ),
            unit="watt",
            min=0,
            width=12,
            stacked=True,
        ),
        PanelDef(
            "GPU temperature",
            "How hot is the fleet, and are there outliers running near their slowdown point?",
            "heatmap",
            (
                Query(
                    "SELECT $__timeGroupAlias(time, $__interval), node || ' gpu ' || gpu AS metric, avg(value) AS value\n"
                    "FROM metric_samples WHERE metric = 'gpufleet_gpu_temperature_celsius' AND $__timeFilter(time) "
                    f"AND {F}\nGROUP BY 1, 2 ORDER BY 1, 2",
                    sel("gpufleet_gpu_temperature_celsius", V),
                    "{{node}} gpu {{gpu}}",
                ),
            ),
            unit="celsius",
            width=12,
        ),
    ),
)

_hw = ", ".join(f"'{r}'" for r in THROTTLE_REASONS)
_problems_sql = (
    f"WITH c AS (\n  {sql_counter_deltas(('gpufleet_gpu_xid_errors_total', 'gpufleet_gpu_ecc_errors_total'), V)}),\n"
    f"counts AS (\n"
    f"  SELECT node,\n"
    f"    sum(CASE WHEN delta < 0 THEN value ELSE delta END) FILTER (WHERE metric = 'gpufleet_gpu_xid_errors_total') AS xid,\n"
    f"    sum(CASE WHEN delta < 0 THEN value ELSE delta END) FILTER (WHERE metric = 'gpufleet_gpu_ecc_errors_total'\n"
    f"      AND labels ->> 'type' = 'uncorrected' AND labels ->> 'scope' = 'volatile') AS ecc\n"
    f"  FROM c WHERE $__timeFilter(time) GROUP BY node),\n"
    f"throttle AS (\n"
    f"  SELECT node, max(share) AS share FROM (\n"
    f"    SELECT node, uuid, labels ->> 'reason' AS reason, avg(value) AS share FROM metric_samples\n"
    f"    WHERE metric = 'gpufleet_gpu_clock_event_active' AND labels ->> 'reason' IN ({_hw})\n"
    f"      AND $__timeFilter(time) AND {F} GROUP BY 1, 2, 3) r GROUP BY node),\n"
    f"down AS (\n"
    f"  SELECT node, avg(1 - value) AS share FROM metric_samples\n"
    f"  WHERE metric = 'gpufleet_gpu_up' AND $__timeFilter(time) AND {F} GROUP BY node)\n"
    f'SELECT down.node AS node, coalesce(counts.xid, 0) AS "XID events", coalesce(counts.ecc, 0) AS "uncorrected ECC",\n'
    f'  coalesce(throttle.share, 0) AS "throttled share", down.share AS "down share"\n'
    f"FROM down LEFT JOIN counts USING (node) LEFT JOIN throttle USING (node)\n"
    f"ORDER BY 2 DESC, 3 DESC, 5 DESC, 4 DESC, 1"
)
_zero_by_node = f"sum by (node) ({UP} * 0)"
HW_REASONS = 'reason=~"' + "|".join(THROTTLE_REASONS) + '"'
ECC_UNCORRECTED = 'type="uncorrected", scope="volatile"'

problems = Row(
    "Problems",
    (
        PanelDef(
            "Top nodes by problems",
            "Which nodes need attention first: XIDs, uncorrectable ECC errors, hardware throttling, lost GPUs?",
            "table",
            (
                Query(
                    _problems_sql,
                    f"{prom_increase_range(sel('gpufleet_gpu_xid_errors_total', V), 'node')} or {_zero_by_node}",
                    name="XID events",
                ),
                Query(
                    "",
                    f"sum by (node) (increase({sel('gpufleet_gpu_ecc_errors_total', V, ECC_UNCORRECTED)}"
                    f"[$__range])) or {_zero_by_node}",
                    name="uncorrected ECC",
                ),
                Query(
                    "",
                    f"max by (node) (avg_over_time({sel('gpufleet_gpu_clock_event_active', V, HW_REASONS)}"
                    f"[$__range])) or {_zero_by_node}",
                    name="throttled share",
                ),
                Query("", f"avg by (node) (1 - avg_over_time({UP}[$__range]))", name="down share"),
            ),
            columns=("node",),
            width=24,
            height=9,
        ),
    ),
)

DASHBOARD = DashboardDef(
    "fleet-overview",
    "GPU fleet overview",
    "Every GPU at a glance: up, down or stale; alerts; real work versus 'utilization'; memory, power, heat; "
    "the nodes with the most problems.",
    V,
    (status, activity, problems),
)
