"""Rules as the YAML under alerts/ describes them, loaded and validated with file and line in every error.

A rule file holds ``groups:`` of rules and, optionally, the pack-wide settings: ``route`` (grouping and
timing of notifications), ``inhibit_rules`` and ``xid_sets`` (named XID lists rules refer to with
``xid_set``). Later files override earlier ones for pack-wide settings, so a site adds one small file to
change the XIDs it pages for without editing the pack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gpufleet.collector.rules.kinds import KINDS, Condition, Escalation, RuleSpec, Threshold, YamlRule
from gpufleet.collector.rules.kinds.base import (
    EVENT_KEEP_FIRING_S,
    OPS,
    format_duration,
    metric_ok,
    parse_duration,
)
from gpufleet.collector.rules.kinds.base import LABEL as _LABEL
from gpufleet.collector.rules.templates import TemplateError
from gpufleet.collector.rules.templates import parse as parse_template
from gpufleet.collector.rules.templates import render as render_template
from gpufleet.core.labels import label_regex, regex_fullmatch
from gpufleet.core.yamlfile import load_yaml

SEVERITIES = ("critical", "warning", "info")
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
__all__ = [
    "KINDS",
    "OPS",
    "Condition",
    "Escalation",
    "InhibitRule",
    "Route",
    "Rule",
    "RuleError",
    "RulePack",
    "format_duration",
    "load_pack",
    "load_rules",
    "parse_duration",
    "render",
]


class RuleError(ValueError):
    """One or more problems in rule files; ``problems`` lists each with file, line and rule name."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Rule:
    """What every rule has (name, metric, severity, matchers, timing, labels, annotations) and, in ``spec``,
    what its kind adds (:mod:`gpufleet.collector.rules.kinds`)."""

    name: str
    metric: str
    severity: str
    spec: RuleSpec = field(default_factory=Threshold)
    matchers: dict[str, str] = field(default_factory=dict)  # label -> regex (fully anchored)
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    send_resolved: bool = True
    source: str = ""  # file:line

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def keep_firing_s(self) -> float:
        """How long a firing alert stays firing after its condition stops holding (events: five minutes)."""
        return self.keep_firing_for_s or (EVENT_KEEP_FIRING_S if self.spec.instant else 0.0)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(regex_fullmatch(rx, labels.get(k, "")) for k, rx in self.matchers.items())

    def metrics(self) -> list[str]:
        """Every metric the rule reads."""
        return list(dict.fromkeys([self.metric, *self.spec.metrics()]))


@dataclass(frozen=True)
class Route:
    group_by: tuple[str, ...] = ("cluster", "node", "uuid")
    group_wait_s: float = 0.0
    group_interval_s: float = 60.0
    repeat_interval_s: float = 4 * 3600.0


@dataclass(frozen=True)
class InhibitRule:
    source: dict[str, str]  # label -> regex the firing source alert matches
    target: dict[str, str]  # label -> regex the muted alert matches
    equal: tuple[str, ...]  # labels that must be equal (and present) on both


