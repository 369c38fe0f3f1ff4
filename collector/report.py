"""Efficiency report: where the fleet's GPU-hours went, computed in SQL on the `metric_samples` view.

Every GPU's time is cut into buckets (60 s for a day, 5 min for a week). In each bucket the GPU is

* **busy**: a kernel ran (utilization >= 5 %) and the SMs did work (SM activity >= 10 %);
* **busy, low SM activity**: a kernel ran but the SMs were mostly idle (the NVML utilization trap:
  one tiny kernel at a time reads as "100 % utilized");
* **idle with memory**: no kernel, but memory is held (>= 1 GiB): a job that sits on a GPU;
* **idle**: no kernel, no memory held.

A bucket with data counts for the time to the GPU's next bucket with data, at most 5 minutes (the
lookback Prometheus uses), so a GPU that stops reporting stops adding hours. Without SM activity
(no GPM on pre-Hopper cards) busy buckets count as busy and the report says how many hours that was.

The same SQL runs on SQLite (time in epoch seconds) and PostgreSQL (timestamptz); each section carries
the statement that produced it and the PromQL that shows the same thing in Grafana.
"""

from __future__ import annotations

import datetime as dt
import html
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from gpufleet.core.durations import parse_duration

GIB = float(1 << 30)
STATES = ("busy", "busy_low_sm", "idle_with_memory", "idle")
STATE_TITLES = {
    "busy": "busy",
    "busy_low_sm": "busy, low SM activity",
    "idle_with_memory": "idle with memory held",
    "idle": "idle",
    "unknown": "no utilization data",
}
# The agent's inference source writes tokens generated per second per model and server; prompt tokens are
# read, not produced, so tokens per joule counts generated tokens.
GENERATION_TOKENS = "gpufleet_inference_generation_tokens_per_second"
THROTTLE_REASONS = ("hw_thermal", "sw_thermal", "hw_slowdown", "hw_power_brake", "sw_power_cap")


class ReportError(ValueError):
    """A report request that cannot be answered as asked (bad range, bad format)."""


@dataclass(frozen=True)
class Thresholds:
    idle_utilization: float = 0.05  # below: no kernel ran to speak of
    low_sm_activity: float = 0.10  # below, while a kernel runs: busy but doing little
    memory_held_bytes: float = GIB  # at or above, while idle: memory held by someone
    max_gap_s: float = 300.0  # a bucket counts until the next one, at most this long


@dataclass
class Section:
    key: str
    title: str
    headers: list[str]
    rows: list[list[Any]]
    findings: list[str]
    sql: str
    promql: str
    note: str = ""


