"""What one exported metric is: the entry of the metric catalogue that producers declare and readers check.

A producer without a declarative table (an inference reader, a component's own metrics) declares its series
as a tuple of :class:`MetricSpec` next to the code that emits them; tests run the producer and compare what
it emits with its declaration, so the catalogue that rules, dashboards and reports are checked against
cannot drift from what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric family as exported: ``name`` as written on the wire (``_total`` included for counters)."""

    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    # When the series exists: "always", "opt-in: --flag", "after an event: …", "when configured: …".
    when: str = ALWAYS
    # The dcgm-exporter names the same samples carry in dcgm naming mode (empty: the name stays as it is).
    dcgm: tuple[str, ...] = ()
    # dcgm-exporter has a field for some label values only (violation reasons, ECC kinds): the other values
    # keep the gpufleet name in dcgm mode too.
    dcgm_keeps_name: bool = False

    def wire_names(self) -> tuple[str, ...]:
        """Every series name a reader may query: a histogram's ``_bucket``/``_sum``/``_count`` too."""
        if self.kind == "histogram":
            return (self.name, f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)
