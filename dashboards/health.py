"""GPU health: the hardware errors that precede a failed job or an RMA."""

from __future__ import annotations

from gpufleet.dashboards.model import DashboardDef, PanelDef, Query, Row, sql_filter
from gpufleet.dashboards.queries import (
    GPU_LEGEND,
    GPU_SERIES_SQL,
    increase_expr,
    prom_increase_range,
    sel,
    sql_counter_deltas,
    sql_counter_series,
    sql_series,
)

V = ("cluster", "node", "gpu")
F = sql_filter(V)

# Series these panels read beyond DESIGN.md's core table (the agent's row-remapping, retired-page, PCIe and
# NVLink fields). Renaming one is a change here only.
REMAPPED_ROWS = "gpufleet_gpu_remapped_rows_total"  # {type="correctable"|"uncorrectable"}
REMAP_PENDING = "gpufleet_gpu_row_remap_pending"  # 1 while a remap waits for a GPU reset
REMAP_FAILED = "gpufleet_gpu_row_remap_failure"  # 1 when a remap failed: the GPU needs service
RETIRED_PAGES = "gpufleet_gpu_retired_pages_total"  # {cause="single_bit"|"double_bit"}
PCIE_REPLAYS = "gpufleet_gpu_pcie_replays_total"
NVLINK_ERRORS = "gpufleet_gpu_nvlink_errors_total"  # {type="crc_flit"|"crc_data"|"replay"|"recovery"|"ecc_data"}, all links
XID = "gpufleet_gpu_xid_errors_total"
ECC = "gpufleet_gpu_ecc_errors_total"
CLOCK_EVENT = "gpufleet_gpu_clock_event_active"
VOLATILE = 'scope="volatile"'


def _rate_sql(metric: str, series: str) -> str:
    return sql_counter_series(metric, V, series=series).replace(
        f"sum({increase_expr()}) AS value", f"sum({increase_expr()}) / $__interval_ms * 1000 AS value"
    )


_xid_table_sql = (
    f"WITH c AS (\n  {sql_counter_deltas((XID,), V)})\n"
    f"SELECT node, gpu, labels ->> 'xid' AS xid, sum({increase_expr()}) AS \"events\"\n"
    f"FROM c WHERE $__timeFilter(time)\nGROUP BY 1, 2, 3 HAVING sum({increase_expr()}) > 0\n"
    f"ORDER BY 4 DESC, 1, 2, 3"
)
_latest_flag = (
    "WITH latest AS (\n  SELECT DISTINCT ON (uuid) uuid, value FROM metric_samples\n"
    "  WHERE metric = '{m}' AND $__timeFilter(time) AND " + F + "\n  ORDER BY uuid, time DESC)\n"
    'SELECT count(*) FILTER (WHERE value = 1) AS "{n}" FROM latest'
)
_throttle_sql = (
    f"SELECT labels ->> 'reason' AS reason, avg(value) AS \"share of time\"\n"
    f"FROM metric_samples WHERE metric = '{CLOCK_EVENT}' AND $__timeFilter(time) AND {F}\n"
    f"GROUP BY 1 ORDER BY 2 DESC"
)

