"""Renders a flavour-neutral :class:`~dashboards.model.DashboardDef` into Grafana dashboard JSON through
grafana-foundation-sdk's typed builders, for one flavour: ``postgres``, ``prometheus`` or
``prometheus-dcgm`` (the Prometheus queries rewritten for agents in dcgm naming mode)."""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import (
    annotationslist,
    bargauge,
    common,
    dashboard,
    heatmap,
    prometheus,
    stat,
    timeseries,
)
from grafana_foundation_sdk.builders import table as table_builder
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

from gpufleet.core.naming import Naming, Untranslatable, translate
from gpufleet.dashboards.model import (
    FLAVOURS,
    NO_CLUSTER,
    DashboardDef,
    Flavour,
    PanelDef,
    prom_matchers,
    sql_filter,
)

__all__ = ["FLAVOURS", "Flavour", "dumps", "render"]

DS_VARIABLE = "datasource"


class SqlQuery(cogvariants.Dataquery):
    """A query of Grafana's SQL data sources (the SDK ships no PostgreSQL query model)."""

    def __init__(
        self, ref_id: str, raw_sql: str, fmt: str, datasource: dashboard_models.DataSourceRef
    ) -> None:
        self.ref_id, self.raw_sql, self.format, self.datasource = ref_id, raw_sql, fmt, datasource

    def to_json(self) -> dict[str, Any]:
        return {
            "refId": self.ref_id,
            "datasource": self.datasource.to_json(),
            "editorMode": "code",
            "format": self.format,
            "rawQuery": True,
            "rawSql": self.raw_sql,
        }


class SqlQueryBuilder(cogbuilder.Builder[SqlQuery]):
    def __init__(self, query: SqlQuery) -> None:
        self._query = query

    def build(self) -> SqlQuery:
        return self._query


def _naming(flavour: Flavour) -> Naming | None:
    if flavour.naming == "gpufleet":
        return None
    from gpufleet.agent.dcgm_names import naming

    return naming()


def _promql(p: PanelDef, expr: str, naming: Naming | None) -> str:
    if naming is None:
        return expr
    try:
        return translate(expr, naming)
    except Untranslatable as exc:
        raise ValueError(
            f"panel {p.title!r}: its PromQL cannot be said over {naming.name} names: {exc}"
        ) from None


def _ds(flavour: Flavour) -> dashboard_models.DataSourceRef:
    return dashboard_models.DataSourceRef(type_val=flavour.datasource_type, uid="${" + DS_VARIABLE + "}")


def _variables(d: DashboardDef, flavour: Flavour) -> list[cogbuilder.Builder[dashboard_models.VariableModel]]:
    ds = _ds(flavour)
    out: list[cogbuilder.Builder[dashboard_models.VariableModel]] = [
        dashboard.DatasourceVariable(DS_VARIABLE)
        .label("Data source")
        .type(flavour.datasource_type)
        .current(
            dashboard_models.VariableOption(
                selected=True, text=flavour.default_datasource_uid, value=flavour.default_datasource_uid
            )
        )
    ]
    for i, name in enumerate(d.variables):
        before = d.variables[:i]
        if flavour.source == "postgres":
            col = f"coalesce(cluster, '{NO_CLUSTER}')" if name == "cluster" else name
            query: str = (
                f"SELECT DISTINCT {col} FROM metric_samples WHERE metric = 'gpufleet_gpu_up' "
                f"AND $__timeFilter(time) AND {sql_filter(before)} ORDER BY 1"
            )
        else:
            query = f"label_values(gpufleet_gpu_up{{{prom_matchers(before)}}}, {name})"
        var = (
            dashboard.QueryVariable(name)
            .label(name.capitalize() if name != "gpu" else "GPU")
            .query(query)
            .datasource(ds)
            .multi(True)
            .include_all(True)
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.NATURAL_ASC)
            .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
        )
        if flavour.source == "prometheus":
            var = var.all_value(".*")
        out.append(var)
    return out


def _targets(p: PanelDef, flavour: Flavour) -> list[cogbuilder.Builder[cogvariants.Dataquery]]:
    ds = _ds(flavour)
    naming = _naming(flavour)
    out: list[cogbuilder.Builder[cogvariants.Dataquery]] = []
    series = p.kind in ("timeseries", "heatmap")
    for i, q in enumerate(p.queries):
        ref = chr(ord("A") + i)
        if flavour.source == "postgres":
            if not q.sql:
                continue
            out.append(SqlQueryBuilder(SqlQuery(ref, q.sql, "time_series" if series else "table", ds)))
            continue
        t = (
            prometheus.Dataquery()
            .ref_id(ref)
            .expr(_promql(p, q.promql, naming))
            .datasource(ds)
            .editor_mode(prometheus_models.QueryEditorMode.CODE)
        )
        if series:
            t = t.range().legend_format(q.legend or "__auto")
        else:
            t = t.instant().format(
                prometheus_models.PromQueryFormat.TABLE
                if p.kind == "table"
                else prometheus_models.PromQueryFormat.TIME_SERIES
            )
            if q.legend:
                t = t.legend_format(q.legend)
        out.append(t)
    return out


