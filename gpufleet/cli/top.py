"""`gpufleet top`: the command; the screen is in top_ui (it needs rich, the `cli` extra)."""

from __future__ import annotations

import click

from gpufleet.cli.common import Command, token_option
from gpufleet.cli.params import Duration


@click.command(cls=Command)
@click.option(
    "--collector",
    "collector_url",
    default="http://127.0.0.1:9446",
    envvar="GPUFLEET_COLLECTOR",
    show_default=True,
    help="Collector URL.",
)
@click.option(
    "--interval",
    type=Duration(0.2),
    default=2.0,
    show_default=True,
    help="Time between refreshes, seconds or a duration.",
)
@click.option(
    "--sort",
    "sort_key",
    type=click.Choice(["node", "sm", "util", "memory", "temperature", "power", "alerts"]),
    default="node",
    show_default=True,
)
@token_option(read_only=True)
@click.option("--cluster", default=None, help="Only GPUs of this cluster.")
@click.option("--node", default=None, help="Only GPUs whose node name contains this.")
@click.option("--pod", default=None, help="Only GPUs whose pod (namespace/pod) contains this.")
def top(
    collector_url: str,
    interval: float,
    sort_key: str,
    token: str | None,
    cluster: str | None,
    node: str | None,
    pod: str | None,
) -> None:
    """A live terminal view of every GPU in the fleet. Keys: j/k or Down/Up move a row, PageDown/PageUp or
    space/b a screen, g/G or Home/End to the first/last row; s SM, u util, m memory, t temperature, p power,
    a alerts, n node; r reverses; / filters; q quits."""
    from gpufleet.cli.client import CollectorClient

    try:
        from gpufleet.cli.top_ui import Filters, run_top
    except ImportError as exc:
        raise click.ClickException(f"gpufleet top needs rich: pip install 'gpufleet[cli]' ({exc})") from None
    try:
        run_top(
            CollectorClient(collector_url, token=token, timeout_s=5.0),
            interval=interval,
            sort_key=sort_key,
            filters=Filters(cluster, node, pod),
        )
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
