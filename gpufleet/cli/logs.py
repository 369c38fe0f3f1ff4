"""Logging of the long-running commands (agent, collector, up): text for people, or JSON for log pipelines (one
object a line: time, level, logger, message, and exception when there is one). Secrets the process was
given (bearer tokens, the Slack and Grafana tokens) are replaced in every line, whoever logs them."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
REDACTED = "<redacted>"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Their routine INFO lines (each job run, each migration step) drown what matters unless debugging.
NOISY = ("apscheduler", "alembic")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _Redacting(logging.Formatter):
    """Formats with ``inner``, then blanks every secret out of the finished line (message, arguments and
    traceback alike)."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._inner = inner
        # Longest first: a token that contains another is blanked whole. Strings under 6 characters are no
        # secret worth the name and blanking them would mangle ordinary words.
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line = self._inner.format(record)
        for secret in self._secrets:
            line = line.replace(secret, REDACTED)
        return line


def configure(
    level: str = "info", fmt: str = "text", *, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Send every logger's records at ``level`` and above to standard error (or ``stream``) as ``fmt``."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(
            f"log level {level!r} / format {fmt!r}: levels are {', '.join(LEVELS)}; formats "
            f"{', '.join(FORMATS)}"
        )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(_Redacting(inner, secrets))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.NOTSET if level == "debug" else logging.WARNING)
