"""`gpufleet report`: the efficiency report, read from the store directly or asked of a running collector."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from gpufleet.cli.client import ClientError, CollectorClient
from gpufleet.cli.common import Command, one_line, token_option
from gpufleet.cli.params import DatabaseURL
from gpufleet.cli.progress import StatusLine


def unix_time(value: str | None) -> float | None:
    """Unix seconds of ``value``: a number, or an ISO 8601 time (UTC when it names no zone)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither Unix seconds nor an ISO 8601 time") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()


def _from_collector(collector_url: str, token: str | None, since: str, until: float | None, fmt: str) -> str:
    client = CollectorClient(collector_url, token=token)
    try:
        with StatusLine("report: ") as status:
            status(f"waiting for the collector at {client.base_url}")
            return client.report(since=since, fmt=fmt, until=until)
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None


def _from_store(db: str | None, since: str, until: float | None, fmt: str) -> str:
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from gpufleet.collector.report import ReportError, build_report, parse_since, render
    from gpufleet.collector.store import Store, StoreUnavailable

    try:
        start, stop = parse_since(since, until)
    except ReportError as exc:
        raise click.BadParameter(str(exc), param_hint="'--since' / '--until'") from None
    try:  # a report only reads: it never creates a store (an empty SQLite file) where there was none
        store = Store.open(db or "sqlite:///gpufleet.db", migrate_schema=False, create=False)
    except StoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    where = store.engine.url.render_as_string()

    def cause(exc: SQLAlchemyError) -> BaseException:  # the driver's own error says what went wrong
        return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc

    try:
        with StatusLine("report: ") as status:
            status(f"connecting to {where}")
            try:
                store.ping()
            except SQLAlchemyError as exc:
                raise click.ClickException(
                    f"cannot open the store at {where}: {one_line(cause(exc))}"
                ) from None
            return render(build_report(store.engine, start, stop, progress=status), fmt)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"cannot read the store at {where} "
            f"({one_line(cause(exc))}); "
            "is it a gpufleet store? `gpufleet db upgrade --db URL` creates or upgrades one"
        ) from None
    finally:
        store.close()


@click.command(cls=Command)
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="How far back: a duration (7d, 24h, 1h30m), Unix seconds or an ISO 8601 time.",
)
@click.option("--until", default=None, help="End of the range, Unix seconds or ISO 8601 [default: now].")
@click.option(
    "--format", "fmt", type=click.Choice(["markdown", "html"]), default="markdown", show_default=True
)
@click.option(
    "--db",
    type=DatabaseURL(),
    default=None,
    envvar="GPUFLEET_DB",
    help="Read the store directly (SQLAlchemy URL) [default: sqlite:///gpufleet.db].",
)
@click.option(
    "--collector",
    "collector_url",
    default=None,
    envvar="GPUFLEET_COLLECTOR",
    help="Ask a running collector instead (its /api/v1/report).",
)
@token_option(read_only=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file [default: standard output].",
)
def report(
    since: str,
    until: str | None,
    fmt: str,
    db: str | None,
    collector_url: str | None,
    token: str | None,
    output: Path | None,
) -> None:
    """Efficiency report: GPU-hours by state, wasted hours by pod, throttling, XID/ECC, energy, tokens per joule."""
    end = unix_time(until)
    body = (
        _from_collector(collector_url, token, since, end, fmt)
        if collector_url
        else _from_store(db, since, end, fmt)
    )
    if output:
        output.write_text(body)
        click.echo(f"report written to {output}", err=True)
    else:
        click.echo(body, nl=False)