@dataclass
class RulePack:
    rules: list[Rule]
    route: Route = field(default_factory=Route)
    inhibit_rules: list[InhibitRule] = field(default_factory=list)
    xid_sets: dict[str, list[int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


class _LineLoader(yaml.SafeLoader):
    """Records the line of every mapping and of each of its keys, so errors can point at them."""


class _Mapping(dict):
    """A mapping read from YAML, with the line of each key (an annotation's line, not just its rule's)."""

    key_lines: dict[str, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = _Mapping(loader.construct_mapping(node, deep=True))
    mapping.key_lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


def _key_line(doc: Any, key: str, default: Any) -> Any:
    return doc.key_lines.get(key, default) if isinstance(doc, _Mapping) else default


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_COMMON = {
    "alert",
    "kind",
    "metric",
    "match",
    "for",
    "keep_firing_for",
    "severity",
    "labels",
    "annotations",
    "send_resolved",
    "__line__",
}


def _clean(d: Any) -> dict:
    return {k: v for k, v in (d or {}).items() if k != "__line__"} if isinstance(d, dict) else {}


_metric_ok = metric_ok


def _rule_from(doc: dict, where: str, xid_sets: dict[str, list[int]], problems: list[str]) -> Rule | None:
    if not isinstance(doc, dict):
        problems.append(f"{where}: a rule must be a mapping with 'alert', 'kind', 'metric', …")
        return None
    name = doc.get("alert")
    at = f"{where}:{doc.get('__line__', '?')}"
    label = f"{at}: rule {name!r}" if name else f"{at}: rule"
    before = len(problems)

    def bad(msg: str) -> None:
        problems.append(f"{label}: {msg}")

    if not name or not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        bad("'alert' must be a name of letters, digits and underscores")
    kind = doc.get("kind", "threshold")
    if not isinstance(kind, str) or kind not in KINDS:
        bad(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        return None
    spec_type = KINDS[kind]
    allowed = _COMMON | spec_type.keys
    unknown = set(doc) - allowed
    if unknown:
        bad(f"unknown key(s) {sorted(unknown)} for a {kind} rule; allowed: {sorted(allowed - {'__line__'})}")
    metric = doc.get("metric")
    if not _metric_ok(metric):
        bad("'metric' must be a metric name, e.g. gpufleet_gpu_temperature_celsius")
    severity = doc.get("severity", "warning")
    if severity not in SEVERITIES:
        bad(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")

    y = YamlRule(doc, bad)
    matchers = {k: str(v) for k, v in _clean(doc.get("match")).items()}
    if "xid_set" in doc:
        xs = doc["xid_set"]
        if xs not in xid_sets:
            bad(
                f"xid_set {xs!r} is not defined; defined sets: {sorted(xid_sets) or 'none'} (top-level 'xid_sets:')"
            )
        else:
            matchers["xid"] = "|".join(str(x) for x in xid_sets[xs])
    for k, rx in matchers.items():
        try:
            label_regex(rx)
        except ValueError as exc:
            bad(f"match {k}: {exc}")
    annotations = {k: str(v) for k, v in _clean(doc.get("annotations")).items()}
    if "summary" not in annotations:
        bad("annotations need a 'summary' (the one line the on-call engineer reads first)")
    for k, text in annotations.items():
        try:
            parse_template(text)
        except TemplateError as exc:
            line = _key_line(doc.get("annotations"), k, doc.get("__line__", "?"))
            problems.append(f"{where}:{line}: rule {name!r}: annotation {k}: {exc}")
    labels = {k: str(v) for k, v in _clean(doc.get("labels")).items()}
    for k, text in labels.items():
        if "{{" in text:
            line = _key_line(doc.get("labels"), k, doc.get("__line__", "?"))
            problems.append(
                f"{where}:{line}: rule {name!r}: label {k}: {text!r} is a template, but labels are not "
                "rendered (they name the alert: silences and grouping match them); move it to an annotation"
            )
    spec = spec_type.parse(y)
    if len(problems) > before:
        return None
    for_s, keep_firing_for_s = y.dur("for", 0.0), y.dur("keep_firing_for", 0.0)
    if len(problems) > before:
        return None
    return Rule(
        name=str(name),
        metric=str(metric),
        severity=severity,
        spec=spec,
        matchers=matchers,
        for_s=for_s,
        keep_firing_for_s=keep_firing_for_s,
        labels=labels,
        annotations=annotations,
        send_resolved=bool(doc.get("send_resolved", not spec.instant)),
        source=at,
    )


def _route_from(doc: Any, where: str, problems: list[str]) -> Route | None:
    d = _clean(doc)
    try:
        gb = d.get("group_by", list(Route.group_by))
        if not isinstance(gb, list) or not all(isinstance(x, str) and _LABEL.fullmatch(x) for x in gb):
            raise ValueError("group_by must be a list of label names")
        return Route(
            tuple(gb),
            parse_duration(d.get("group_wait", 0)),
            parse_duration(d.get("group_interval", "1m")),
            parse_duration(d.get("repeat_interval", "4h")),
        )
    except ValueError as exc:
        problems.append(f"{where}:{_line(doc)}: route: {exc}")
        return None


def _line(doc: Any) -> Any:
    return doc.get("__line__", "?") if isinstance(doc, dict) else "?"


def _inhibit_from(doc: Any, where: str, problems: list[str]) -> InhibitRule | None:
    d = _clean(doc)
    equal = d.get("equal", [])
    if not isinstance(equal, list) or not equal:
        problems.append(
            f"{where}:{_line(doc)}: inhibit rule needs 'equal': labels the source and target share, "
            "e.g. [uuid]"
        )
        return None
    src, tgt = ({k: str(v) for k, v in _clean(d.get(key)).items()} for key in ("source", "target"))
    for k, rx in [*src.items(), *tgt.items()]:
        try:
            label_regex(rx)
        except ValueError as exc:
            problems.append(f"{where}:{_line(doc)}: inhibit rule: {k}: {exc}")
            return None
    if not src:
        problems.append(f"{where}:{_line(doc)}: inhibit rule needs 'source' matchers")
        return None
    return InhibitRule(src, tgt, tuple(str(x) for x in equal))


def default_rules_path() -> Path:
    """The built-in rule pack (the ``alerts`` package's YAML files)."""
    from gpufleet import alerts

    return Path(alerts.__file__).resolve().parent


def _files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            try:
                found = sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml"))
            except OSError as exc:
                raise RuleError([f"cannot list the rule folder {p}: {exc.strerror or exc}"]) from None
            if not found:
                raise RuleError([f"{p}: no rule files (*.yaml, *.yml) in this folder"])
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise RuleError([f"{p}: no such rule file or folder"])
    return files


def load_pack(paths: list[Path]) -> RulePack:
    """Load every rule and pack-wide setting in the given files or folders (*.yaml, *.yml).

    Raises :class:`RuleError` listing every problem, each with file, line and rule name."""
    files = _files(paths)
    problems: list[str] = []
    docs: list[tuple[Path, dict]] = []
    for f in files:
        try:
            doc = load_yaml(f, _LineLoader) or {}
        except ValueError as exc:  # missing, unreadable, not UTF-8, not YAML: one line with file and line
            problems.append(str(exc))
            continue
        if not isinstance(doc, dict):
            problems.append(
                f"{f}:1: expected a mapping with 'groups:' (and optionally route, inhibit_rules, xid_sets)"
            )
            continue
        unknown = set(doc) - {"groups", "route", "inhibit_rules", "xid_sets", "__line__"}
        if unknown:
            problems.append(
                f"{f}:1: unknown top-level key(s) {sorted(unknown)}; "
                "allowed: groups, route, inhibit_rules, xid_sets"
            )
        if "groups" not in doc and not ({"route", "inhibit_rules", "xid_sets"} & set(doc)):
            problems.append(f"{f}:1: expected a top-level 'groups:' list, each with 'name' and 'rules'")
            continue
        docs.append((f, doc))
    pack = RulePack(rules=[], files=files)
    for f, doc in docs:  # settings first: rules refer to xid sets defined in any file
        if "xid_sets" in doc:
            for k, v in _clean(doc["xid_sets"]).items():
                if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
                    problems.append(
                        f"{f}:{_line(doc['xid_sets'])}: xid_sets.{k} must be a list of XID numbers"
                    )
                else:
                    pack.xid_sets[k] = v
        if "route" in doc:
            route = _route_from(doc["route"], str(f), problems)
            if route:
                pack.route = route
        if "inhibit_rules" in doc:
            rules = [_inhibit_from(r, str(f), problems) for r in doc["inhibit_rules"] or []]
            pack.inhibit_rules = [r for r in rules if r]
    seen: dict[str, str] = {}
    for f, doc in docs:
        groups = doc.get("groups", [])
        if not isinstance(groups, list):
            problems.append(f"{f}:1: 'groups' must be a list, each with 'name' and 'rules'")
            continue
        for group in groups:
            if not isinstance(group, dict) or not isinstance(group.get("rules", []), list):
                problems.append(f"{f}:{_line(group)}: a group needs 'name' and a list of 'rules'")
                continue
            for r in group.get("rules") or []:
                if not isinstance(
                    r, dict
                ):  # found by fuzzing: a rule that is not a mapping crashed the loader
                    problems.append(
                        f"{f}:{_line(group)}: each rule must be a mapping (alert, metric, …), not {r!r:.40}"
                    )
                    continue
                name, at = r.get("alert"), f"{f}:{_line(r)}"
                if isinstance(name, str) and name in seen:  # whatever else is wrong with either of them
                    problems.append(
                        f"{at}: rule {name!r} is defined twice (first at {seen[name]}); rename one: alert "
                        "names are unique across all the rule files loaded together"
                    )
                elif isinstance(name, str):
                    seen[name] = at
                rule = _rule_from(r, str(f), pack.xid_sets, problems)
                if rule is not None and seen.get(rule.name) == at:
                    pack.rules.append(rule)
    if problems:
        raise RuleError(problems)
    return pack


def load_rules(paths: list[Path]) -> list[Rule]:
    """The rules of :func:`load_pack`."""
    return load_pack(paths).rules


# A runbook_url without a scheme names a runbook relative to a base URL (the collector's /runbooks, or a wiki),
# so one rule pack gives working links wherever it runs; an absolute URL is used as it is.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def check_runbook_base_url(base_url: str) -> str:
    """``base_url`` without a trailing slash; ValueError unless it is an absolute http(s) URL."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"runbook base URL {base_url!r} is not an http(s) URL; give one like "
            "https://gpufleet.example.com/runbooks or your wiki's https://wiki.example.com/gpu "
            "(links become BASE/NAME)"
        )
    return base_url.rstrip("/")


def runbook_url(value: str, base_url: str) -> str:
    """A rule's runbook_url annotation as a link: relative names go under ``base_url``."""
    if _SCHEME.match(value):
        return value
    return f"{base_url.rstrip('/')}/{value.lstrip('/')}"


def with_runbook_base(pack: RulePack, base_url: str) -> RulePack:
    """The pack with every relative runbook_url annotation resolved against ``base_url``."""
    base = check_runbook_base_url(base_url)
    rules = [
        replace(
            r, annotations={**r.annotations, "runbook_url": runbook_url(r.annotations["runbook_url"], base)}
        )
        if "runbook_url" in r.annotations
        else r
        for r in pack.rules
    ]
    return replace(pack, rules=rules)


def render(template: str, labels: dict[str, str], value: float | None) -> str:
    """An annotation rendered for one alert (:mod:`gpufleet.collector.rules.templates`)."""
    return render_template(template, labels, value)
