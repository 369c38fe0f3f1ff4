"""The one record every source produces and every output (``/metrics``, remote-write) consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Family:
    """A metric family: name (``_total`` included for counters), type, help and its labelled samples.

    A sample's label dict is read-only once added: a source may hand out the same dict for a series every
    sample, and the sinks remember what they worked out for a series (its sorted, encoded labels) by that
    dict. A stage that changes labels adds a new dict.
    """

    name: str
    kind: str  # "gauge" | "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, labels: dict[str, str], value: float) -> None:
        self.samples.append((labels, float(value)))


@dataclass(slots=True)
class Snapshot:
    """Every family of one sample, stamped with the time it was taken."""

    timestamp_ms: int
    families: list[Family] = field(default_factory=list)


class Families(dict[str, Family]):
    """Families by name, each made on first use: ``families(name, kind, help)`` returns the one family."""

    def __call__(self, name: str, kind: str, help_text: str) -> Family:
        f = self.get(name)
        if f is None:
            f = self[name] = Family(name, kind, help_text)
        return f


class PerSeries(Generic[T]):
    """What a stage works out once per series and hands out again every sample, known by a key (the family's
    name, or what else the value depends on) and the identity of the series' label dict: the sources hand out
    the same dict for a series every sample (see :class:`Family`). An entry holds its dict, so no other dict
    can take its ``id`` while the entry lives. Entries not asked for since the last :meth:`rotate` are
    forgotten at the next (the series of a pod that left, of a MIG instance deleted)."""

    __slots__ = ("_before", "_now")

    def __init__(self) -> None:
        self._now: dict[tuple[object, int], tuple[dict[str, str], T]] = {}
        self._before: dict[tuple[object, int], tuple[dict[str, str], T]] = {}

    def get(self, key: object, labels: dict[str, str], make: Callable[[], T]) -> T:
        ref = (key, id(labels))
        hit = self._now.get(ref)
        if hit is None or hit[0] is not labels:
            hit = self._before.get(ref)
            if hit is None or hit[0] is not labels:
                hit = (labels, make())
            self._now[ref] = hit
        return hit[1]

    def __len__(self) -> int:
        """The series remembered: asked for since the rotation before last."""
        return len(self._before.keys() | self._now.keys())

    def rotate(self) -> None:
        self._before, self._now = self._now, {}
