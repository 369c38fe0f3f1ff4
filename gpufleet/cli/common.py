"""What every command group shares: the click classes that show each option's environment variable, the
logging options of the long-running commands, and the checks they make before anything starts."""

from __future__ import annotations

import functools
import logging
import select
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from gpufleet.cli.logs import FORMATS, LEVELS

F = TypeVar("F", bound=Callable[..., Any])
# A click option or a bundle of them, applied to a command function. click passes the parsed values as keyword
# arguments, so command functions are untyped callables to it.
CommandFunction = Callable[..., Any]
Decorator = Callable[[CommandFunction], CommandFunction]

_LOG_FORMAT_KEY = "gpufleet.log_format"  # in the click context's meta: how announce() writes
# Options whose values are secrets, blanked out of every log line.
_SECRET_OPTIONS = ("token", "slack_token", "grafana_token")


def _show_envvars(params: list[click.Parameter]) -> None:
    for p in params:
        if isinstance(p, click.Option):
            p.show_envvar = True


class Command(click.Command):
    """Every option shows its environment variable in --help and in its error messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _show_envvars(self.params)


class Group(click.Group):
    command_class = Command
    group_class = type  # subgroups are Groups too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _show_envvars(self.params)


def apply(options: list[Decorator]) -> Decorator:
    """One decorator of ``options``, listed in the order --help shows them."""

    def decorate(f: CommandFunction) -> CommandFunction:
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorate


def logging_options(f: F) -> F:
    """--log-level, --log-format and -v of the long-running commands. Logging is set up before the command
    runs, with the tokens among its options blanked out of every line."""

    @functools.wraps(f)
    def command(*args: Any, log_level: str, log_format: str, verbose: bool, **kw: Any) -> Any:
        from gpufleet.cli.logs import configure

        secrets = [kw.get(k) or "" for k in _SECRET_OPTIONS]
        for option in ("tokens", "read_tokens"):
            secrets += [spec.rpartition("@")[0] or spec for spec in split_tokens(kw.get(option))]
        configure("debug" if verbose else log_level, log_format, secrets=secrets)
        click.get_current_context().meta[_LOG_FORMAT_KEY] = log_format
        return f(*args, **kw)

    options: list[Decorator] = [
        click.option(
            "--log-level",
            type=click.Choice(LEVELS),
            default="info",
            envvar="GPUFLEET_LOG_LEVEL",
            show_default=True,
            help="Log this level and above.",
        ),
        click.option(
            "--log-format",
            type=click.Choice(FORMATS),
            default="text",
            envvar="GPUFLEET_LOG_FORMAT",
            show_default=True,
            help="Log lines as text, or as JSON: one object a line with time, level, logger and message.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Same as --log-level debug."),
    ]
    return cast(F, apply(options)(command))


def announce(text: str) -> None:
    """What a long-running command says once it runs: printed, or logged when the logs are JSON (so that every
    line a log pipeline reads is JSON)."""
    if click.get_current_context().meta.get(_LOG_FORMAT_KEY) == "json":
        logging.getLogger("gpufleet").info(text)
    else:
        click.echo(text)


def wait_for_signal() -> None:
    """Block the main thread until SIGINT or SIGTERM, without waking it in between.

    A signal may reach any thread of the process, and one that reaches another thread does not end the main
    thread's wait on a lock; polling for it woke the process twice a second. Python writes every signal it
    catches to the wakeup file descriptor, whichever thread the kernel gave it to, so the main thread sleeps
    in a read of that socket and runs the handlers when it returns.
    """
    stop = threading.Event()
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    # the wakeup socket first: a signal caught from here on ends the select below
    before = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set():
            select.select([wake_r], [], [])
            wake_r.recv(64)
    finally:
        signal.set_wakeup_fd(before)
        wake_r.close()
        wake_w.close()


def token_option(*, read_only: bool) -> Decorator:
    """--token of a command that talks to a collector. One that only reads takes a read token first
    (GPUFLEET_READ_TOKEN), else the write token (GPUFLEET_TOKEN), which may read too."""
    return click.option(
        "--token",
        default=None,
        envvar=["GPUFLEET_READ_TOKEN", "GPUFLEET_TOKEN"] if read_only else "GPUFLEET_TOKEN",
        help="Bearer token for the collector"
        + (": a read token, or a write token." if read_only else ": a write token."),
    )


def split_tokens(value: str | None) -> list[str]:
    """The entries of a comma-separated list of tokens."""
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def one_line(exc: BaseException) -> str:
    """An error's text on one line (database drivers' span several)."""
    return " ".join(str(exc).split())


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def check_free(listen: str, flag: str) -> None:
    """Fail before opening the store when the address is taken: otherwise the web server finds out after the
    start-up line, in a log line of its own."""
    import socket

    from gpufleet.core.addresses import split_listen

    host, port = split_listen(listen)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as the servers do: TIME_WAIT is no conflict
            s.bind((host, port))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {listen} ({exc.strerror or exc}): is another gpufleet "
            f"running there? Stop it or choose another {flag}"
        ) from None


def runbook_base_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback of --runbook-base-url: a base URL runbook links can be made from, checked before anything
    starts."""
    from gpufleet.collector.rules.model import check_runbook_base_url

    try:
        return None if value is None else check_runbook_base_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
