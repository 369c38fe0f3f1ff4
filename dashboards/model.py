"""Flavour-neutral dashboard definitions: each panel is written once with its SQL and its PromQL query.

``render`` (dashboards/render.py) turns one :class:`DashboardDef` into a Grafana dashboard for a flavour:
``postgres`` (Grafana's built-in PostgreSQL data source reading the collector's ``metric_samples`` view),
``prometheus`` (a Prometheus that scrapes the agents) or ``prometheus-dcgm`` (the same, for agents in dcgm
naming mode: the PromQL is rewritten for their names). Tests execute every query of every flavour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Panel kinds and the data shape each expects from its query:
#   timeseries, heatmap: a time series (SQL: a `time` column first, rows ordered by time, numeric values;
#                        PromQL: a range query returning at least one series)
#   stat, bargauge:      current values (SQL: rows of numbers, optionally a label column; PromQL: instant vector)
#   table:               rows (SQL: the columns listed in `columns`; PromQL: instant vectors carrying `columns`
#                        as labels, merged on them)
#   annotations:         Grafana's own annotation list (the collector's alert annotations), no query
KINDS = ("timeseries", "heatmap", "stat", "bargauge", "table", "annotations")

POSTGRES_TYPE = "grafana-postgresql-datasource"
PROMETHEUS_TYPE = "prometheus"


@dataclass(frozen=True)
class Flavour:
    name: str  # "postgres" | "prometheus" | "prometheus-dcgm"
    datasource_type: str
    default_datasource_uid: str  # the uid `gpufleet dashboards push` gives the data source it creates
    label: str
    # The agents' naming mode the PromQL queries (agent --metric-names): "gpufleet" (also right for "both")
    # or "dcgm". The collector's store always holds gpufleet names.
    naming: str = "gpufleet"

    @property
    def source(self) -> str:
        """Where the data comes from: "postgres" or "prometheus" (uids and tags: one dashboard whatever the
        agents' naming, so links to it hold in either)."""
        return "postgres" if self.datasource_type == POSTGRES_TYPE else "prometheus"


# The flavours a collector pushes: one per data source.
FLAVOURS = (
    Flavour("postgres", POSTGRES_TYPE, "gpufleet-postgres", "PostgreSQL store"),
    Flavour("prometheus", PROMETHEUS_TYPE, "gpufleet-prometheus", "Prometheus"),
)
# The Prometheus flavour for agents in dcgm naming mode (the Helm chart ships it to such a cluster's Grafana).
PROMETHEUS_DCGM = Flavour(
    "prometheus-dcgm", PROMETHEUS_TYPE, "gpufleet-prometheus", "Prometheus, dcgm-exporter names", "dcgm"
)
# Every flavour built and committed.
ALL_FLAVOURS = (*FLAVOURS, PROMETHEUS_DCGM)


@dataclass(frozen=True)
class Query:
    # SQL may be "" when another query of the same panel already returns this one's column in SQL
    # (one SQL table query joins what PromQL needs several instant queries for).
    sql: str
    promql: str
    legend: str = ""  # PromQL legend template, e.g. "{{node}} gpu {{gpu}}"
    name: str = ""  # the series / column this query stands for (tables: the column header)


@dataclass(frozen=True)
class PanelDef:
    title: str
    question: str  # the question this panel answers; shown as the panel's description
    kind: str
    queries: tuple[Query, ...] = ()
    unit: str = ""
    width: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    stacked: bool = False
    columns: tuple[str, ...] = ()  # table: the label/key columns every row carries
    tags: tuple[str, ...] = ()  # annotations: the tags to list

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"panel {self.title!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind != "annotations" and not self.queries:
            raise ValueError(f"panel {self.title!r} has no query")


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[PanelDef, ...]


@dataclass(frozen=True)
class DashboardDef:
    slug: str  # file and uid stem, e.g. "fleet-overview"
    title: str
    description: str
    variables: tuple[str, ...]  # subset of VARIABLES, in order
    rows: tuple[Row, ...] = field(default_factory=tuple)

    def panels(self) -> list[PanelDef]:
        return [p for r in self.rows for p in r.panels]


# ---- template variables and filters --------------------------------------------------------------
VARIABLES = ("cluster", "node", "gpu")

# GPUs without a configured cluster carry no `cluster` label; SQL shows them as cluster "none".
NO_CLUSTER = "none"


def sql_filter(variables: tuple[str, ...], prefix: str = "") -> str:
    """WHERE conditions selecting the dashboard's variables (multi-value, SQL-quoted by Grafana)."""
    parts = []
    for v in variables:
        col = f"{prefix}{v}"
        parts.append(
            f"coalesce({col}, '{NO_CLUSTER}') IN ($cluster)" if v == "cluster" else f"{col} IN (${v})"
        )
    return " AND ".join(parts) or "TRUE"


def prom_matchers(variables: tuple[str, ...]) -> str:
    """PromQL label matchers for the dashboard's variables (regex, `.*` for All)."""
    return ", ".join(f'{v}=~"${v}"' for v in variables)