def _panel(p: PanelDef, flavour: Flavour) -> cogbuilder.Builder[dashboard_models.Panel]:
    targets = _targets(p, flavour)
    b: Any
    if p.kind == "timeseries":
        b = timeseries.Panel().line_width(1).fill_opacity(10 if not p.stacked else 60)
        if p.stacked:
            b = b.stacking(common.StackingConfig().mode(common_models.StackingMode.NORMAL))
    elif p.kind == "heatmap":
        b = (
            heatmap.Panel()
            .calculate(True)
            .color(
                heatmap.HeatmapColorOptions()
                .mode(heatmap_models.HeatmapColorMode.SCHEME)
                .scheme("Oranges")
                .steps(64)
            )
        )
    elif p.kind == "stat":
        b = (
            stat.Panel()
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .graph_mode(common_models.BigValueGraphMode.NONE)
        )
    elif p.kind == "bargauge":
        b = (
            bargauge.Panel()
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .orientation(common_models.VizOrientation.HORIZONTAL)
            .display_mode(common_models.BarGaugeDisplayMode.GRADIENT)
        )
    elif p.kind == "table":
        b = table_builder.Panel()
        if flavour.source == "prometheus" and len(p.queries) > 1:
            b = b.with_transformation(dashboard_models.DataTransformerConfig(id_val="merge", options={}))
        if flavour.source == "prometheus":
            names = {f"Value #{chr(ord('A') + i)}": q.name for i, q in enumerate(p.queries) if q.name}
            if len(p.queries) == 1 and p.queries[0].name:
                names = {"Value": p.queries[0].name}
            b = b.with_transformation(
                dashboard_models.DataTransformerConfig(
                    id_val="organize",
                    options={
                        "excludeByName": {"Time": True},
                        "indexByName": {c: i for i, c in enumerate(p.columns)},
                        "renameByName": names,
                    },
                )
            )
    else:  # annotations
        b = (
            annotationslist.Panel()
            .only_from_this_dashboard(False)
            .only_in_time_range(True)
            .tags(list(p.tags))
            .limit(50)
            .show_tags(True)
            .show_time(True)
            .show_user(False)
        )
    b = b.title(p.title).description(p.question).span(p.width).height(p.height)
    if p.kind != "annotations":
        b = b.datasource(_ds(flavour))
        for t in targets:
            b = b.with_target(t)
        if p.unit:
            b = b.unit(p.unit)
        if p.min is not None:
            b = b.min(p.min)
        if p.max is not None:
            b = b.max(p.max)
    return b


def render(d: DashboardDef, flavour: Flavour) -> dict[str, Any]:
    """The dashboard as Grafana JSON (a plain dict), for ``flavour``."""
    b = (
        dashboard.Dashboard(f"{d.title} ({flavour.label})")
        .uid(f"gpufleet-{d.slug}-{flavour.source}")
        .description(d.description)
        .tags(["gpufleet", flavour.source])
        .editable()
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("gpufleet dashboards")
            .type(dashboard_models.DashboardLinkType.DASHBOARDS)
            .tags(["gpufleet", flavour.source])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .annotation(
            dashboard.AnnotationQuery()
            .name("gpufleet alerts")
            .enable(True)
            .icon_color("red")
            .datasource(dashboard_models.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .target(dashboard.AnnotationTarget().type("tags").tags(["gpufleet"]).limit(200).match_any(True))
        )
    )
    for v in _variables(d, flavour):
        b = b.with_variable(v)
    for row in d.rows:
        b = b.with_row(dashboard.Row(row.title))
        for p in row.panels:
            b = b.with_panel(_panel(p, flavour))
    model = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    _number_panels(model)
    return model


def _number_panels(model: dict[str, Any]) -> None:
    """Stable panel ids (1, 2, …) in layout order, so regenerating gives the same JSON."""
    for i, panel in enumerate(model.get("panels", []), start=1):
        panel["id"] = i


def dumps(model: dict[str, Any]) -> str:
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
