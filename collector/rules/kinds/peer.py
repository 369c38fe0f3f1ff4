"""peer: a GPU far below the median of its peers (the GPUs sharing the ``by`` labels, e.g. one job): a
straggler slows the whole job."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from gpufleet.collector.rules.contract import LatestPoint
from gpufleet.collector.rules.kinds.base import Data, Evaluation, Points, Verdict, YamlRule, fresh, num

if TYPE_CHECKING:
    from gpufleet.collector.rules.model import Rule


@dataclass(frozen=True)
class Peer:
    kind: ClassVar[str] = "peer"
    keys: ClassVar[frozenset[str]] = frozenset({"by", "below", "min_peers", "min_median"})
    instant: ClassVar[bool] = False

    by: tuple[str, ...] = ()
    below: float = 0.5
    min_peers: int = 3
    min_median: float = 0.0

    @classmethod
    def parse(cls, y: YamlRule) -> Peer:
        by = y.labels_list("by", ())
        if not by:
            y.bad("a peer rule needs 'by': the labels that make GPUs peers, e.g. [cluster, job]")
        return cls(
            by,
            y.num("below", 0.5, lo=0.0, hi=1.0),
            int(y.num("min_peers", 3, lo=2)),
            y.num("min_median", 0.0),
        )

    def metrics(self) -> list[str]:
        return []

    def history_s(self) -> float:
        return 0.0

    def evaluate(self, rule: Rule, points: Points, data: Data, now_ms: int, ev: Evaluation) -> Verdict:
        v = Verdict({}, set())
        groups: dict[tuple[str, ...], list[LatestPoint]] = {}
        for p in fresh(points, now_ms):
            k = ev.cache.key(p.labels, self.by)
            if all(k):  # a GPU without the peer labels (no job) has no peers
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
        by = ", ".join(self.by)
        expr = (
            f"{sel} < on({by}) group_left() ({num(self.below)} * (quantile by ({by}) (0.5, {sel}) "
            f">= {num(self.min_median)}) and on({by}) count by ({by}) ({sel}) >= {self.min_peers})"
        )
        return expr, "the alert's value is the GPU's own value here, not its ratio to the median"
