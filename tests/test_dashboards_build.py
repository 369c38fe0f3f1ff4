"""The committed dashboards/*.json are what the code generates, and the dashboards keep their contracts."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from gpufleet import dashboards
from gpufleet.cli import main
from gpufleet.dashboards.macros import expand_promql, expand_sql
from gpufleet.dashboards.render import dumps

MODELS = dashboards.build()


def test_committed_json_is_what_the_code_generates():
    want = {name: dumps(model) for name, model in MODELS.items()}
    have = dashboards.committed()
    stale = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
    assert not stale, f"regenerate with `gpufleet dashboards build` and commit: {stale}"


def test_build_check_fails_when_a_file_was_edited_by_hand(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["dashboards", "build", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(main, ["dashboards", "build", "--check", "--out", str(tmp_path)]).exit_code == 0
    edited = tmp_path / "fleet-overview.postgres.json"
    edited.write_text(edited.read_text().replace("GPUs up", "GPUs upp"))
    result = runner.invoke(main, ["dashboards", "build", "--check", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "fleet-overview.postgres.json" in result.output


def test_five_dashboards_in_three_flavours_from_the_same_panels():
    assert len(MODELS) == 15
    for d in dashboards.DASHBOARDS:
        pg, prom = MODELS[f"{d.slug}.postgres.json"], MODELS[f"{d.slug}.prometheus.json"]
        dcgm = MODELS[f"{d.slug}.prometheus-dcgm.json"]
        titles = [p["title"] for p in pg["panels"]]
        assert titles == [p["title"] for p in prom["panels"]] == [p["title"] for p in dcgm["panels"]]
        assert len(set(titles)) == len(titles), "panel titles repeat within a dashboard"
        # one dashboard whichever names the agents serve: links to it (Slack's, the dashboards') hold in both
        assert (dcgm["uid"], dcgm["tags"]) == (prom["uid"], prom["tags"])
    assert len({m["uid"] for m in MODELS.values()}) == 10


@pytest.mark.parametrize("name", sorted(MODELS))
def test_panels_use_the_datasource_variable_and_do_not_overlap(name):
    model = MODELS[name]
    flavour = name.split(".")[1]
    ds_type = "grafana-postgresql-datasource" if flavour == "postgres" else "prometheus"
    taken = set()
    for p in model["panels"]:
        g = p["gridPos"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        assert g["x"] + g["w"] <= 24
        taken |= cells
        if p["type"] in ("row", "annolist"):
            continue
        assert p["description"], f"{p['title']} does not say what question it answers"
        assert p["datasource"] == {"type": ds_type, "uid": "${datasource}"}
        assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"])


def test_sql_reads_only_the_metric_samples_view():
    for name, model in MODELS.items():
        if not name.endswith(".postgres.json"):
            continue
        queries = [t["rawSql"] for p in model["panels"] for t in p.get("targets", [])]
        queries += [v["query"] for v in model["templating"]["list"] if v["type"] == "query"]
        for sql in queries:
            ctes = set(re.findall(r"(\w+) AS \(", sql))
            for source in re.findall(r"(?<!epoch )\b(?:FROM|JOIN)\s+(\w+)", sql):
                assert source in ctes | {"metric_samples"}, f"{name}: reads {source}:\n{sql}"


def test_sql_expansion_follows_grafana():
    sql = (
        "SELECT $__timeGroupAlias(time, $__interval), avg(value) FROM metric_samples "
        "WHERE $__timeFilter(time) AND node IN ($node) AND time < $__timeTo() AND x = $__interval_ms"
    )
    out = expand_sql(
        sql, start=1_700_000_000, end=1_700_000_300, interval="1m", variables={"node": ["a", "o'b"]}
    )
    assert out == (
        'SELECT floor(extract(epoch from time)/60)*60 AS "time", avg(value) FROM metric_samples '
        "WHERE time BETWEEN '2023-11-14T22:13:20Z' AND '2023-11-14T22:18:20Z' AND node IN ('a','o''b') "
        "AND time < '2023-11-14T22:18:20Z' AND x = 60000"
    )
    with pytest.raises(ValueError, match="unexpanded"):
        expand_sql("SELECT $unknown", start=0, end=1, interval="1s", variables={})


def test_promql_expansion_follows_grafana():
    expr = 'rate(x{node=~"$node", gpu=~"${gpu}"}[$__rate_interval]) * $__range_s'
    out = expand_promql(
        expr,
        start=0,
        end=3600,
        interval="15s",
        scrape_interval=15,
        variables={"node": ["a.b", "c"], "gpu": ["$__all"]},
    )
    assert out == r'rate(x{node=~"(a\.b|c)", gpu=~".*"}[1m]) * 3600'


def test_json_files_are_valid_grafana_dashboards():
    for name, text in dashboards.committed().items():
        model = json.loads(text)
        assert model["schemaVersion"] >= 39 and model["uid"].startswith("gpufleet-"), name


def test_the_docs_describe_every_dashboard_and_panel():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "dashboards.md").read_text()
    for d in dashboards.DASHBOARDS:
        assert d.title in doc
        for row in d.rows:
            if row.title == "Every field the agent collects":
                assert f"*{row.title}* ({len(row.panels)} panels)" in doc, (
                    "docs/dashboards.md miscounts the panels"
                )
            else:
                for p in row.panels:
                    assert f"| {p.title} |" in doc, (
                        f"docs/dashboards.md does not describe {d.title} / {p.title}"
                    )