@dataclass
class Report:
    since: float
    until: float
    step_s: int
    generated_at: float
    gpu_hours: dict[str, float]
    sections: list[Section] = field(default_factory=list)

    def section(self, key: str) -> Section:
        return next(s for s in self.sections if s.key == key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- time range ---------------------------------------------------------------------------------------
_LATEST = 4_102_444_800.0  # 2100-01-01: later times are typing mistakes, and overflow datetime


def parse_since(since: str, until: float | None = None, now: float | None = None) -> tuple[float, float]:
    """``since``: a duration back from ``until`` (``7d``, ``24h``, ``90m``), Unix seconds or an ISO 8601 time."""
    end = float(until) if until is not None else (time.time() if now is None else now)
    try:
        back: float | None = parse_duration(since, unit_required=True)
    except ValueError:
        back = None
    if back is not None:
        start = end - back
    elif re.fullmatch(r"\d{9,}(?:\.\d+)?", since.strip()):  # Unix seconds
        start = float(since)
    else:
        try:
            t = dt.datetime.fromisoformat(since)
        except ValueError:
            raise ReportError(
                f"--since {since!r} is neither a duration (7d, 24h, 90m, 3600s) nor an ISO 8601 time "
                "(2024-05-01T00:00:00+00:00)"
            ) from None
        start = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    if not (0 <= start < end <= _LATEST):  # NaN fails every comparison
        if not (0 <= end <= _LATEST) or not (0 <= start <= _LATEST):
            raise ReportError(
                f"the report range {since!r}..{until!r} is outside 1970..2100; give Unix seconds "
                "or a duration such as 7d"
            )
        raise ReportError(f"the report range is empty: since ({since}) is not before until ({end})")
    return start, end


def default_step(since: float, until: float) -> int:
    """60 s buckets up to a day, coarser beyond so a week is about 2,000 buckets per GPU."""
    return max(60, int((until - since) / 2016) // 60 * 60)


# ---- SQL, per dialect -----------------------------------------------------------------------------------
class _Sql:
    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"

    def in_range(self) -> str:
        if self.pg:
            return "time >= to_timestamp(:since) AND time < to_timestamp(:until)"
        return "time >= :since AND time < :until"

    def before_until(self) -> str:
        return "time < to_timestamp(:until)" if self.pg else "time < :until"

    def at_or_after_since(self) -> str:
        return "time >= to_timestamp(:since)" if self.pg else "time >= :since"

    def bucket(self) -> str:
        if self.pg:
            return "CAST(floor((extract(epoch from time) - :since) / :step) AS BIGINT)"
        return "CAST((time - :since) / :step AS INTEGER)"

    def label(self, name: str) -> str:
        return f"(labels ->> '{name}')" if self.pg else f"json_extract(labels, '$.{name}')"


def _sql_gpu_buckets(q: _Sql) -> str:
    return f"""SELECT uuid, node, gpu, pod, namespace, metric, {q.bucket()} AS bucket, AVG(value) AS value
FROM metric_samples
WHERE metric IN ('gpufleet_gpu_utilization_ratio', 'gpufleet_gpu_sm_active_ratio',
                 'gpufleet_gpu_memory_used_bytes', 'gpufleet_gpu_power_watts')
  AND uuid IS NOT NULL AND {q.in_range()}
GROUP BY uuid, node, gpu, pod, namespace, metric, bucket"""


def _sql_throttle(q: _Sql) -> str:
    reasons = ", ".join(f"'{r}'" for r in THROTTLE_REASONS)
    return f"""SELECT uuid, node, {q.label("reason")} AS reason, {q.bucket()} AS bucket, AVG(value) AS value
FROM metric_samples
WHERE metric = 'gpufleet_gpu_clock_event_active' AND {q.label("reason")} IN ({reasons}) AND {q.in_range()}
GROUP BY uuid, node, reason, bucket"""


def _sql_counter_increase(q: _Sql, key: str, *, where: str = "", count_first: bool) -> str:
    """Increase of a counter within the range, per node and key: the sum of its steps up, a drop being a
    reset (the new value counts). The sample before the range is the baseline; a series whose very first
    sample is in the range counts from zero when ``count_first`` (event counters born at their first event)."""
    first = "value" if count_first else "0"
    return f"""WITH s AS (
  SELECT node, uuid, {key} AS key, time, value,
         LAG(value) OVER (PARTITION BY metric, labels ORDER BY time) AS prev
  FROM metric_samples
  WHERE metric = :metric AND {q.before_until()}{where})
SELECT node, uuid, key,
       SUM(CASE WHEN prev IS NULL THEN {first} WHEN value >= prev THEN value - prev ELSE value END) AS increase
FROM s WHERE {q.at_or_after_since()}
GROUP BY node, uuid, key"""


def _sql_tokens(q: _Sql) -> str:
    return f"""SELECT node, model, {q.bucket()} AS bucket, AVG(value) AS value
FROM metric_samples
WHERE metric = '{GENERATION_TOKENS}' AND {q.in_range()}
GROUP BY node, model, bucket"""


def _durations(
    buckets: Iterable[int], step: int, since: float, until: float, max_gap_s: float
) -> dict[int, float]:
    """Seconds each bucket stands for: until the next bucket with data, at most max_gap_s, not past until."""
    bs = sorted(set(buckets))
    out = {}
    cap = max(max_gap_s, step)
    for i, b in enumerate(bs):
        start = since + b * step
        nxt = since + bs[i + 1] * step if i + 1 < len(bs) else start + step
        out[b] = max(0.0, min(nxt - start, cap, until - start))
    return out


def _h(seconds: float) -> float:
    return round(seconds / 3600.0, 3)


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "n/a"


# ---- the report ---------------------------------------------------------------------------------------------
def build_report(
    engine: Engine,
    since: float,
    until: float,
    *,
    step: int | None = None,
    thresholds: Thresholds | None = None,
    top: int = 10,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Compute the report for [since, until) from the store behind ``engine``. ``progress`` hears which of
    the six queries runs (over weeks of a large fleet each can take a while)."""
    th = thresholds or Thresholds()
    step = step or default_step(since, until)
    q = _Sql(engine.dialect.name)
    params = {"since": since, "until": until, "step": step}
    xid_sql = _sql_counter_increase(q, q.label("xid"), count_first=True)
    ecc_sql = _sql_counter_increase(
        q, q.label("type"), where=f" AND {q.label('scope')} = 'volatile'", count_first=False
    )
    energy_sql = _sql_counter_increase(q, "''", count_first=False)
    queries = [
        ("GPU utilization", _sql_gpu_buckets(q), {}),
        ("throttling", _sql_throttle(q), {}),
        ("XID errors", xid_sql, {"metric": "gpufleet_gpu_xid_errors_total"}),
        ("ECC errors", ecc_sql, {"metric": "gpufleet_gpu_ecc_errors_total"}),
        ("energy", energy_sql, {"metric": "gpufleet_gpu_energy_joules_total"}),
        ("inference tokens", _sql_tokens(q), {}),
    ]
    results = []
    with engine.connect() as conn:
        for n, (what, sql, extra) in enumerate(queries, 1):
            if progress is not None:
                progress(f"reading {what} ({n} of {len(queries)})")
            results.append(conn.execute(text(sql), {**params, **extra}).all())
    gpu_rows, throttle_rows, xid_rows, ecc_rows, energy_rows, token_rows = results

    # One record per (GPU, bucket): the bucket's averages and who held the GPU.
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for uuid, node, gpu, pod, namespace, metric, bucket, value in gpu_rows:
        c = cells.setdefault((uuid, int(bucket)), {"node": node, "gpu": gpu, "pod": None, "namespace": None})
        c[metric] = value
        if pod:
            c["pod"], c["namespace"] = pod, namespace
    per_gpu: dict[str, list[int]] = defaultdict(list)
    for uuid, b in cells:
        per_gpu[uuid].append(b)
    hours = dict.fromkeys((*STATES, "unknown"), 0.0)
    no_sm_s = 0.0
    by_gpu: dict[str, dict[str, Any]] = {}
    by_pod: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    power_j: dict[str, float] = defaultdict(float)
    node_j: dict[tuple[str, int], float] = defaultdict(float)
    for uuid, bs in per_gpu.items():
        for b, secs in _durations(bs, step, since, until, th.max_gap_s).items():
            c = cells[(uuid, b)]
            util = c.get("gpufleet_gpu_utilization_ratio")
            sm = c.get("gpufleet_gpu_sm_active_ratio")
            mem = c.get("gpufleet_gpu_memory_used_bytes")
            watts = c.get("gpufleet_gpu_power_watts")
            if watts is not None:
                power_j[uuid] += watts * secs
                node_j[(c["node"], b)] += watts * secs
            if util is None:
                state = "unknown"
            elif util >= th.idle_utilization:
                if sm is None:
                    no_sm_s += secs
                state = "busy_low_sm" if sm is not None and sm < th.low_sm_activity else "busy"
            else:
                state = "idle_with_memory" if mem is not None and mem >= th.memory_held_bytes else "idle"
            hours[state] += secs
            g = by_gpu.setdefault(uuid, {"node": c["node"], "gpu": c["gpu"], **dict.fromkeys(hours, 0.0)})
            g[state] += secs
            if c["pod"]:
                p = by_pod[(c["namespace"] or "", c["pod"])]
                p["total"] += secs
                p[state] += secs

    total_s = sum(hours.values())
    report = Report(
        since=since,
        until=until,
        step_s=step,
        generated_at=time.time(),
        gpu_hours={k: _h(v) for k, v in hours.items() if k != "unknown" or v},
    )

    # GPU-hours by state ------------------------------------------------------------------------------
    findings = []
    if total_s:
        findings.append(
            f"{_h(total_s):g} GPU-hours observed on {len(per_gpu)} GPUs; "
            f"{_pct(hours['busy'], total_s)} busy with real SM activity."
        )
        if hours["busy_low_sm"]:
            worst = sorted(by_gpu.items(), key=lambda kv: -kv[1]["busy_low_sm"])[:3]
            findings.append(
                f"{_h(hours['busy_low_sm']):g} GPU-hours ({_pct(hours['busy_low_sm'], total_s)}) had a kernel running "
                f"but SM activity under {th.low_sm_activity:.0%}; most on "
                + ", ".join(
                    f"{g['node']} GPU {g['gpu']} ({_h(g['busy_low_sm']):g} h)"
                    for _, g in worst
                    if g["busy_low_sm"]
                )
                + "."
            )
        if hours["idle_with_memory"]:
            findings.append(
                f"{_h(hours['idle_with_memory']):g} GPU-hours idle while holding memory "
                f"(>= {th.memory_held_bytes / GIB:g} GiB): allocated to a job that did not use them."
            )
        if no_sm_s:
            findings.append(
                f"{_h(no_sm_s):g} busy GPU-hours had no SM activity data (no GPM): counted as busy."
            )
    else:
        findings.append("No GPU utilization samples in this range.")
    report.sections.append(
        Section(
            "states",
            "GPU-hours by state",
            ["node", "gpu", "uuid", *(STATE_TITLES[s] for s in STATES)],
            [
                [g["node"], g["gpu"], u, *(_h(g[s]) for s in STATES)]
                for u, g in sorted(
                    by_gpu.items(), key=lambda kv: (kv[1]["node"] or "", int(kv[1]["gpu"] or 0))
                )
            ],
            findings,
            _sql_gpu_buckets(q),
            f"(gpufleet_gpu_utilization_ratio >= {th.idle_utilization}) and "
            f"(avg_over_time(gpufleet_gpu_sm_active_ratio[{step}s]) < {th.low_sm_activity})",
            f"{step}-second buckets; utilization >= {th.idle_utilization:.0%} is busy, SM activity < "
            f"{th.low_sm_activity:.0%} is low, memory >= {th.memory_held_bytes / GIB:g} GiB is held.",
        )
    )

    # Wasted GPU-hours by pod and namespace ---------------------------------------------------------------
    def wasted(p: dict[str, float]) -> float:
        return p["busy_low_sm"] + p["idle_with_memory"] + p["idle"]

    pods = sorted(by_pod.items(), key=lambda kv: -wasted(kv[1]))
    namespaces: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (ns, _), p in by_pod.items():
        for k, v in p.items():
            namespaces[ns][k] += v
    rows = [
        [
            "pod",
            f"{ns}/{pod}",
            _h(p["total"]),
            _h(wasted(p)),
            _h(p["busy_low_sm"]),
            _h(p["idle_with_memory"]),
            _h(p["idle"]),
        ]
        for (ns, pod), p in pods[:top]
        if wasted(p) > 0
    ]
    rows += [
        [
            "namespace",
            ns,
            _h(p["total"]),
            _h(wasted(p)),
            _h(p["busy_low_sm"]),
            _h(p["idle_with_memory"]),
            _h(p["idle"]),
        ]
        for ns, p in sorted(namespaces.items(), key=lambda kv: -wasted(kv[1]))[:top]
        if wasted(p) > 0
    ]
    findings = [
        f"{ns}/{pod} held GPUs for {_h(p['total']):g} h and wasted {_h(wasted(p)):g} h "
        f"({_pct(wasted(p), p['total'])})."
        for (ns, pod), p in pods[:3]
        if wasted(p) > 0
    ]
    if not by_pod:
        findings = [
            "No GPU series carried a pod label in this range (run the agent with Kubernetes enrichment)."
        ]
    elif not findings:
        findings = ["Every pod-held GPU-hour was busy."]
    report.sections.append(
        Section(
            "waste",
            "Top pods and namespaces by wasted GPU-hours",
            ["by", "name", "GPU-hours held", "wasted", "busy, low SM", "idle with memory", "idle"],
            rows,
            findings,
            _sql_gpu_buckets(q),
            f"sum by (namespace, pod) (gpufleet_gpu_utilization_ratio < {th.idle_utilization} or "
            f"gpufleet_gpu_sm_active_ratio < {th.low_sm_activity})",
            "Wasted: every hour a pod held a GPU that was not busy with real SM activity.",
        )
    )

    # Throttled hours by cause and node ---------------------------------------------------------------------
    tcells: dict[tuple[str, str], dict[int, tuple[str, float]]] = defaultdict(dict)
    for uuid, node, reason, bucket, value in throttle_rows:
        tcells[(uuid, reason)][int(bucket)] = (node, value)
    throttled: dict[tuple[str, str], float] = defaultdict(float)
    for (_uuid, reason), by_bucket in tcells.items():
        for b, secs in _durations(by_bucket, step, since, until, th.max_gap_s).items():
            node, value = by_bucket[b]
            throttled[(node, reason)] += value * secs
    trows = [
        [node, reason, _h(s)]
        for (node, reason), s in sorted(throttled.items(), key=lambda kv: -kv[1])
        if s > 0
    ]
    by_reason: dict[str, float] = defaultdict(float)
    for (_, reason), s in throttled.items():
        by_reason[reason] += s
    findings = [
        f"{_h(s):g} GPU-hours throttled by {reason}."
        for reason, s in sorted(by_reason.items(), key=lambda kv: -kv[1])
        if s > 0
    ] or ["No clock throttling in this range."]
    if trows:
        findings.append(f"Most throttled: {trows[0][0]} ({trows[0][1]}, {trows[0][2]:g} h).")
    report.sections.append(
        Section(
            "throttle",
            "Throttled hours by cause and node",
            ["node", "reason", "GPU-hours"],
            trows,
            findings,
            _sql_throttle(q),
            'sum by (node, reason) (avg_over_time(gpufleet_gpu_clock_event_active{reason=~"'
            + "|".join(THROTTLE_REASONS)
            + '"}[1h]))',
        )
    )

    # XID and ECC counts by node --------------------------------------------------------------------------------
    errors: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    xids_by_code: dict[tuple[str, str], float] = defaultdict(float)
    for node, _uuid, key, inc in xid_rows:
        if inc:
            errors[node]["xid"] += inc
            xids_by_code[(node, key)] += inc
    for node, _uuid, key, inc in ecc_rows:
        if inc:
            errors[node][f"ecc_{key}"] += inc
    erows = [
        [
            node,
            int(e["xid"]),
            ", ".join(f"{code}×{int(n)}" for (nd, code), n in sorted(xids_by_code.items()) if nd == node),
            int(e["ecc_corrected"]),
            int(e["ecc_uncorrected"]),
        ]
        for node, e in sorted(errors.items())
    ]
    findings = [
        f"{node}: {int(e['xid'])} XID events, {int(e['ecc_uncorrected'])} uncorrected and "
        f"{int(e['ecc_corrected'])} corrected ECC errors."
        for node, e in sorted(errors.items(), key=lambda kv: -(kv[1]["xid"] + kv[1]["ecc_uncorrected"]))[:5]
    ] or ["No XID events or ECC errors in this range."]
    report.sections.append(
        Section(
            "errors",
            "XID and ECC errors by node",
            ["node", "XID events", "XID codes", "ECC corrected", "ECC uncorrected"],
            erows,
            findings,
            xid_sql + ";\n-- ECC: the same with key = type, scope = 'volatile'",
            "sum by (node, xid) (increase(gpufleet_gpu_xid_errors_total[7d])); "
            'sum by (node, type) (increase(gpufleet_gpu_ecc_errors_total{scope="volatile"}[7d]))',
        )
    )

    # Energy --------------------------------------------------------------------------------------------------------
    counter_j: dict[str, tuple[str, float]] = {uuid: (node, inc or 0.0) for node, uuid, _, inc in energy_rows}
    node_energy: dict[str, float] = defaultdict(float)
    nodes_of = {u: g["node"] for u, g in by_gpu.items()}
    for uuid in set(counter_j) | set(power_j):
        if uuid in counter_j and counter_j[uuid][1] > 0:
            node_energy[counter_j[uuid][0]] += counter_j[uuid][1]
        else:  # no energy counter on this GPU: integrate its power draw
            node_energy[nodes_of.get(uuid) or counter_j.get(uuid, ("?",))[0]] += power_j.get(uuid, 0.0)
    total_j = sum(node_energy.values())
    report.sections.append(
        Section(
            "energy",
            "Energy used",
            ["node", "kWh"],
            [[node, round(j / 3.6e6, 3)] for node, j in sorted(node_energy.items())],
            [
                f"{total_j / 3.6e6:.2f} kWh used by the GPUs in this range."
                if total_j
                else "No energy or power samples."
            ],
            energy_sql,
            "sum by (node) (increase(gpufleet_gpu_energy_joules_total[7d])) / 3.6e6",
            "From the GPUs' energy counters; GPUs without one by integrating their power draw.",
        )
    )

    # Tokens per joule per model -----------------------------------------------------------------------------------
    tk: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for node, model, bucket, value in token_rows:
        tk[(node, model)][int(bucket)] = value
    tokens_nb: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for (node, model), rates in tk.items():
        for b, secs in _durations(rates, step, since, until, th.max_gap_s).items():
            tokens_nb[(node, b)][model] = rates[b] * secs
    model_tokens: dict[str, float] = defaultdict(float)
    model_j: dict[str, float] = defaultdict(float)
    for (node, b), per_model in tokens_nb.items():
        n_tokens = sum(per_model.values())
        for model, t in per_model.items():
            model_tokens[model] += t
            if n_tokens:  # the node's GPU energy in the bucket, shared by the models' token counts
                model_j[model] += node_j.get((node, b), 0.0) * t / n_tokens
    irows = [
        [
            m,
            round(model_tokens[m]),
            round(model_j[m] / 3.6e6, 4),
            round(model_tokens[m] / model_j[m], 3) if model_j[m] else None,
        ]
        for m in sorted(model_tokens)
    ]
    findings = [
        f"{m}: {r[3]:g} tokens per joule ({r[1]:,} tokens)."
        for m, r in zip(sorted(model_tokens), irows, strict=True)
        if r[3]
    ] or [f"No inference data ({GENERATION_TOKENS}) in this range."]
    report.sections.append(
        Section(
            "inference",
            "Generated tokens per joule by model",
            ["model", "tokens generated", "GPU kWh", "tokens per joule"],
            irows,
            findings,
            _sql_tokens(q),
            f"sum by (model) ({GENERATION_TOKENS}) / "
            "sum by (model) (sum by (node) (gpufleet_gpu_power_watts) * on (node) group_right "
            f"count by (node, model) ({GENERATION_TOKENS}))",
            "A node's GPU energy is shared between the models it served in proportion to their tokens.",
        )
    )
    return report


# ---- rendering ------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_markdown(r: Report) -> str:
    out = [
        f"# GPU fleet report: {_when(r.since)} to {_when(r.until)}",
        "",
        "| state | GPU-hours |",
        "| --- | ---: |",
    ]
    out += [f"| {STATE_TITLES[k]} | {v:g} |" for k, v in r.gpu_hours.items()]
    for s in r.sections:
        out += ["", f"## {s.title}", ""]
        out += [f"* {f}" for f in s.findings]
        if s.rows:
            out += ["", "| " + " | ".join(s.headers) + " |", "|" + " --- |" * len(s.headers)]
            out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in s.rows]
        if s.note:
            out += ["", f"_{s.note}_"]
        out += ["", f"Backed by PromQL: `{s.promql}`", "", "```sql", s.sql, "```"]
    return "\n".join(out) + "\n"


def render_html(r: Report) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' "
        "content='width=device-width,initial-scale=1'>",
        f"<title>GPU fleet report</title><style>{_CSS}</style></head><body>",
        f"<h1>GPU fleet report</h1><p>{e(_when(r.since))} to {e(_when(r.until))}</p>",
        "<table><tr><th>state</th><th>GPU-hours</th></tr>",
    ]
    parts += [f"<tr><td>{e(STATE_TITLES[k])}</td><td class=n>{v:g}</td></tr>" for k, v in r.gpu_hours.items()]
    parts.append("</table>")
    for s in r.sections:
        parts.append(f"<section id='{e(s.key)}'><h2>{e(s.title)}</h2><ul>")
        parts += [f"<li>{e(f)}</li>" for f in s.findings]
        parts.append("</ul>")
        if s.rows:
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in s.headers) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in row) + "</tr>" for row in s.rows]
            parts.append("</table>")
        if s.note:
            parts.append(f"<p class=note>{e(s.note)}</p>")
        parts.append(
            f"<details><summary>Backed by</summary><p>PromQL: <code>{e(s.promql)}</code></p>"
            f"<pre>{e(s.sql)}</pre></details></section>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


_CSS = (
    "body{font:14px/1.4 system-ui,sans-serif;max-width:60rem;margin:1rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem}"
    "td.n{text-align:right}pre{background:#f4f4f4;padding:.5rem;overflow:auto}.note{color:#555}"
)


def render(r: Report, fmt: str) -> str:
    if fmt == "markdown":
        return render_markdown(r)
    if fmt == "html":
        return render_html(r)
    raise ReportError(f"format {fmt!r} is not one of markdown, html")


def slack_blocks(r: Report, link: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The weekly digest as Slack Block Kit: (fallback text, blocks)."""
    head = f"GPU fleet report {_when(r.since)[:10]} to {_when(r.until)[:10]}"
    states = "  ".join(f"*{STATE_TITLES[k]}* {v:g} h" for k, v in r.gpu_hours.items())
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": head[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": ("GPU-hours by state: " + states)[:3000]}},
    ]
    for s in r.sections:
        body = f"*{s.title}*\n" + "\n".join(f"• {f}" for f in s.findings)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": body[:3000]}})
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"PromQL: `{s.promql}`"[:2000]}]}
        )
    if link:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"Full report with SQL: {link}"}]}
        )
    return head + ": " + states.replace("*", ""), blocks[:50]
