"""Click types for the flags (and their environment variables) that name a duration, an address, a database
or rule files. Each refuses a bad value while the command line is read, before anything starts: click's usage
error, exit status 2, and one line saying what to write instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gpufleet.core.addresses import database_url, split_listen
from gpufleet.core.durations import format_duration, parse_duration


class Duration(click.ParamType):
    """A Prometheus duration (``500ms``, ``90s``, ``1h30m``, ``7d``) or a bare number of ``unit_s`` seconds;
    the value is a number of ``unit_s`` seconds (1: seconds; 86400: days, for retention)."""

    name = "duration"

    def __init__(self, minimum_s: float = 0.0, *, unit_s: float = 1.0) -> None:
        self.minimum_s = minimum_s
        self.unit_s = unit_s

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = parse_duration(value, bare_number_s=self.unit_s)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds < self.minimum_s:
            self.fail(
                f"{value!r} is less than the least this setting takes, {format_duration(self.minimum_s)}",
                param,
                ctx,
            )
        return seconds / self.unit_s


class ListenAddress(click.ParamType):
    """``HOST:PORT`` to listen on; the value stays the text as given."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            split_listen(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


class DatabaseURL(click.ParamType):
    """The collector's store: ``sqlite:///FILE`` or ``postgresql+psycopg://…``; the value stays as given."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            url = database_url(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        try:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError
        except ImportError:  # an agent-only install: the command that opens the store says what to install
            return str(value)
        try:
            make_url(url)
        except (ArgumentError, ValueError) as exc:
            self.fail(
                f"the URL is malformed ({exc}); write sqlite:///PATH/gpufleet.db or "
                "postgresql+psycopg://USER:PASSWORD@HOST/DB",
                param,
                ctx,
            )
        return str(value)


def check_rule_files(ctx: click.Context, param: click.Parameter, value: tuple[Path, ...]) -> tuple[Path, ...]:
    """Callback of ``--rules``: load the files now, so a bad one stops the command before it opens a store or
    a port, with every problem's file and line."""
    if value:
        from gpufleet.collector.rules.model import RuleError, load_pack

        try:
            load_pack(list(value))
        except RuleError as exc:
            raise click.BadParameter("\n".join(exc.problems), ctx, param) from None
    return value
