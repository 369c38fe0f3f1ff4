"""`gpufleet silence add / list / expire`: silences on a running collector, through its API."""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Mapping

import click

from gpufleet.cli.client import ClientError, CollectorClient
from gpufleet.cli.common import Decorator, Group, apply, token_option


def os_user(environ: Mapping[str, str] = os.environ, getuser: Callable[[], str] = getpass.getuser) -> str:
    """Who runs the command: $USER, else the login name the system knows (cron jobs and containers often
    run without $USER), else "unknown"."""
    if environ.get("USER"):
        return environ["USER"]
    try:
        return getuser() or "unknown"
    except (OSError, KeyError, ImportError):  # a uid without a passwd entry: KeyError, OSError on 3.13+
        return "unknown"


def collector_api_options(*, read_only: bool = False) -> Decorator:
    """Where the collector's API is and the token it wants: every command that talks to a running collector."""
    options: list[Decorator] = [
        click.option(
            "--collector",
            "collector_url",
            default="http://127.0.0.1:9446",
            envvar="GPUFLEET_COLLECTOR",
            show_default=True,
            help="Collector URL.",
        ),
        token_option(read_only=read_only),
    ]
    return apply(options)


@click.group(cls=Group)
def silence() -> None:
    """Mute alerts for a while: add, list and expire silences on a collector."""


@silence.command("add")
@click.argument("matchers", nargs=-1, required=True)
@click.option(
    "--duration", default="2h", show_default=True, help="How long: a duration such as 30m, 2h, 1d12h."
)
@click.option("--author", default=os_user, show_default="$USER, else the login name", help="Who silences.")
@click.option("--comment", required=True, help="Why (a ticket, the maintenance window).")
@collector_api_options()
def silence_add(
    matchers: tuple[str, ...], duration: str, author: str, comment: str, collector_url: str, token: str | None
) -> None:
    """Silence alerts matching every MATCHER (name=value, name!=value, name=~regex, name!~regex)."""
    from gpufleet.core.durations import parse_duration
    from gpufleet.core.labels import Matcher

    try:
        parsed = [Matcher.parse(m) for m in matchers]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="MATCHERS") from None
    try:
        if parse_duration(duration, unit_required=True) <= 0:
            raise ValueError(f"{duration!r} is no time at all: a silence must last a while, e.g. 2h")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--duration'") from None
    client = CollectorClient(collector_url, token=token)
    try:
        click.echo(client.add_silence(parsed, duration=duration, created_by=author, comment=comment))
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None


@silence.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include expired silences.")
@collector_api_options(read_only=True)
def silence_list(show_all: bool, collector_url: str, token: str | None) -> None:
    """List silences: id, state, until, author, matchers, comment."""
    try:
        silences = CollectorClient(collector_url, token=token).silences()
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    for s in silences:
        if s.state == "expired" and not show_all:
            continue
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(s.ends_at))
        matchers = " ".join(s.matchers)
        why = f"  ({s.reason})" if s.reason else ""
        click.echo(f"{s.id}  {s.state:8} until {until}  by {s.created_by}  {matchers}  # {s.comment}{why}")


@silence.command("expire")
@click.argument("silence_ids", nargs=-1, required=True)
@collector_api_options()
def silence_expire(silence_ids: tuple[str, ...], collector_url: str, token: str | None) -> None:
    """Expire silences now."""
    client = CollectorClient(collector_url, token=token)
    for sid in silence_ids:
        try:
            client.expire_silence(sid)
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"expired {sid}")
