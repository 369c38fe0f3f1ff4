"""The text of ``/metrics``: Prometheus text format 0.0.4, the families' names exactly as given.

A scrape writes every series of the latest snapshot, and the series are the same scrape after scrape. The
``name{labels}`` head of a series is written once and kept while the series is scraped (known by its label
dict, which a source hands out unchanged every sample: see :class:`gpufleet.agent.families.Family`), so a
scrape writes one value per series. A scrape of 8 simulated GPUs (530 series, gzip) costs 1.2 ms of CPU this
way against 6.2 ms through prometheus-client's OpenMetrics writer, at a 15 s scrape interval 0.008 % of a
core against 0.04 % (``bench/exposition.py``, docs/benchmarks.md). One writer serves every naming mode:
dcgm-exporter's counters lack ``_total``, which prometheus-client cannot write.
"""

from __future__ import annotations

import threading

from prometheus_client.utils import floatToGoString

from gpufleet.agent.families import Family, PerSeries

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape(value: str, *, quote: bool) -> str:
    """Escape a help text (``quote=False``) or a label value as the text format requires."""
    value = value.replace("\\", r"\\").replace("\n", r"\n")
    return value.replace('"', r"\"") if quote else value


def series_head(name: str, labels: dict[str, str]) -> str:
    """``name{a="1",b="2"}``, labels sorted by name, or the bare name."""
    if not labels:
        return name
    body = ",".join(f'{k}="{escape(str(v), quote=True)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


class TextExposition:
    """Writes families as the text format, each series' head kept from the scrape before (:func:`render`).

    Heads are forgotten at the end of the first scrape that does not write them, so a pod's series that went
    away do not stay. Label dicts made anew for each scrape (the agent's own metrics, a renaming) are written anew.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # scrapes may come at once (two Prometheus replicas)
        self._heads: PerSeries[str] = PerSeries()

    def render(self, families: list[Family]) -> bytes:
        with self._lock:
            heads = self._heads
            lines: list[str] = []
            for f in families:
                if not f.samples:
                    continue
                name = f.name
                lines.append(f"# HELP {name} {escape(f.help, quote=False)}")
                lines.append(f"# TYPE {name} {f.kind}")
                for labels, value in f.samples:
                    head = heads.get(name, labels, lambda: series_head(name, labels))  # noqa: B023
                    lines.append(f"{head} {floatToGoString(value)}")
            heads.rotate()
        lines.append("")
        return "\n".join(lines).encode()


__all__ = ["CONTENT_TYPE", "TextExposition", "escape", "series_head"]