xids = Row(
    "XID errors",
    (
        PanelDef(
            "XIDs by code",
            "Which XID codes occur, and when? (48, 63, 64, 79, 94, 95 are the serious ones.)",
            "timeseries",
            (
                Query(
                    sql_counter_series(XID, V, series="'XID ' || (labels ->> 'xid')"),
                    f"sum by (xid) (increase({sel(XID, V)}[$__rate_interval]))",
                    "XID {{xid}}",
                ),
            ),
            min=0,
            width=12,
            stacked=True,
        ),
        PanelDef(
            "XIDs by GPU",
            "Which GPUs raised which XIDs in this range?",
            "table",
            (
                Query(
                    _xid_table_sql, prom_increase_range(sel(XID, V), "node, gpu, xid") + " > 0", name="events"
                ),
            ),
            columns=("node", "gpu", "xid"),
            width=12,
        ),
    ),
)
memory = Row(
    "Memory errors",
    (
        PanelDef(
            "ECC errors",
            "Are ECC errors appearing, and are any uncorrectable?",
            "timeseries",
            (
                Query(
                    sql_counter_series(
                        ECC,
                        V,
                        series=GPU_SERIES_SQL + " || ' ' || (labels ->> 'type')",
                        extra=" AND labels ->> 'scope' = 'volatile'",
                    ),
                    f"sum by (node, gpu, type) (increase({sel(ECC, V, VOLATILE)}[$__rate_interval]))",
                    GPU_LEGEND + " {{type}}",
                ),
            ),
            min=0,
            width=8,
        ),
        PanelDef(
            "Remapped rows",
            "How many memory rows has each GPU remapped (the A100/H100 successor of page retirement)?",
            "timeseries",
            (
                Query(
                    sql_series(
                        REMAPPED_ROWS,
                        V,
                        series=GPU_SERIES_SQL + " || ' ' || (labels ->> 'type')",
                        value="max(value)",
                    ),
                    sel(REMAPPED_ROWS, V),
                    GPU_LEGEND + " {{type}}",
                ),
            ),
            min=0,
            width=8,
        ),
        PanelDef(
            "Retired pages",
            "How many framebuffer pages has each GPU retired, and why?",
            "timeseries",
            (
                Query(
                    sql_series(
                        RETIRED_PAGES,
                        V,
                        series=GPU_SERIES_SQL + " || ' ' || (labels ->> 'cause')",
                        value="max(value)",
                    ),
                    sel(RETIRED_PAGES, V),
                    GPU_LEGEND + " {{cause}}",
                ),
            ),
            min=0,
            width=8,
        ),
        PanelDef(
            "Row remap pending",
            "Which GPUs need a reset to apply a pending row remap?",
            "stat",
            (Query(_latest_flag.format(m=REMAP_PENDING, n="pending"), f"sum({sel(REMAP_PENDING, V)})"),),
            width=4,
            height=4,
        ),
        PanelDef(
            "Row remap failed",
            "Which GPUs ran out of spare rows and need service?",
            "stat",
            (Query(_latest_flag.format(m=REMAP_FAILED, n="failed"), f"sum({sel(REMAP_FAILED, V)})"),),
            width=4,
            height=4,
        ),
    ),
)
links = Row(
    "Links and throttling",
    (
        PanelDef(
            "PCIe replays",
            "Is a GPU's PCIe link retrying transfers (a bad riser, slot or cable)?",
            "timeseries",
            (
                Query(
                    _rate_sql(PCIE_REPLAYS, GPU_SERIES_SQL),
                    f"rate({sel(PCIE_REPLAYS, V)}[$__rate_interval])",
                    GPU_LEGEND,
                ),
            ),
            unit="ops",
            min=0,
            width=8,
        ),
        PanelDef(
            "NVLink errors",
            "Are NVLink links taking CRC errors, replays or recoveries?",
            "timeseries",
            (
                Query(
                    _rate_sql(NVLINK_ERRORS, GPU_SERIES_SQL + " || ' ' || (labels ->> 'type')"),
                    f"sum by (node, gpu, type) (rate({sel(NVLINK_ERRORS, V)}[$__rate_interval]))",
                    GPU_LEGEND + " {{type}}",
                ),
            ),
            unit="ops",
            min=0,
            width=8,
        ),
        PanelDef(
            "Throttle time by reason",
            "What share of the time were clocks held down, and by what?",
            "bargauge",
            (
                Query(
                    _throttle_sql,
                    f"avg by (reason) (avg_over_time({sel(CLOCK_EVENT, V)}[$__range]))",
                    "{{reason}}",
                ),
            ),
            unit="percentunit",
            min=0,
            max=1,
            width=8,
        ),
    ),
)

DASHBOARD = DashboardDef(
    "gpu-health",
    "GPU health",
    "Hardware health: XIDs by code, ECC errors, row remapping, retired pages, PCIe replays, NVLink errors and "
    "throttle time.",
    V,
    (xids, memory, links),
)
