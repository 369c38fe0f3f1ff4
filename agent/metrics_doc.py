"""Writes the field-table sections of docs/metrics.md from the table itself: ``python -m gpufleet.agent.metrics_doc``."""

from __future__ import annotations

import sys
from pathlib import Path

from gpufleet.agent.dcgm_names import CLOCK_REASONS_NAME, MAPPING, XID_NAME
from gpufleet.agent.fields import FIELDS, GPM_FIELDS, MIG_FIELDS, mig_name

BEGIN, END = "<!-- field table: begin (python -m gpufleet.agent.metrics_doc) -->", "<!-- field table: end -->"


def _read(f) -> str:
    items = f.read.items() if isinstance(f.read, dict) else [((), f.read)]
    parts = [(f"{','.join(k)}: " if k else "") + src.describe() for k, src in items]
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
    for f in FIELDS:
        lines.append(
            f"| `{f.name}` | {f.kind} | {f.unit or '—'} | {', '.join(f.labels) or '—'} | {f.help} | "
            f"{_read(f)} | {'slow (background)' if f.slow else 'every sample'} | {_dcgm(f.name)} |"
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


def update(path: Path) -> None:
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + render() + text[end:])


if __name__ == "__main__":
    update(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/metrics.md"))
