"""Writes the generated sections of docs/metrics.md: the field table, and the catalogue of every series.

Run ``python -m gpufleet.cli.catalogue``: the catalogue's collector part lives in the collector, which the
agent does not import, so the CLI joins the two and calls :func:`update`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpufleet.agent.dcgm_names import CLOCK_REASONS_NAME, MAPPING, XID_NAME
from gpufleet.agent.fields import COSTLY_EVERY, FIELDS, GPM_FIELDS, MIG_FIELDS, Field, Source, mig_name
from gpufleet.core.metricspec import MetricSpec

BEGIN, END = "<!-- field table: begin (python -m gpufleet.cli.catalogue) -->", "<!-- field table: end -->"
CATALOGUE_BEGIN = "<!-- catalogue: begin (python -m gpufleet.cli.catalogue) -->"
CATALOGUE_END = "<!-- catalogue: end -->"


def _read(f) -> str:
    items: list[tuple[tuple[str, ...], Source]] = (
        list(f.read.items()) if isinstance(f.read, dict) else [((), f.read)]
    )
    links = len({k[-1] for k, _ in items}) if f.per_link else 0
    if links:  # one link shows them all: the others read the same with their own link number
        items = [(k, src) for k, src in items if k[-1] == "0"]
    parts = [(f"{','.join(k)}: " if k else "") + src.describe() for k, src in items]
    if links:
        parts.append(f"links 1–{links - 1} alike")
    scale = f" x {f.scale:g}" if f.scale != 1 else ""
    return "<br>".join(parts) + scale


def _dcgm(name: str) -> str:
    twin = MAPPING.get(name)
    if twin is None:
        return {
            "gpufleet_gpu_clock_event_active": f"`{CLOCK_REASONS_NAME}` (bitmask)",
            "gpufleet_gpu_xid_errors_total": f"`{XID_NAME}` (last XID only)",
        }.get(name, "—")
    scale = f" x {twin.scale:g}" if twin.scale != 1 else ""
    if isinstance(twin.dcgm, dict):
        return "<br>".join(f"{','.join(k)}: `{v}`" for k, v in twin.dcgm.items()) + f" ({twin.kind}{scale})"
    return f"`{twin.dcgm}` ({twin.kind}{scale})"


def render() -> str:
    lines = [
        BEGIN,
        "",
        "| metric | type | unit | labels | help | NVML read | read | dcgm-exporter twin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def _cadence(f: Field) -> str:
        if f.costly:
            return f"slow (background), every {COSTLY_EVERY}th refresh"
        return "slow (background)" if f.slow else "every sample"

    for f in FIELDS:
        lines.append(
            f"| `{f.name}` | {f.kind} | {f.unit or '—'} | {', '.join(f.labels) or '—'} | {f.help} | "
            f"{_read(f)} | {_cadence(f)} | {_dcgm(f.name)} |"
        )
    for g in GPM_FIELDS:
        lines.append(
            f"| `{g.name}` | gauge | {g.unit} | — | {g.help} | GPM metric {g.metric_id} x {g.scale:g} | "
            f"every sample | {_dcgm(g.name)} |"
        )
    lines += ["", "MIG instances (labels `gpu_instance`, `compute_instance`, `mig_profile`, `mig_uuid`):", ""]
    for name in [mig_name(f.name) for f in MIG_FIELDS] + [mig_name(g.name) for g in GPM_FIELDS]:
        lines.append(f"* `{name}` — dcgm: {_dcgm(name)}")
    lines += ["", END]
    return "\n".join(lines)


def render_catalogue(sections: Mapping[str, tuple[MetricSpec, ...]]) -> str:
    """Every series by producer: what rules, dashboards and reports may read (the contract test checks)."""
    lines = [CATALOGUE_BEGIN, ""]
    for title, specs in sections.items():
        lines += [
            f"### {title}",
            "",
            "| metric | type | unit | labels | when | dcgm mode name | help |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m in specs:
            twins = "<br>".join(f"`{d}`" for d in m.dcgm) or "(same)"
            lines.append(
                f"| `{m.name}` | {m.kind} | {m.unit or '—'} | {', '.join(m.labels) or '—'} | {m.when} | "
                f"{twins} | {m.help} |"
            )
        lines.append("")
    lines.append(CATALOGUE_END)
    return "\n".join(lines)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text:
        return text.rstrip("\n") + "\n\n## Every series, by producer\n\n" + body + "\n"
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + body + text[stop:]


def update(path: Path, sections: Mapping[str, tuple[MetricSpec, ...]]) -> None:
    text = path.read_text()
    text = _replace(text, BEGIN, END, render())
    path.write_text(_replace(text, CATALOGUE_BEGIN, CATALOGUE_END, render_catalogue(sections)))
