"""`gpufleet simulate inject`: drive the GPU simulator of a running agent."""

from __future__ import annotations

import click

from gpufleet.cli.client import AgentClient, ClientError
from gpufleet.cli.common import Group
from gpufleet.cli.params import Duration

FAULTS = (
    "xid",
    "lost",
    "thermal",
    "sw_thermal",
    "hw_slowdown",
    "power_brake",
    "idle_memory",
    "straggler",
    "ecc",
    "recovery_action",
    "nvlink_error",
    "nvlink_down",
    "nvlink_replay",
    "recover",
)


@click.group(cls=Group)
def simulate() -> None:
    """Drive the GPU simulator of a running agent (started with --simulate)."""


@simulate.command("inject")
@click.argument("kind", type=click.Choice(FAULTS))
@click.option(
    "--agent",
    "agent_url",
    default="http://127.0.0.1:9445",
    envvar="GPUFLEET_AGENT",
    show_default=True,
    help="URL of the agent running with --simulate.",
)
@click.option(
    "--gpu",
    type=click.IntRange(0),
    default=0,
    envvar="GPUFLEET_SIMULATE_GPU",
    show_default=True,
    help="Index of the simulated GPU.",
)
@click.option("--xid", type=int, default=None, envvar="GPUFLEET_SIMULATE_XID", help="XID code, for kind xid.")
@click.option(
    "--duration",
    type=Duration(),
    default=120.0,
    envvar="GPUFLEET_SIMULATE_DURATION",
    show_default=True,
    help="How long lasting faults last: seconds or a duration such as 5m.",
)
def simulate_inject(kind: str, agent_url: str, gpu: int, xid: int | None, duration: float) -> None:
    """Inject a fault into a simulated GPU.

    NVLink faults hit the GPU's link 0: nvlink_error counts a CRC error on it, nvlink_down takes it down at
    both GPUs of the pair (0-1, 2-3, ...) for --duration, nvlink_replay makes it replay packets for --duration.
    """
    try:
        click.echo(AgentClient(agent_url).inject_fault(gpu=gpu, kind=kind, xid=xid, duration_s=duration))
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
