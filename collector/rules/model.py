"""Rules as the YAML under alerts/ describes them, loaded and validated with file and line in every error."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = ("threshold", "event")
OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
       "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
SEVERITIES = ("critical", "warning", "info")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class RuleError(ValueError):
    """One or more problems in rule files; ``problems`` lists each with file, line and rule name."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration (use 30s, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    metric: str
    severity: str
    matchers: dict[str, str] = field(default_factory=dict)  # label -> regex (fully anchored)
    op: str = ">"
    threshold: float = 0.0
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    send_resolved: bool = True
    source: str = ""  # file:line

    def matches(self, labels: dict[str, str]) -> bool:
        return all(re.fullmatch(rx, labels.get(k, "")) is not None for k, rx in self.matchers.items())


class _LineLoader(yaml.SafeLoader):
    """Records the line of every mapping, so errors can point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_RULE_KEYS = {"alert", "kind", "metric", "match", "op", "value", "for", "keep_firing_for", "severity", "labels",
              "annotations", "send_resolved", "__line__"}


def _rule_from(doc: dict, where: str, problems: list[str]) -> Rule | None:
    name = doc.get("alert")
    at = f"{where}:{doc.get('__line__', '?')}"
    label = f"{at}: rule {name!r}" if name else f"{at}: rule"
    before = len(problems)
    if not name or not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        problems.append(f"{label}: 'alert' must be a name of letters, digits and underscores")
    unknown = set(doc) - _RULE_KEYS
    if unknown:
        problems.append(f"{label}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS - {'__line__'})}")
    kind = doc.get("kind", "threshold")
    if kind not in KINDS:
        problems.append(f"{label}: kind {kind!r} is not one of {', '.join(KINDS)}")
    metric = doc.get("metric")
    if not isinstance(metric, str) or not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", metric or ""):
        problems.append(f"{label}: 'metric' must be a metric name, e.g. gpufleet_gpu_temperature_celsius")
    severity = doc.get("severity", "warning")
    if severity not in SEVERITIES:
        problems.append(f"{label}: severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    op = str(doc.get("op", ">"))
    if op not in OPS:
        problems.append(f"{label}: op {op!r} is not one of {' '.join(OPS)}")
    threshold = doc.get("value", 0)
    if kind == "threshold" and "value" not in doc:
        problems.append(f"{label}: a threshold rule needs 'value'")
    if not isinstance(threshold, (int, float)):
        problems.append(f"{label}: 'value' must be a number, not {threshold!r}")
        threshold = 0
    durations = {}
    for key in ("for", "keep_firing_for"):
        try:
            durations[key] = parse_duration(doc.get(key, 0))
        except ValueError as exc:
            problems.append(f"{label}: '{key}': {exc}")
    def mapping(key: str) -> dict:
        value = doc.get(key) or {}
        if not isinstance(value, dict):  # found by fuzzing: a list or scalar here crashed the loader
            problems.append(f"{label}: '{key}' must be a mapping of label names to values, not {value!r:.40}")
            return {}
        return {str(k): v for k, v in value.items() if k != "__line__"}

    matchers = {k: str(v) for k, v in mapping("match").items()}
    for k, rx in matchers.items():
        try:
            re.compile(rx)
        except re.error as exc:
            problems.append(f"{label}: match {k}: {rx!r} is not a regular expression ({exc})")
    annotations = {k: str(v) for k, v in mapping("annotations").items()}
    labels = {k: str(v) for k, v in mapping("labels").items()}
    if "summary" not in annotations:
        problems.append(f"{label}: annotations need a 'summary' (the one line the on-call engineer reads first)")
    if len(problems) > before:
        return None
    return Rule(name=name, kind=kind, metric=metric, severity=severity, matchers=matchers, op=op,
                threshold=float(threshold), for_s=durations["for"], keep_firing_for_s=durations["keep_firing_for"],
                labels=labels,
                annotations=annotations, send_resolved=bool(doc.get("send_resolved", kind != "event")), source=at)


def default_rules_path() -> Path:
    """The built-in rule pack (the ``alerts`` package's YAML files)."""
    import alerts

    return Path(alerts.__file__).resolve().parent


def load_rules(paths: list[Path]) -> list[Rule]:
    """Load every rule in the given files or folders (*.yaml, *.yml). Raises :class:`RuleError` listing all problems."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml"))
        elif p.exists():
            files.append(p)
        else:
            raise RuleError([f"{p}: no such rule file or folder"])
    problems: list[str] = []
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for f in files:
        try:
            doc = yaml.load(f.read_text(encoding="utf-8"), Loader=_LineLoader) or {}
        except yaml.YAMLError as exc:
            problems.append(f"{f}: not valid YAML: {exc}")
            continue
        except UnicodeDecodeError as exc:  # found by fuzzing: a binary file crashed the loader
            problems.append(f"{f}: not UTF-8 text (byte {exc.start}); rule files are UTF-8 YAML")
            continue
        groups = doc.get("groups") if isinstance(doc, dict) else None
        if not isinstance(groups, list):
            problems.append(f"{f}:1: expected a top-level 'groups:' list, each with 'name' and 'rules'")
            continue
        for group in groups:
            # found by fuzzing: a group or rule that is not a mapping crashed the loader
            if not isinstance(group, dict) or not isinstance(group.get("rules") or [], list):
                where = group.get("__line__", 1) if isinstance(group, dict) else 1
                problems.append(f"{f}:{where}: each group must be a mapping with 'name' and a 'rules' list")
                continue
            for r in group.get("rules") or []:
                if not isinstance(r, dict):
                    problems.append(f"{f}:{group.get('__line__', 1)}: each rule must be a mapping "
                                    f"(alert, metric, …), not {r!r:.40}")
                    continue
                rule = _rule_from(r, str(f), problems)
                if rule is None:
                    continue
                if rule.name in seen:
                    problems.append(f"{rule.source}: rule {rule.name!r} is defined twice (first at {seen[rule.name]})")
                    continue
                seen[rule.name] = rule.source
                rules.append(rule)
    if problems:
        raise RuleError(problems)
    return rules


_TEMPLATE = re.compile(r"\{\{\s*(\$labels\.([A-Za-z_][A-Za-z0-9_]*)|\$value)\s*\}\}")


def render(template: str, labels: dict[str, str], value: float | None) -> str:
    """Expand ``{{ $labels.NAME }}`` and ``{{ $value }}`` (the Prometheus template subset rules use)."""

    def sub(m: re.Match) -> str:
        if m.group(2):
            return labels.get(m.group(2), "")
        return "" if value is None else f"{value:g}"

    return _TEMPLATE.sub(sub, template)
