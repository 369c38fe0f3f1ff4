"""The one record every source produces and every output (``/metrics``, remote-write) consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


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
