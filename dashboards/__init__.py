"""gpufleet's Grafana dashboards as code (grafana-foundation-sdk), in three flavours each: PostgreSQL,
Prometheus, and Prometheus over agents in dcgm naming mode.

``build()`` renders every dashboard as Grafana JSON keyed by file name; ``gpufleet dashboards build``
writes them next to this file, where they ship as package data for file provisioning, import by hand and
the collector's push. Only building needs the SDK (a dev dependency): ``shipped()`` reads the committed
JSON, which is all an installed collector uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpufleet.dashboards import efficiency, fleet, health, inference, node
from gpufleet.dashboards.model import ALL_FLAVOURS, FLAVOURS, DashboardDef, Flavour

DASHBOARDS: tuple[DashboardDef, ...] = (
    fleet.DASHBOARD,
    node.DASHBOARD,
    health.DASHBOARD,
    inference.DASHBOARD,
    efficiency.DASHBOARD,
)
HERE = Path(__file__).resolve().parent

__all__ = [
    "ALL_FLAVOURS",
    "DASHBOARDS",
    "FLAVOURS",
    "Flavour",
    "build",
    "file_name",
    "write",
    "committed",
    "shipped",
]


def file_name(d: DashboardDef, flavour: Flavour) -> str:
    return f"{d.slug}.{flavour.name}.json"


def build() -> dict[str, dict[str, Any]]:
    """Every dashboard in every flavour: {file name: dashboard JSON}."""
    from gpufleet.dashboards.render import render

    return {file_name(d, f): render(d, f) for d in DASHBOARDS for f in ALL_FLAVOURS}


def write(directory: Path = HERE) -> list[Path]:
    """Write the generated JSON files into ``directory``, removing generated files no longer produced."""
    from gpufleet.dashboards.render import dumps

    directory.mkdir(parents=True, exist_ok=True)
    models = build()
    written = []
    for name, model in models.items():
        path = directory / name
        path.write_text(dumps(model))
        written.append(path)
    for stale in directory.glob("*.*.json"):
        if stale.name not in models and stale.name.split(".")[1] in {f.name for f in ALL_FLAVOURS}:
            stale.unlink()
    return written


def committed(directory: Path = HERE) -> dict[str, str]:
    """The JSON files as they are on disk (for comparing with what ``build`` generates)."""
    return {p.name: p.read_text() for p in sorted(directory.glob("*.*.json"))}


def shipped(flavours: Iterable[str] | None = None, directory: Path = HERE) -> dict[str, dict[str, Any]]:
    """The dashboards as shipped, {file name: dashboard JSON}, of the given flavours (default: the ones a
    collector pushes, postgres and prometheus). The test suite checks that these files are what ``build()``
    generates."""
    wanted = {f.name for f in FLAVOURS} if flavours is None else set(flavours)
    out = {}
    for d in DASHBOARDS:
        for f in ALL_FLAVOURS:
            if f.name in wanted:
                name = file_name(d, f)
                out[name] = json.loads((directory / name).read_text())
    return out
