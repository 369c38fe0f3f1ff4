"""The efficiency report, checked against a fleet whose hours are known by construction.

Six hours of one-minute samples are written straight into a store (SQLite and PostgreSQL):

* GPU 0 on node-a, held by pod ns-a/train-1 for four hours: 2 h busy, 1 h busy with SM activity at 5 %,
  1 h idle with 40 GiB held; then released: 2 h idle. No energy counter, 300 W throughout.
* GPU 0 on node-b, no pod: 6 h busy; hardware thermal slowdown for 2 h, power cap for 30 min; XID 79
  twice; an energy counter rising 500 J/s; a model served at 1,000 tokens/s.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from click.testing import CliRunner

from gpufleet.agent.fields import XID
from gpufleet.agent.sources.inference import _RATE_FAMILIES
from gpufleet.cli import main
from gpufleet.collector.report import build_report, parse_since, render_html, render_markdown, slack_blocks
from gpufleet.core import remote_write as rw
from tests.conftest import gpu_field, produced

# the name the agent's inference source writes
GENERATED_TOKENS = produced(_RATE_FAMILIES["generation_tokens"][0])
T0 = 1_700_006_400  # a whole hour
MIN = 60
GIB = 1 << 30
SIX_HOURS = 6 * 3600


def _series(name: str, labels: dict[str, str], points: list[tuple[int, float]]) -> rw.Series:
    return rw.Series({"__name__": name, **labels}, [(t * 1000, float(v)) for t, v in points])


def _minutes(f, start: int = 0, stop: int = 360) -> list[tuple[int, float]]:
    return [(T0 + k * MIN, f(k)) for k in range(start, stop) if f(k) is not None]


def known_fleet() -> list[rw.Series]:
    a = {"node": "node-a", "gpu": "0", "uuid": "GPU-aaaa", "model": "NVIDIA H100 80GB HBM3"}
    a_pod = {**a, "pod": "train-1", "namespace": "ns-a"}
    b = {"node": "node-b", "gpu": "0", "uuid": "GPU-bbbb", "model": "NVIDIA H100 80GB HBM3"}

    def util_a(k):
        return 0.9 if k < 180 else 0.0

    def sm_a(k):
        return 0.6 if k < 120 else 0.05 if k < 180 else 0.0

    def mem_a(k):
        return 40 * GIB if k < 240 else 0.3 * GIB

    out = []
    for name, f in (
        (gpu_field("DCGM_FI_DEV_GPU_UTIL"), util_a),
        (gpu_field("DCGM_FI_PROF_SM_ACTIVE"), sm_a),
        (gpu_field("DCGM_FI_DEV_FB_USED"), mem_a),
        (gpu_field("DCGM_FI_DEV_POWER_USAGE"), lambda k: 300),
    ):
        out.append(_series(name, a_pod, _minutes(f, 0, 240)))  # while the pod holds the GPU
        out.append(_series(name, a, _minutes(f, 240, 360)))
    out.append(
        _series(
            gpu_field("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"),
            {**a_pod, "type": "corrected", "scope": "volatile"},
            _minutes(lambda k: 3 if k < 60 else 5, -1, 240),
        )
    )  # 3 before the range: 2 new errors
    out.append(
        _series(
            gpu_field("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"),
            {**a_pod, "type": "uncorrected", "scope": "volatile"},
            _minutes(lambda k: 0, -1, 240),
        )
    )
    for name, f in (
        (gpu_field("DCGM_FI_DEV_GPU_UTIL"), lambda k: 0.9),
        (gpu_field("DCGM_FI_PROF_SM_ACTIVE"), lambda k: 0.5),
        (gpu_field("DCGM_FI_DEV_FB_USED"), lambda k: 60 * GIB),
        (gpu_field("DCGM_FI_DEV_POWER_USAGE"), lambda k: 500),
    ):
        out.append(_series(name, b, _minutes(f)))
    out.append(
        _series(
            gpu_field("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"), b, _minutes(lambda k: 1e6 + 500 * 60 * k, -1)
        )
    )
    for reason, f in (
        ("hw_thermal", lambda k: 1 if 60 <= k < 180 else 0),
        ("sw_power_cap", lambda k: 1 if 300 <= k < 330 else 0),
        ("gpu_idle", lambda k: 1),
    ):  # not a slowdown: never counted
        out.append(
            _series(gpu_field("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"), {**b, "reason": reason}, _minutes(f))
        )
    out.append(
        _series(
            produced(XID[0]),
            {**b, "xid": "79"},
            _minutes(lambda k: None if k < 240 else 1 if k < 270 else 2),
        )
    )
    out.append(
        _series(
            GENERATED_TOKENS,
            {"node": "node-b", "model": "llama-3-8b"},
            _minutes(lambda k: 1000),
        )
    )
    return out


@pytest.fixture
def known_store(store):
    store.write(known_fleet())
    return store


def rows_by(section, *key_cols):
    return {tuple(r[i] for i in key_cols): r for r in section.rows}


def test_gpu_hours_by_state_match_the_constructed_fleet(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    assert r.step_s == 60
    assert r.gpu_hours == {"busy": 2 + 6, "busy_low_sm": 1, "idle_with_memory": 1, "idle": 2}
    per_gpu = rows_by(r.section("states"), 2)
    assert per_gpu[("GPU-aaaa",)][3:] == [2, 1, 1, 2]
    assert per_gpu[("GPU-bbbb",)][3:] == [6, 0, 0, 0]
    assert "SM activity under 10%" in " ".join(r.section("states").findings)


def test_wasted_hours_are_charged_to_the_pod_that_held_the_gpu(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    waste = rows_by(r.section("waste"), 0, 1)
    # held 4 h: 2 busy, 1 busy-low-SM, 1 idle with memory; the 2 idle hours after release are nobody's
    assert waste[("pod", "ns-a/train-1")][2:] == [4, 2, 1, 1, 0]
    assert waste[("namespace", "ns-a")][2:] == [4, 2, 1, 1, 0]
    assert r.section("waste").findings == ["ns-a/train-1 held GPUs for 4 h and wasted 2 h (50%)."]


def test_throttled_hours_by_cause_and_node(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    assert r.section("throttle").rows == [["node-b", "hw_thermal", 2.0], ["node-b", "sw_power_cap", 0.5]]


def test_xid_and_ecc_counts_by_node(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    assert r.section("errors").rows == [["node-a", 0, "", 2, 0], ["node-b", 2, "79×2", 0, 0]]


def test_energy_from_counters_and_from_power_where_there_is_no_counter(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    assert r.section("energy").rows == [["node-a", 1.8], ["node-b", 3.0]]


def test_tokens_per_joule_per_model(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    # 1,000 tokens/s on a node whose one GPU draws 500 W: 2 tokens per joule
    assert r.section("inference").rows == [["llama-3-8b", 21_600_000, 3.0, 2.0]]


def test_a_partial_range_counts_only_its_own_hours(known_store):
    r = build_report(known_store.engine, T0 + 3600, T0 + 3 * 3600)
    assert r.gpu_hours == {"busy": 1 + 2, "busy_low_sm": 1, "idle_with_memory": 0, "idle": 0}
    assert r.section("throttle").rows == [["node-b", "hw_thermal", 2.0]]
    assert r.section("errors").rows == [["node-a", 0, "", 2, 0]]  # the ECC step at minute 60; no XID yet


def test_a_gpu_that_stops_reporting_stops_adding_hours(store):
    labels = {"node": "n", "gpu": "0", "uuid": "GPU-gone"}
    store.write([_series(gpu_field("DCGM_FI_DEV_GPU_UTIL"), labels, _minutes(lambda k: 0.0, 0, 30))])
    r = build_report(store.engine, T0, T0 + SIX_HOURS)
    assert r.gpu_hours == {"busy": 0, "busy_low_sm": 0, "idle_with_memory": 0, "idle": 0.5}


def test_without_inference_or_pods_the_report_says_so(store):
    labels = {"node": "n", "gpu": "0", "uuid": "GPU-x"}
    store.write([_series(gpu_field("DCGM_FI_DEV_GPU_UTIL"), labels, _minutes(lambda k: 0.9, 0, 60))])
    r = build_report(store.engine, T0, T0 + 3600)
    assert r.gpu_hours["busy"] == 1.0
    assert "no SM activity data" in " ".join(r.section("states").findings)
    assert r.section("inference").rows == []
    assert r.section("inference").findings == [f"No inference data ({GENERATED_TOKENS}) in this range."]
    assert "pod label" in r.section("waste").findings[0]


def test_every_finding_carries_the_query_that_backs_it(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    md = render_markdown(r)
    page = render_html(r)
    for s in r.sections:
        assert "metric_samples" in s.sql and s.promql
        assert s.sql in md and f"`{s.promql}`" in md
    assert md.count("```sql") == len(r.sections)
    assert page.count("<details>") == len(r.sections)
    # the SQL shown is the SQL that ran: running it again gives the rows the report read
    from sqlalchemy import text

    with known_store.engine.connect() as conn:
        n = conn.execute(
            text(r.section("states").sql), {"since": T0, "until": T0 + SIX_HOURS, "step": 60}
        ).all()
    assert len(n) == 2 * 4 * 360  # 2 GPUs × 4 metrics × 360 one-minute buckets


def test_slack_digest_blocks_stay_within_block_kit_limits(known_store):
    r = build_report(known_store.engine, T0, T0 + SIX_HOURS)
    text, blocks = slack_blocks(r, link="http://collector:9446/api/v1/report?format=html")
    assert text.startswith("GPU fleet report 2023-11-15 to 2023-11-15")
    assert blocks[0]["type"] == "header" and len(blocks) <= 50
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in blocks)
    assert "busy, low SM activity* 1 h" in blocks[1]["text"]["text"]


def test_parse_since():
    assert parse_since("7d", 1_000_000.0) == (1_000_000.0 - 7 * 86400, 1_000_000.0)
    assert parse_since("90m", 10_000.0) == (4_600.0, 10_000.0)
    assert parse_since("2023-11-15T00:00:00+00:00", T0 + 60)[0] == T0
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last week", T0)


def test_cli_report_from_the_database_in_markdown_and_html(known_store, db_url, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["report", "--db", db_url, "--since", "6h", "--until", str(T0 + SIX_HOURS)])
    assert res.exit_code == 0, res.output
    assert (
        "| busy, low SM activity | 1 |" in res.output and "## Throttled hours by cause and node" in res.output
    )
    out = tmp_path / "r.html"
    res = runner.invoke(
        main,
        [
            "report",
            "--db",
            db_url,
            "--since",
            "6h",
            "--until",
            str(T0 + SIX_HOURS),
            "--format",
            "html",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "<td>ns-a/train-1</td>" in out.read_text()
    res = runner.invoke(main, ["report", "--db", db_url, "--since", "yesterday"])
    assert res.exit_code != 0 and "neither a duration" in res.output


def test_cli_report_through_the_collector_api(tmp_path):
    from gpufleet.collector.service import Collector, CollectorSettings
    from tests.conftest import free_port

    port = free_port()
    c = Collector(CollectorSettings(listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp_path}/c.db")).start()
    try:
        c.store.write(known_fleet())
        url = f"http://127.0.0.1:{port}"
        res = CliRunner().invoke(
            main, ["report", "--collector", url, "--since", "6h", "--until", str(T0 + SIX_HOURS)]
        )
        assert res.exit_code == 0, res.output
        assert "| idle with memory held | 1 |" in res.output
        with urllib.request.urlopen(
            f"{url}/api/v1/report?since=6h&until={T0 + SIX_HOURS}", timeout=10
        ) as resp:
            body = json.loads(resp.read())
        assert body["gpu_hours"]["busy"] == 8
        res = CliRunner().invoke(main, ["report", "--collector", url, "--since", "soon"])
        assert res.exit_code != 0 and re.search(r"neither a duration", res.output)
    finally:
        c.close()
