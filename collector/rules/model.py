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

from gpufleet.durations import parse_duration as _parse_duration
from gpufleet.yamlfile import load_yaml

KINDS = ("threshold", "event", "stale", "anomaly", "peer", "trend")
OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
       "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
SEVERITIES = ("critical", "warning", "info")
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class RuleError(ValueError):
    """One or more problems in rule files; ``problems`` lists each with file, line and rule name."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> float:
    return _parse_duration(value, unit_required=True)


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


@dataclass(frozen=True)
class Condition:
    """A second series of the same GPU that must also hold (``and:``), joined on the rule's ``on`` labels."""

    metric: str
    op: str
    value: float
    matchers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Escalation:
    """Raise an event rule's severity when one GPU repeats it across ``min`` distinct ``across`` values."""

    across: str
    min: int
    within_s: float
    severity: str


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
    # threshold
    rate_s: float = 0.0  # compare the per-second increase over this window instead of the value
    compare_metric: str | None = None  # threshold taken from this series of the same GPU (+ offset)
    offset: float = 0.0
    conditions: tuple[Condition, ...] = ()
    on: tuple[str, ...] = ("node", "uuid")
    # stale
    after_s: float = 60.0
    by: tuple[str, ...] = ()
    inventory: bool = False
    # anomaly
    method: str = "ewma"
    z: float = 4.0
    z_clear: float = 2.0
    alpha: float = 0.05
    window: int = 60
    min_samples: int = 30
    direction: str = "up"
    min_deviation: float = 0.0
    # peer
    below: float = 0.5
    min_peers: int = 3
    min_median: float = 0.0
    # trend
    limit_metric: str | None = None
    window_s: float = 1800.0
    horizon_s: float = 3600.0
    # event
    escalate: Escalation | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        return all(re.fullmatch(rx, labels.get(k, "")) is not None for k, rx in self.matchers.items())

    def metrics(self) -> list[str]:
        """Every metric the rule reads."""
        names = [self.metric] + [c.metric for c in self.conditions]
        names += [m for m in (self.compare_metric, self.limit_metric) if m]
        return list(dict.fromkeys(names))


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
    """Records the line of every mapping, so errors can point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_COMMON = {"alert", "kind", "metric", "match", "for", "keep_firing_for", "severity", "labels", "annotations",
           "send_resolved", "__line__"}
_KIND_KEYS = {
    "threshold": {"op", "value", "rate", "compare_to", "offset", "and", "on", "xid_set"},
    "event": {"xid_set", "escalate"},
    "stale": {"after", "by", "inventory"},
    "anomaly": {"method", "z", "z_clear", "alpha", "window", "min_samples", "direction", "min_deviation", "rate"},
    "peer": {"by", "below", "min_peers", "min_median"},
    "trend": {"limit_metric", "window", "horizon", "on"},
}


def _clean(d: Any) -> dict:
    return {k: v for k, v in (d or {}).items() if k != "__line__"} if isinstance(d, dict) else {}


def _metric_ok(name: Any) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


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
    if kind not in KINDS:
        bad(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        return None
    allowed = _COMMON | _KIND_KEYS[kind]
    unknown = set(doc) - allowed
    if unknown:
        bad(f"unknown key(s) {sorted(unknown)} for a {kind} rule; allowed: {sorted(allowed - {'__line__'})}")
    metric = doc.get("metric")
    if not _metric_ok(metric):
        bad("'metric' must be a metric name, e.g. gpufleet_gpu_temperature_celsius")
    severity = doc.get("severity", "warning")
    if severity not in SEVERITIES:
        bad(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")

    def num(key: str, default: float, *, lo: float | None = None, hi: float | None = None) -> float:
        v = doc.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad(f"'{key}' must be a number, not {v!r}")
            return default
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bad(f"'{key}' is {v}; it must lie in [{lo}, {hi}]")
        return float(v)

    def dur(key: str, default: float) -> float:
        try:
            return parse_duration(doc.get(key, default))
        except ValueError as exc:
            bad(f"'{key}': {exc}")
            return default

    def labels_list(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = doc.get(key, list(default))
        if not isinstance(v, list) or not all(isinstance(x, str) and _LABEL.fullmatch(x) for x in v):
            bad(f"'{key}' must be a list of label names, e.g. [cluster, node]")
            return default
        return tuple(v)

    op = str(doc.get("op", ">"))
    if op not in OPS:
        bad(f"op {op!r} is not one of {' '.join(OPS)}")
    matchers = {k: str(v) for k, v in _clean(doc.get("match")).items()}
    if "xid_set" in doc:
        xs = doc["xid_set"]
        if xs not in xid_sets:
            bad(f"xid_set {xs!r} is not defined; defined sets: {sorted(xid_sets) or 'none'} (top-level 'xid_sets:')")
        else:
            matchers["xid"] = "|".join(str(x) for x in xid_sets[xs])
    for k, rx in matchers.items():
        try:
            re.compile(rx)
        except re.error as exc:
            bad(f"match {k}: {rx!r} is not a regular expression ({exc})")
    annotations = {k: str(v) for k, v in _clean(doc.get("annotations")).items()}
    if "summary" not in annotations:
        bad("annotations need a 'summary' (the one line the on-call engineer reads first)")
    kw: dict[str, Any] = {}
    if kind == "threshold":
        if "value" not in doc and "compare_to" not in doc:
            bad("a threshold rule needs 'value' (or 'compare_to' with an 'offset')")
        kw["threshold"] = num("value", 0.0)
        kw["rate_s"] = dur("rate", 0.0)
        kw["offset"] = num("offset", 0.0)
        if "compare_to" in doc:
            if not _metric_ok(doc["compare_to"]):
                bad("'compare_to' must be a metric name (the GPU's own threshold series)")
            kw["compare_metric"] = doc["compare_to"]
        conds = []
        for c in doc.get("and") or []:
            c = _clean(c) if isinstance(c, dict) else {}
            if not _metric_ok(c.get("metric")) or str(c.get("op", "")) not in OPS or \
                    isinstance(c.get("value"), bool) or not isinstance(c.get("value"), (int, float)):
                bad("each 'and' condition needs 'metric', 'op' and a numeric 'value'")
                continue
            conds.append(Condition(c["metric"], str(c["op"]), float(c["value"]),
                                   {k: str(v) for k, v in _clean(c.get("match")).items()}))
        kw["conditions"] = tuple(conds)
        kw["on"] = labels_list("on", ("node", "uuid"))
    elif kind == "stale":
        kw["after_s"] = dur("after", 60.0)
        kw["by"] = labels_list("by", ("cluster", "node", "uuid"))
        kw["inventory"] = bool(doc.get("inventory", False))
        if kw["after_s"] <= 0:
            bad("'after' must be longer than 0s")
    elif kind == "anomaly":
        kw["method"] = doc.get("method", "ewma")
        if kw["method"] not in ("ewma", "mad"):
            bad(f"method {kw['method']!r} is not one of ewma, mad")
        kw["z"] = num("z", 4.0, lo=0.5)
        kw["z_clear"] = num("z_clear", min(2.0, kw["z"]), lo=0.0)
        if kw["z_clear"] > kw["z"]:
            bad("'z_clear' must not be above 'z' (the hysteresis band clears below where it fires)")
        kw["alpha"] = num("alpha", 0.05, lo=0.0001, hi=1.0)
        kw["window"] = int(num("window", 60, lo=5, hi=10_000))
        kw["min_samples"] = int(num("min_samples", 30, lo=2))
        kw["direction"] = doc.get("direction", "up")
        if kw["direction"] not in ("up", "down", "both"):
            bad(f"direction {kw['direction']!r} is not one of up, down, both")
        kw["min_deviation"] = num("min_deviation", 0.0, lo=0.0)
        kw["rate_s"] = dur("rate", 0.0)
    elif kind == "peer":
        kw["by"] = labels_list("by", ())
        if not kw["by"]:
            bad("a peer rule needs 'by': the labels that make GPUs peers, e.g. [cluster, job]")
        kw["below"] = num("below", 0.5, lo=0.0, hi=1.0)
        kw["min_peers"] = int(num("min_peers", 3, lo=2))
        kw["min_median"] = num("min_median", 0.0)
    elif kind == "trend":
        lm = doc.get("limit_metric")
        if not _metric_ok(lm):
            bad("a trend rule needs 'limit_metric': the series it must not reach, e.g. gpufleet_gpu_memory_total_bytes")
        kw["limit_metric"] = lm
        kw["window_s"] = dur("window", 1800.0)
        kw["horizon_s"] = dur("horizon", 3600.0)
        kw["on"] = labels_list("on", ("node", "uuid"))
    elif kind == "event" and "escalate" in doc:
        e = _clean(doc["escalate"])
        try:
            esc = Escalation(str(e["across"]), int(e.get("min", 2)), parse_duration(e.get("within", "24h")),
                             str(e.get("severity", "warning")))
            if esc.severity not in SEVERITIES or esc.min < 2:
                raise ValueError(f"severity must be one of {SEVERITIES} and min at least 2")
            kw["escalate"] = esc
        except (KeyError, ValueError, TypeError) as exc:
            bad(f"'escalate' needs across (a label), min (>= 2), within (a duration), severity: {exc}")
    if len(problems) > before:
        return None
    return Rule(name=name, kind=kind, metric=metric, severity=severity, matchers=matchers, op=op,
                for_s=dur("for", 0.0), keep_firing_for_s=dur("keep_firing_for", 0.0),
                labels={k: str(v) for k, v in _clean(doc.get("labels")).items()},
                annotations=annotations, send_resolved=bool(doc.get("send_resolved", kind != "event")),
                source=at, **kw)


def _route_from(doc: Any, where: str, problems: list[str]) -> Route | None:
    d = _clean(doc)
    try:
        gb = d.get("group_by", list(Route.group_by))
        if not isinstance(gb, list) or not all(isinstance(x, str) and _LABEL.fullmatch(x) for x in gb):
            raise ValueError("group_by must be a list of label names")
        return Route(tuple(gb), parse_duration(d.get("group_wait", 0)),
                     parse_duration(d.get("group_interval", "1m")), parse_duration(d.get("repeat_interval", "4h")))
    except ValueError as exc:
        problems.append(f"{where}:{_line(doc)}: route: {exc}")
        return None


def _line(doc: Any) -> Any:
    return doc.get("__line__", "?") if isinstance(doc, dict) else "?"


def _inhibit_from(doc: Any, where: str, problems: list[str]) -> InhibitRule | None:
    d = _clean(doc)
    equal = d.get("equal", [])
    if not isinstance(equal, list) or not equal:
        problems.append(f"{where}:{_line(doc)}: inhibit rule needs 'equal': labels the source and target share, "
                        "e.g. [uuid]")
        return None
    src, tgt = ({k: str(v) for k, v in _clean(d.get(key)).items()} for key in ("source", "target"))
    for rx in list(src.values()) + list(tgt.values()):
        try:
            re.compile(rx)
        except re.error as exc:
            problems.append(f"{where}:{_line(doc)}: inhibit rule: {rx!r} is not a regular expression ({exc})")
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
            problems.append(f"{f}:1: expected a mapping with 'groups:' (and optionally route, inhibit_rules, xid_sets)")
            continue
        unknown = set(doc) - {"groups", "route", "inhibit_rules", "xid_sets", "__line__"}
        if unknown:
            problems.append(f"{f}:1: unknown top-level key(s) {sorted(unknown)}; "
                            "allowed: groups, route, inhibit_rules, xid_sets")
        if "groups" not in doc and not ({"route", "inhibit_rules", "xid_sets"} & set(doc)):
            problems.append(f"{f}:1: expected a top-level 'groups:' list, each with 'name' and 'rules'")
            continue
        docs.append((f, doc))
    pack = RulePack(rules=[], files=files)
    for f, doc in docs:  # settings first: rules refer to xid sets defined in any file
        if "xid_sets" in doc:
            for k, v in _clean(doc["xid_sets"]).items():
                if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
                    problems.append(f"{f}:{_line(doc['xid_sets'])}: xid_sets.{k} must be a list of XID numbers")
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
                if not isinstance(r, dict):  # found by fuzzing: a rule that is not a mapping crashed the loader
                    problems.append(f"{f}:{_line(group)}: each rule must be a mapping (alert, metric, …), "
                                    f"not {r!r:.40}")
                    continue
                rule = _rule_from(r, str(f), pack.xid_sets, problems)
                if rule is None:
                    continue
                if rule.name in seen:
                    problems.append(f"{rule.source}: rule {rule.name!r} is defined twice (first at {seen[rule.name]})")
                    continue
                seen[rule.name] = rule.source
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
        raise ValueError(f"runbook base URL {base_url!r} is not an http(s) URL; give one like "
                         "https://gpufleet.example.com/runbooks or your wiki's https://wiki.example.com/gpu "
                         "(links become BASE/NAME)")
    return base_url.rstrip("/")


def runbook_url(value: str, base_url: str) -> str:
    """A rule's runbook_url annotation as a link: relative names go under ``base_url``."""
    if _SCHEME.match(value):
        return value
    return f"{base_url.rstrip('/')}/{value.lstrip('/')}"


def with_runbook_base(pack: RulePack, base_url: str) -> RulePack:
    """The pack with every relative runbook_url annotation resolved against ``base_url``."""
    base = check_runbook_base_url(base_url)
    rules = [replace(r, annotations={**r.annotations, "runbook_url": runbook_url(r.annotations["runbook_url"], base)})
             if "runbook_url" in r.annotations else r for r in pack.rules]
    return replace(pack, rules=rules)


_TEMPLATE = re.compile(r"\{\{\s*(\$labels\.([A-Za-z_][A-Za-z0-9_]*)|\$value)\s*\}\}")


def render(template: str, labels: dict[str, str], value: float | None) -> str:
    """Expand ``{{ $labels.NAME }}`` and ``{{ $value }}`` (the Prometheus template subset rules use)."""

    def sub(m: re.Match) -> str:
        if m.group(2):
            return labels.get(m.group(2), "")
        return "" if value is None else f"{value:.4g}"

    return _TEMPLATE.sub(sub, template)
