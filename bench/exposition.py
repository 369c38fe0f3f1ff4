"""What one scrape of the agent's ``/metrics`` costs to write, against prometheus-client's writers on the same
families.

An agent with N simulated GPUs takes a few samples; then each writer renders the latest snapshot (and the
agent's own metrics) as a scrape does, once a second after a sleep (as scrapes come, with the caches cold) and
in a loop, timed by this thread's CPU time:

* the agent's writer (agent/exposition.py), which keeps each series' head from the scrape before, with gzip
  (what a Prometheus scrape gets) and without;
* prometheus-client's OpenMetrics writer with gzip (what a Prometheus scrape got before) and its text writer,
  through a custom collector yielding the same families.

    python bench/exposition.py --gpus 8

Prints milliseconds a scrape and each writer's ratio to the agent's with gzip. No GPU needed.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics  # noqa: E402

from bench.profiles import thread_cpu_ms  # noqa: E402
from gpufleet.agent.exporter import SnapshotFamilies  # noqa: E402
from gpufleet.agent.exposition import TextExposition  # noqa: E402
from gpufleet.agent.families import Family  # noqa: E402
from gpufleet.agent.main import RunningAgent  # noqa: E402
from gpufleet.agent.settings import AgentSettings  # noqa: E402


class Families:
    """A prometheus-client custom collector yielding the agent's families (how /metrics was written before)."""

    def __init__(self, families: Callable[[], list[Family]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for fam in self._families():
            names = sorted({k for labels, _ in fam.samples for k in labels})
            if fam.kind == "counter":
                out: Metric = CounterMetricFamily(fam.name.removesuffix("_total"), fam.help, labels=names)
            else:
                out = GaugeMetricFamily(fam.name, fam.help, labels=names)
            for labels, value in fam.samples:
                out.add_metric([labels.get(k, "") for k in names], value)
            yield out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="simulated GPUs on the node")
    ap.add_argument("--scrapes", type=int, default=15, help="scrapes timed after a sleep, per writer")
    args = ap.parse_args()
    if args.gpus < 1 or args.scrapes < 1:
        ap.error("--gpus and --scrapes must be at least 1")
    agent = RunningAgent(AgentSettings(listen="127.0.0.1:0", simulate=args.gpus, node="bench", seed=1))
    for _ in range(3):
        agent.agent.sample()
    families = SnapshotFamilies(agent.exposition, agent.own_metrics).families
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(families))
    ours = TextExposition()
    writers: dict[str, Callable[[], object]] = {
        "agent's writer + gzip (a Prometheus scrape now)": lambda: gzip.compress(
            ours.render(families()), compresslevel=6
        ),
        "agent's writer, no gzip": lambda: ours.render(families()),
        "prometheus-client, OpenMetrics + gzip": lambda: gzip.compress(
            openmetrics(registry), compresslevel=6
        ),
        "prometheus-client, text 0.0.4": lambda: generate_latest(registry),
    }
    series = sum(len(f.samples) for f in families())
    print(f"{args.gpus} simulated GPUs, {series} series; thread CPU ms a scrape (median)")
    print("| writer | after 1 s asleep | in a loop | ratio to the first row (asleep) |")
    print("| --- | ---: | ---: | ---: |")
    rows = {
        name: (thread_cpu_ms(fn, times=args.scrapes, asleep_s=1.0), thread_cpu_ms(fn, times=50))
        for name, fn in writers.items()
    }
    base = next(iter(rows.values()))[0]
    for name, (cold, hot) in rows.items():
        print(f"| {name} | {cold:.3f} | {hot:.3f} | {cold / base:.1f}x |")
    agent.server.stop()  # never started: closes its socket


if __name__ == "__main__":
    main()
