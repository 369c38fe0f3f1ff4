"""`gpufleet up`: a collector and an agent on one machine. It declares no option of its own beyond where the
agent listens: the collector's and the agent's options come from their commands' declarations, so each
reads the same environment variable here as there."""

from __future__ import annotations

from typing import Any

import click

from gpufleet.cli.agent import agent_settings, sampling_options, simulate_option
from gpufleet.cli.collector import collector_options, collector_settings, listen_option
from gpufleet.cli.common import Command, announce, check_free, logging_options, wait_for_signal
from gpufleet.cli.params import ListenAddress

SIMULATED_WHEN_NO_GPU = 4


def _real_or_simulated(simulate: int | None) -> tuple[int, str]:
    """How many GPUs to simulate (0: real ones) and the sentence that says why."""
    if simulate is not None:
        return (
            simulate,
            f"simulating {simulate} GPUs (--simulate)"
            if simulate
            else "real GPUs through NVML (--simulate 0)",
        )
    from gpufleet.agent.nvml import Nvml, NvmlUnavailable

    try:
        probe = Nvml()
        probe.start()
        n = len(probe.gpus())
        probe.shutdown()
    except NvmlUnavailable as exc:
        return SIMULATED_WHEN_NO_GPU, (
            f"no NVIDIA GPU here ({str(exc).split(';')[0]}): simulating {SIMULATED_WHEN_NO_GPU} GPUs"
        )
    if n:
        return 0, f"{n} real GPU(s) found through NVML"
    return SIMULATED_WHEN_NO_GPU, f"NVML works but sees no GPU: simulating {SIMULATED_WHEN_NO_GPU} GPUs"


@click.command(cls=Command)
@simulate_option(default=None, help="Simulate N GPUs [default: real GPUs if NVML works, else 4 simulated].")
@click.option(
    "--agent-listen",
    type=ListenAddress(),
    default="127.0.0.1:9445",
    envvar="GPUFLEET_AGENT_LISTEN",
    show_default=True,
    help="Agent HOST:PORT (/metrics).",
)
@listen_option(default="127.0.0.1:9446", help="Collector HOST:PORT (the fleet page and the API).")
@sampling_options(push_interval=2.0)
@collector_options(eval_interval=2.0, runbook_default="http://LISTEN/runbooks")
@logging_options
def up(**params: Any) -> None:
    """Everything on one machine: collector + local agent + default rules. The first thing to run."""
    from gpufleet.agent.main import start_agent
    from gpufleet.agent.nvml import NvmlUnavailable
    from gpufleet.collector.service import Collector

    simulate, why = _real_or_simulated(params["simulate"])
    listen: str = params["listen"]
    agent_listen: str = params["agent_listen"]
    settings = collector_settings(params, console=True)
    # simulated GPUs keep their UUIDs from one `up` to the next, as real ones do: otherwise the GPUs of the
    # last run would read as missing from this node's inventory
    agent = agent_settings(
        params,
        listen=agent_listen,
        collector=f"http://{listen}",
        simulate=simulate,
        seed=1 if simulate else None,
    )
    check_free(listen, "--listen")
    check_free(agent_listen, "--agent-listen")
    try:
        c = Collector(settings).start()
    except Exception as exc:
        raise click.ClickException(f"collector did not start: {exc}") from None
    try:
        running = start_agent(agent)
    except (NvmlUnavailable, OSError) as exc:
        c.close()
        raise click.ClickException(f"agent did not start: {exc}") from None
    lines = [
        f"gpufleet up: {why}",
        f"  fleet page      http://{listen}/",
        f"  agent metrics   http://{agent_listen}/metrics",
        f"  GPUs            http://{listen}/api/v1/gpus",
        f"  alerts          http://{listen}/api/v1/alerts",
        f"  runbooks        http://{listen}/runbooks/",
        f"  store           {c.store.engine.url.render_as_string()}",
    ]
    if simulate:
        lines.append(
            f"  inject a fault  gpufleet simulate inject --agent http://{agent_listen} --gpu 0 xid --xid 79"
        )
    lines.append("  writes are open on loopback (no tokens); Ctrl-C stops")
    announce("\n".join(lines))
    wait_for_signal()
    announce("stopping…")
    running.stop()
    c.close()
