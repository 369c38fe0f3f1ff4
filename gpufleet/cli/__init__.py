"""The `gpufleet` command line: one module per command group. Each imports the agent or the collector only
inside the command that runs it, so an agent-only install (pip install 'gpufleet[agent]') works without the
collector's dependencies."""

from __future__ import annotations

import click

from gpufleet import __version__
from gpufleet.cli.agent import agent
from gpufleet.cli.alerts import alerts
from gpufleet.cli.collector import collector, hash_token
from gpufleet.cli.common import Group
from gpufleet.cli.dashboards import dashboards
from gpufleet.cli.db import db
from gpufleet.cli.report import report
from gpufleet.cli.silence import silence
from gpufleet.cli.simulate import simulate
from gpufleet.cli.top import top
from gpufleet.cli.up import up

__all__ = ["main"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gpufleet")
def main() -> None:
    """gpufleet: monitoring for fleets of NVIDIA GPU nodes."""


for _command in (agent, collector, hash_token, up, top, report, simulate, alerts, dashboards, silence, db):
    main.add_command(_command)
