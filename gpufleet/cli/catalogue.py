"""The whole metric catalogue (agent and collector) and the check of what readers read against it.

The agent's part is built from its producers (``gpufleet.agent.catalogue``), the collector's own metrics
are declared next to them (``gpufleet.collector.app.OWN_METRICS``); only here, above both layers, are they
joined. ``gpufleet alerts check`` warns about rules reading series no producer writes; the contract test
holds the rule pack, dashboards, report and exported PrometheusRule to it.

``python -m gpufleet.cli.catalogue [docs/metrics.md]`` rewrites the generated sections of the metrics doc.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from gpufleet.agent import catalogue as agent_catalogue
from gpufleet.agent import metrics_doc
from gpufleet.agent.dcgm_names import LABELS, dcgm_names
from gpufleet.collector.app import OWN_METRICS
from gpufleet.collector.rules.model import Rule
from gpufleet.core.metricspec import MetricSpec

NAMING_MODES = ("gpufleet", "dcgm")
# Series Prometheus (and the collector's rule engine) make from rules, not from any producer.
RULE_SERIES = ("ALERTS", "ALERTS_FOR_STATE")
# Labels every alert has besides its series' own.
ALERT_LABELS = ("alertname", "severity", "alertstate")
# Labels a scrape or the collector may put on any series.
TARGET_LABELS = ("cluster", "node", "instance", "job", "__name__")

_TEMPLATE_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def sections() -> dict[str, tuple[MetricSpec, ...]]:
    return {**agent_catalogue.SECTIONS, "collector": OWN_METRICS}


def catalogue(mode: str = "gpufleet") -> dict[str, MetricSpec]:
    """Every series name a reader may query in the naming mode -> its entry. In dcgm mode a GPU series with
    a dcgm-exporter twin is known by the twin's name only; the rest keep their gpufleet names."""
    out: dict[str, MetricSpec] = {}
    for specs in sections().values():
        for m in specs:
            names = m.dcgm if mode == "dcgm" and m.dcgm and not m.dcgm_keeps_name else m.wire_names()
            if mode == "dcgm" and m.dcgm_keeps_name:
                names = (*m.dcgm, *names)
            for name in names:
                out[name] = m
    return out


@dataclass(frozen=True)
class Reference:
    """One read of a series by a rule, query or template: where it is, the name and the label names."""

    where: str  # file:line (and rule or panel)
    name: str
    labels: tuple[str, ...] = ()


def problems(
    refs: Iterable[Reference],
    known: dict[str, MetricSpec],
    *,
    produced: Iterable[str] = (),
    extra_labels: Iterable[str] = (),
) -> list[str]:
    """A line per read of a series no producer writes, or of a label that series does not carry."""
    made = set(produced) | set(RULE_SERIES)
    allowed = set(TARGET_LABELS) | set(extra_labels)
    out = []
    for r in refs:
        spec = known.get(r.name)
        if spec is None:
            if r.name not in made:
                out.append(f"{r.where}: reads metric {r.name}, which no gpufleet producer exports")
            continue
        for label in r.labels:
            if label not in spec.labels and label not in allowed and label != "le":
                out.append(f"{r.where}: reads label {label!r} of {r.name}, which does not carry it")
    return out


def rule_references(rules: Iterable[Rule]) -> list[Reference]:
    """What each rule reads: its metrics with their matchers, and the labels its annotations print."""
    out: list[Reference] = []
    for rule in rules:
        where = f"{rule.source}: rule {rule.name}"
        metrics = rule.metrics()
        out.append(Reference(where, rule.metric, tuple(rule.matchers)))
        out += [Reference(where, m) for m in metrics[1:]]
        printed = sorted({x for text in rule.annotations.values() for x in _TEMPLATE_LABEL.findall(text)})
        for label in printed:
            carrier = _carrier(metrics, label)
            if carrier is not None and label not in rule.labels and label not in ALERT_LABELS:
                out.append(Reference(f"{where} (annotation)", carrier, (label,)))
    return out


def _carrier(metrics: list[str], label: str) -> str | None:
    """The metric of the rule that carries the label; the first catalogued one when none does (to be
    reported); None when the rule reads only series of the site's own, whose labels nobody here knows."""
    known = catalogue()
    listed = [m for m in metrics if m in known]
    return next((m for m in listed if label in known[m].labels), listed[0] if listed else None)


def rule_catalogue() -> dict[str, MetricSpec]:
    """What a rule file may read: every series in gpufleet naming, and every dcgm-exporter name an agent in
    dcgm naming serves, with the labels it carries there (``Hostname``, ``UUID``, … beside ours)."""
    known = catalogue()
    twins = set(dcgm_names())
    for name, spec in catalogue("dcgm").items():
        if name in twins:
            theirs = tuple(LABELS.get(label, label) for label in spec.labels)
            extra = ("device", "pci_bus_id", "DCGM_FI_DRIVER_VERSION")
            known.setdefault(
                name, replace(spec, labels=tuple(dict.fromkeys((*spec.labels, *theirs, *extra))))
            )
    return known


def check_rules(rules: Iterable[Rule]) -> list[str]:
    """Warnings for `gpufleet alerts check`: reads of series or labels no agent (in either naming), inference
    reader, collector or rule writes; a misspelt metric gets the catalogued name it is closest to."""
    known = rule_catalogue()
    out = []
    for ref in rule_references(rules):
        close = [] if ref.name in known else difflib.get_close_matches(ref.name, list(known), n=1, cutoff=0.8)
        out += [f"{p}; did you mean {close[0]}?" if close else p for p in problems([ref], known)]
    return out


def render_doc(path: Path) -> None:
    metrics_doc.update(path, sections())


if __name__ == "__main__":
    render_doc(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/metrics.md"))
