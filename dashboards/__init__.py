"""gpufleet's Grafana dashboards as code (grafana-foundation-sdk), in two flavours each.

``build()`` returns every dashboard as Grafana JSON keyed by file name; ``gpufleet dashboards build``
writes them next to this file, where they ship as package data for file provisioning and import by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dashboards import efficiency, fleet, health, inference, node
from dashboards.model import DashboardDef
from dashboards.render import FLAVOURS, Flavour, dumps, render

DASHBOARDS: tuple[DashboardDef, ...] = (fleet.DASHBOARD, node.DASHBOARD, health.DASHBOARD, inference.DASHBOARD,
                                        efficiency.DASHBOARD)
HERE = Path(__file__).resolve().parent

__all__ = ["DASHBOARDS", "FLAVOURS", "Flavour", "build", "file_name", "write", "committed"]


def file_name(d: DashboardDef, flavour: Flavour) -> str:
    return f"{d.slug}.{flavour.name}.json"


def build() -> dict[str, dict[str, Any]]:
    """Every dashboard in every flavour: {file name: dashboard JSON}."""
    return {file_name(d, f): render(d, f) for d in DASHBOARDS for f in FLAVOURS}


def write(directory: Path = HERE) -> list[Path]:
    """Write the generated JSON files into ``directory``, removing generated files no longer produced."""
    directory.mkdir(parents=True, exist_ok=True)
    models = build()
    written = []
    for name, model in models.items():
        path = directory / name
        path.write_text(dumps(model))
        written.append(path)
    for stale in directory.glob("*.*.json"):
        if stale.name not in models and stale.name.split(".")[1] in {f.name for f in FLAVOURS}:
            stale.unlink()
    return written


def committed(directory: Path = HERE) -> dict[str, str]:
    """The JSON files as they are on disk (for comparing with what ``build`` generates)."""
    return {p.name: p.read_text() for p in sorted(directory.glob("*.*.json"))}
