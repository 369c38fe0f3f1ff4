"""`gpufleet dashboards build / push`: the dashboards as code, written to JSON or pushed to a Grafana."""

from __future__ import annotations

from pathlib import Path

import click

from gpufleet.cli.common import Group


@click.group(cls=Group)
def dashboards() -> None:
    """Build the Grafana dashboards from code, or push them to a Grafana."""


@dashboards.command("build")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to write into [default: the dashboards package, where they are committed].",
)
@click.option("--check", is_flag=True, help="Write nothing; fail if the files on disk differ from the code.")
def dashboards_build(out: Path | None, check: bool) -> None:
    """Generate dashboards/*.json (every dashboard, PostgreSQL and Prometheus flavours)."""
    from gpufleet import dashboards as dash
    from gpufleet.dashboards.render import dumps

    directory = out or dash.HERE
    if check:
        want = {name: dumps(model) for name, model in dash.build().items()}
        have = dash.committed(directory)
        differ = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        if differ:
            raise click.ClickException(
                f"{len(differ)} dashboard file(s) differ from the code: {', '.join(differ)}; "
                "run `gpufleet dashboards build` and commit the result"
            )
        click.echo(f"{len(want)} dashboard files match the code")
        return
    for path in dash.write(directory):
        click.echo(f"wrote {path}")


@dashboards.command("push")
@click.option(
    "--grafana-url",
    required=True,
    envvar="GPUFLEET_GRAFANA_URL",
    help="Grafana URL, e.g. http://grafana:3000",
)
@click.option(
    "--grafana-token",
    default=None,
    envvar="GPUFLEET_GRAFANA_TOKEN",
    help="Grafana service-account token (Editor role).",
)
@click.option(
    "--db",
    default=None,
    envvar="GPUFLEET_DB",
    help="The collector's PostgreSQL store as Grafana reaches it (PostgreSQL flavour).",
)
@click.option(
    "--prometheus-url",
    default=None,
    envvar="GPUFLEET_PROMETHEUS_URL",
    help="A Prometheus scraping the agents, as Grafana reaches it (Prometheus flavour).",
)
def dashboards_push(
    grafana_url: str, grafana_token: str | None, db: str | None, prometheus_url: str | None
) -> None:
    """Create or update the gpufleet folder, data sources and dashboards in Grafana (idempotent)."""
    from gpufleet.collector.grafana import collector_pusher, connect

    try:
        pusher = collector_pusher(connect(grafana_url, grafana_token), db or "", prometheus_url)
        report = pusher.push()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # Grafana's client raises its own and the transport's errors
        raise click.ClickException(f"pushing to Grafana at {grafana_url} failed: {exc}") from None
    click.echo(f"Grafana at {grafana_url}: {report}")
