"""Query builders shared by the dashboards: one place for how a time series, a counter increase or a
per-GPU breakdown is written in SQL (over the ``metric_samples`` view) and in PromQL."""

from __future__ import annotations

from gpufleet.dashboards.model import prom_matchers, sql_filter

GPU_SERIES_SQL = "node || ' gpu ' || gpu"
GPU_LEGEND = "{{node}} gpu {{gpu}}"
# Counter increases need the sample before the range starts; look this far back for it.
LOOKBACK = "interval '1 hour'"


def sel(metric: str, variables: tuple[str, ...], extra: str = "") -> str:
    """A PromQL selector with the dashboard's variable matchers."""
    matchers = ", ".join(m for m in (prom_matchers(variables), extra) if m)
    return f"{metric}{{{matchers}}}"


def sql_series(
    metric: str,
    variables: tuple[str, ...],
    *,
    series: str = GPU_SERIES_SQL,
    value: str = "avg(value)",
    extra: str = "",
) -> str:
    """One value per time bucket and series, as Grafana's time-series format wants it."""
    return (
        f"SELECT $__timeGroupAlias(time, $__interval), {series} AS metric, {value} AS value\n"
        f"FROM metric_samples\n"
        f"WHERE metric = '{metric}' AND $__timeFilter(time) AND {sql_filter(variables)}{extra}\n"
        f"GROUP BY 1, 2\nORDER BY 1, 2"
    )


def sql_fleet_sum(metric: str, variables: tuple[str, ...], *, by: str = "node", extra: str = "") -> str:
    """Per bucket: the average of each series, summed over the series of each group (e.g. watts per node)."""
    return (
        f"SELECT time, {by} AS metric, sum(v) AS value FROM (\n"
        f"  SELECT $__timeGroupAlias(time, $__interval), {by}, labels, avg(value) AS v\n"
        f"  FROM metric_samples\n"
        f"  WHERE metric = '{metric}' AND $__timeFilter(time) AND {sql_filter(variables)}{extra}\n"
        f"  GROUP BY 1, 2, 3) s\n"
        f"GROUP BY 1, 2\nORDER BY 1, 2"
    )


def sql_counter_deltas(metrics: tuple[str, ...], variables: tuple[str, ...], extra: str = "") -> str:
    """A CTE body: every counter sample with its increase since the previous sample of its series.

    A counter's first sample (a series born in the range, such as the first XID of a code) counts in
    full; a drop is a reset and counts the new value, as Prometheus' increase() does.
    """
    names = ", ".join(f"'{m}'" for m in metrics)
    return (
        f"SELECT time, metric, cluster, node, gpu, uuid, model, pod, namespace, labels, value,\n"
        f"    value - lag(value, 1, 0.0) OVER (PARTITION BY metric, labels::text ORDER BY time) AS delta\n"
        f"  FROM metric_samples\n"
        f"  WHERE metric IN ({names}) AND {sql_filter(variables)}{extra}\n"
        f"    AND time BETWEEN $__timeFrom()::timestamptz - {LOOKBACK} AND $__timeTo()::timestamptz"
    )


def increase_expr(delta: str = "delta", value: str = "value") -> str:
    return f"CASE WHEN {delta} < 0 THEN {value} ELSE {delta} END"


def sql_counter_series(metric: str, variables: tuple[str, ...], *, series: str, extra: str = "") -> str:
    """Increase of a counter per time bucket and series."""
    return (
        f"WITH c AS (\n  {sql_counter_deltas((metric,), variables, extra)})\n"
        f"SELECT $__timeGroupAlias(time, $__interval), {series} AS metric, sum({increase_expr()}) AS value\n"
        f"FROM c WHERE $__timeFilter(time)\nGROUP BY 1, 2\nORDER BY 1, 2"
    )


def prom_increase_range(selector: str, by: str) -> str:
    """Increase over the dashboard's range per ``by``, counting series born inside the range from zero.

    increase() alone misses the first count of a new series (the first XID 79 of a GPU is the one that
    matters), so a series absent at the start of the range adds its first value.
    """
    return (
        f"sum by ({by}) (increase({selector}[$__range]) + (min_over_time({selector}[$__range]) "
        f"unless {selector} offset $__range) or increase({selector}[$__range]))"
    )
