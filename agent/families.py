"""The one record every source produces and every output (``/metrics``, remote-write) consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Family:
    """A metric family: name (``_total`` included for counters), type, help and its labelled samples."""

    name: str
    kind: str  # "gauge" | "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, labels: dict[str, str], value: float) -> None:
        self.samples.append((labels, float(value)))
