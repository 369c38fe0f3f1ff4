"""peer: a GPU far below the median of its peers (the GPUs sharing the ``by`` labels, e.g. one job): a
straggler slows the whole job.

``by`` names the labels that make GPUs peers; a GPU lacking one of them has no peers by them. With
``fallback_by`` such a GPU is compared with the GPUs that share those labels instead (no job known: the
GPUs of one pod). ``within`` names labels peers also share where a GPU may lack them, an absent one counting
as a value of its own (``namespace``: a job name is unique within its namespace, and a Slurm job has none).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.contract import LatestPoint
from gpufleet.collector.rules.kinds.base import (
    Data,
    Evaluation,
    LabelCache,
    Points,
    Verdict,
    YamlRule,
    fresh,
    num,
    selector,
)

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule


# Labels a Prometheus scrape (the Prometheus Operator's pod and service monitors) sets on every series
# of its target, the agent's pod, where the series has none of its own.
_TARGET_LABELS = frozenset({"job", "instance", "pod", "namespace", "container"})


@dataclass(frozen=True)
class Peer:
    kind: ClassVar[str] = "peer"
    keys: ClassVar[frozenset[str]] = frozenset(
        {"by", "fallback_by", "within", "below", "min_peers", "min_median"}
    )
    instant: ClassVar[bool] = False

    by: tuple[str, ...] = ()
    below: float = 0.5
    min_peers: int = 3
    min_median: float = 0.0
    fallback_by: tuple[str, ...] = ()
    within: tuple[str, ...] = ()

    @classmethod
    def parse(cls, y: YamlRule) -> Peer:
        by = y.labels_list("by", ())
        if not by:
            y.bad("a peer rule needs 'by': the labels that make GPUs peers, e.g. [job]")
        return cls(
            by,
            y.num("below", 0.5, lo=0.0, hi=1.0),
            int(y.num("min_peers", 3, lo=2)),
            y.num("min_median", 0.0),
            y.labels_list("fallback_by", ()),
            y.labels_list("within", ()),
        )

    def metrics(self) -> list[str]:
        return []

    def history_s(self) -> float:
        return 0.0

    def group(self, labels: dict[str, str], cache: LabelCache) -> tuple[str, ...] | None:
        """The peer group of a series: its ``within`` values and, when it has every ``by`` label, those;
        else its ``fallback_by`` values when it has them all; else None (no peers)."""
        key = cache.key(labels, self.by)
        if all(key):
            return (*cache.key(labels, self.within), "by", *key)
        if self.fallback_by:
            key = cache.key(labels, self.fallback_by)
            if all(key):
                return (*cache.key(labels, self.within), "fallback_by", *key)
        return None

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        groups: dict[tuple[str, ...], list[LatestPoint]] = {}
        for p in fresh(points, now_ms):
            k = self.group(p.labels, ev.cache)
            if k is not None:
                groups.setdefault(k, []).append(p)
        for members in groups.values():
            if len(members) < self.min_peers:
                continue
            med = statistics.median(p.value for p in members)
            for p in members:
                labels, aid = ev.alert(rule, p.labels)
                v.seen.add(aid)
                if med >= self.min_median and med > 0 and p.value < self.below * med:
                    v.active[aid] = (labels, p.value / med)
        return v

    def promql(self, rule: Rule, sel: str) -> tuple[str | None, str | None]:
        """GPUs with every ``by`` label against their ``by`` peers, ``or`` (with ``fallback_by``) the GPUs lacking
        one against their ``fallback_by`` peers. PromQL groups a missing label as an empty value, as ``within``
        means; the selectors keep out the GPUs that lack the labels that make them peers."""
        having = selector(rule.metric, {**{k: ".+" for k in self.by}, **rule.matchers})
        expr = self._below_median(having, (*self.within, *self.by))
        if self.fallback_by:
            candidates = {**{k: ".+" for k in self.fallback_by}, **rule.matchers}
            if len(self.by) == 1 and self.by[0] not in rule.matchers:
                lacking = selector(rule.metric, {**candidates, self.by[0]: ""})
            else:
                lacking = f"({selector(rule.metric, candidates)} unless {having})"
            expr = f"{expr} or {self._below_median(lacking, (*self.within, *self.fallback_by))}"
        note = "the alert's value is the GPU's own value here, not its ratio to the median"
        targets = [
            k for k in dict.fromkeys((*self.within, *self.by, *self.fallback_by)) if k in _TARGET_LABELS
        ]
        if targets:
            note += (
                f"; Prometheus puts its scrape target's {', '.join(targets)} on a GPU series without one "
                "(scrape with honor_labels and drop the target's by relabeling, or remote-write)"
            )
        return expr, note

    def _below_median(self, sel: str, labels: tuple[str, ...]) -> str:
        on = ", ".join(dict.fromkeys(labels))
        return (
            f"{sel} < on({on}) group_left() ({num(self.below)} * (quantile by ({on}) (0.5, {sel}) "
            f">= {num(self.min_median)}) and on({on}) count by ({on}) ({sel}) >= {self.min_peers})"
        )
