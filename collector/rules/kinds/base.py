"""What every rule kind shares: the verdict it returns, what the engine lends it to evaluate, the YAML
reader it parses with, and the PromQL pieces it exports with."""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from gpufleet.collector.rules.anomaly import Ewma, RobustZ
from gpufleet.collector.rules.contract import LatestPoint
from gpufleet.core.durations import parse_duration as _parse_duration

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# A sample older than this is no news: only fresher data fires or resolves.
LOOKBACK_MS = 5 * 60 * 1000
# An event has no "condition stops holding": it stays firing this long after the counter last rose.
EVENT_KEEP_FIRING_S = 300.0
Points = Sequence[LatestPoint]
Data = Mapping[str, Sequence[LatestPoint]]
_T = TypeVar("_T")


def parse_duration(value: object) -> float:
    return _parse_duration(value, unit_required=True)


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


def metric_ok(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def alert_id(rule: str, labels: Mapping[str, str]) -> str:
    raw = json.dumps([rule, sorted(labels.items())], separators=(",", ":")).encode()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def fresh(points: Iterable[LatestPoint], now_ms: int) -> list[LatestPoint]:
    return [p for p in points if p.ts > now_ms - LOOKBACK_MS]


def _series_fp_of(labels: Mapping[str, str]) -> int:
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


class LabelCache:
    """Results computed from a label dict, kept while the view hands out the same dict object: every tick
    sees the same series again, and hashing their JSON each time was most of a tick's cost. One per engine:
    each entry holds the dict itself, so an id reused after the dict is gone never returns a stale result."""

    def __init__(self) -> None:
        self._d: dict[tuple[Hashable, int], tuple[dict[str, str], object]] = {}

    def get(self, tag: Hashable, labels: dict[str, str], make: Callable[[], _T]) -> _T:
        key = (tag, id(labels))
        hit = self._d.get(key)
        if hit is not None and hit[0] is labels:
            return hit[1]  # type: ignore[return-value]  # stored by this method under this tag, so a _T
        if len(self._d) > 1_000_000:
            self._d.clear()
        value = make()
        self._d[key] = (labels, value)
        return value

    def series_fp(self, labels: dict[str, str]) -> int:
        return self.get(None, labels, lambda: _series_fp_of(labels))

    def key(self, labels: dict[str, str], names: tuple[str, ...]) -> tuple[str, ...]:
        return self.get(names, labels, lambda: tuple(labels.get(n, "") for n in names))


@dataclass
class Verdict:
    """What one rule says now: alerts whose condition holds (labels, value), and alerts fresh data says are fine."""

    active: dict[str, tuple[dict[str, str], float]]
    seen: set[str]


class Evaluation(Protocol):
    """What the engine lends a rule kind during one tick: its caches, the series' history, and the memory
    and per-rule state it keeps (changes go into ``*_changed`` so the engine saves only those)."""

    cache: LabelCache
    memory: dict[tuple[str, int], float]
    memory_changed: dict[tuple[str, int], float]
    rule_state: dict[tuple[str, str], Any]
    rule_state_changed: dict[tuple[str, str], Any]
    detectors: dict[tuple[str, int], Ewma | RobustZ]  # anomaly baselines per (rule, series)
    anomalous: set[tuple[str, int]]
    last_ts: dict[tuple[str, int], int]  # the newest sample a detector scored

    def history(self, labels: dict[str, str]) -> deque[tuple[int, float]] | None: ...

    def rate(self, labels: dict[str, str], window_s: float, now_ms: int) -> float | None: ...

    def joined(
        self,
        data: Data,
        metric: str,
        on: tuple[str, ...],
        now_ms: int,
        matchers: Mapping[str, str] | None = None,
    ) -> dict[tuple[str, ...], float]: ...

    def alert(self, rule: Rule, series_labels: dict[str, str]) -> tuple[dict[str, str], str]: ...

    def labels(
        self, rule: Rule, series_labels: Mapping[str, str], severity: str | None = None
    ) -> dict[str, str]: ...


class YamlRule:
    """One rule's YAML mapping and the problems found in it, with readers that report a bad value and
    return the default, so one pass lists every problem of a file."""

    def __init__(self, doc: Mapping[str, Any], bad: Callable[[str], None]) -> None:
        self.doc = doc
        self.bad = bad

    def __contains__(self, key: str) -> bool:
        return key in self.doc

    def get(self, key: str, default: Any = None) -> Any:
        return self.doc.get(key, default)

    def num(self, key: str, default: float, *, lo: float | None = None, hi: float | None = None) -> float:
        v = self.doc.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.bad(f"'{key}' must be a number, not {v!r}")
            return default
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.bad(f"'{key}' is {v}; it must lie in [{lo}, {hi}]")
        return float(v)

    def dur(self, key: str, default: float) -> float:
        try:
            return parse_duration(self.doc.get(key, default))
        except ValueError as exc:
            self.bad(f"'{key}': {exc}")
            return default

    def labels_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.doc.get(key, list(default))
        if not isinstance(v, list) or not all(isinstance(x, str) and LABEL.fullmatch(x) for x in v):
            self.bad(f"'{key}' must be a list of label names, e.g. [cluster, node]")
            return default
        return tuple(v)

    def op(self) -> str:
        op = str(self.doc.get("op", ">"))
        if op not in OPS:
            self.bad(f"op {op!r} is not one of {' '.join(OPS)}")
        return op


class RuleSpec(Protocol):
    """A rule kind: what a rule of it says beyond the common header, and how it is evaluated and exported.
    Each kind is one module under ``rules/kinds/`` and one row of ``KINDS``."""

    kind: ClassVar[str]
    keys: ClassVar[frozenset[str]]  # the YAML keys of this kind, beyond the common ones
    instant: ClassVar[bool]  # fires without ``for``, resolves without fresh data (events)

    @classmethod
    def parse(cls, y: YamlRule) -> RuleSpec: ...

    def metrics(self) -> list[str]: ...  # the metrics read beyond the rule's own

    def history_s(self) -> float: ...  # how much of each series' past the kind needs

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict: ...

    def promql(self, rule: Rule, selector: str) -> tuple[str | None, str | None]: ...


def selector(metric: str, matchers: Mapping[str, str]) -> str:
    if not matchers:
        return metric
    parts = []
    for k, rx in sorted(matchers.items()):
        literal = re.fullmatch(r"[A-Za-z0-9_.:/-]*", rx) is not None
        parts.append(
            f'{k}{"=" if literal else "=~"}"{rx.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        )
    return metric + "{" + ",".join(parts) + "}"


def num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(x)
