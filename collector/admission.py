"""What the collector refuses before it stores anything of a remote-write request: whatever the store cannot
hold or a reader could not use afterwards. Each refusal carries a reason (a label of
``gpufleet_collector_refused_samples_total``) and a message naming the field and the fix.

Refused for good (400; a sender must not retry the same bytes): a timestamp outside the window around the
collector's clock (``--max-past``, by default the raw retention, and ``--max-future``), a ``__name__`` that
is not a metric name or is longer than the store's column, a label name sent twice in one series, a control
character (NUL among them) in a label value, a ``node`` or ``uuid`` longer than the store's columns, and the
per-request limits (``--max-labels``, ``--max-label-length``; ``--max-series`` and ``--max-samples`` answer
413). Label sets a receiver accepted before are not checked again; timestamps are checked on every request,
once per distinct run of timestamps (series sampled at the same instants share one).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gpufleet.core import remote_write as rw
from gpufleet.core.durations import format_duration
from gpufleet.core.loglines import LineLimit

log = logging.getLogger(__name__)

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
LABEL_NAMES = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*(?:,[a-zA-Z_][a-zA-Z0-9_]*)*$")  # names joined by ","
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# C0 controls, DEL and C1 controls: PostgreSQL cannot hold NUL in text at all, a NUL escaped in the stored
# JSON breaks every jsonb read of the series table, and the others break logs, Slack messages and dashboards.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The store's columns (collector/store/schema.py, migration 0001): series.metric, series.node, series.uuid.
MAX_NAME_CHARS = 200
NODE_CHARS, UUID_CHARS = 253, 64
REASONS = (
    "too_many_series",
    "too_many_samples",
    "too_many_labels",
    "metric_name",
    "label_name",
    "duplicate_label",
    "label_length",
    "control_character",
    "timestamp",
    "store_refused",
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a whole request is refused: ``reason`` (one of :data:`REASONS`), ``message`` (for the sender:
    the field and the fix; never SQL) and the HTTP ``status``."""

    reason: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class Window:
    """The sample times the collector takes, in Unix ms: from ``now - max_past`` (never before 1970) to
    ``now + max_future``; ``max_past_s`` None: back to 1970."""

    max_future_s: float
    max_past_s: float | None

    def bounds(self, now_ms: int) -> tuple[int, int]:
        lo = 0 if self.max_past_s is None else max(0, now_ms - int(self.max_past_s * 1000))
        return lo, now_ms + int(self.max_future_s * 1000)

    def flags(self) -> str:
        past = "1970" if self.max_past_s is None else format_duration(self.max_past_s)
        return f"--max-past {past}, --max-future {format_duration(self.max_future_s)}"


def check_label_sets(
    sets: Iterable[rw.LabelSet], *, max_labels: int, max_label_length: int
) -> Refusal | None:
    """The first label set that breaks a rule, as a refusal; None when every one is fine."""
    for ls in sets:
        labels = ls.labels
        name = ls.name
        if not name:
            return Refusal(
                "metric_name",
                f"a series has no __name__ label (labels {describe(labels)}); give every series a metric name",
            )
        if len(name) > MAX_NAME_CHARS:
            return Refusal(
                "metric_name",
                f"metric name {_show(name)} is {len(name)} characters, over the store's limit of "
                f"{MAX_NAME_CHARS}; shorten it",
            )
        if not METRIC_NAME.match(name):
            return Refusal(
                "metric_name",
                f"__name__ {_show(name)} is not a metric name (letters, digits, _ and :, not starting with a "
                "digit), so its series could never be queried; rename it",
            )
        if len(labels) > max_labels:
            return Refusal(
                "too_many_labels", f"series {name} has {len(labels)} labels, over the limit of {max_labels}"
            )
        if ls.repeated is not None:
            return Refusal(
                "duplicate_label",
                f"series {describe(labels)} has the label {_show(ls.repeated)} more than once; send each "
                "label name once per series",
            )
        # One pass of C code per label set for what nearly every one passes; the label at fault is looked
        # for only when one fails (a new series' first request is checked here, at fleet scale 42,000 at once).
        joined = ",".join(labels)  # "__name__" is a label name too; a name holding "," is one no more
        if not LABEL_NAMES.match(joined) or joined.count(",") != len(labels) - 1:
            k = next(k for k in labels if not LABEL_NAME.match(k))
            return Refusal("label_name", f"series {name}: {k!r} is not a valid label name")
        text = "".join(labels.values())  # every value at once: most label sets are far within the limits
        if len(text) > max_label_length and max(map(len, labels.values())) > max_label_length:
            k, v = next((k, v) for k, v in labels.items() if len(v) > max_label_length)
            return Refusal(
                "label_length",
                f"series {name}: label {k} is {len(v)} characters, over the limit of {max_label_length}",
            )
        if len(labels.get("node", "")) > NODE_CHARS or len(labels.get("uuid", "")) > UUID_CHARS:
            k, column = (
                ("node", NODE_CHARS) if len(labels.get("node", "")) > NODE_CHARS else ("uuid", UUID_CHARS)
            )
            return Refusal(
                "label_length",
                f"series {name}: label {k} is {len(labels[k])} characters, over the store's limit of "
                f"{column} for {k}; shorten it",
            )
        if CONTROL.search(text):
            k, bad = next((k, m) for k, v in labels.items() if (m := CONTROL.search(v)))
            return Refusal(
                "control_character",
                f"series {describe(labels)}: the value of label {k} holds the control character "
                f"U+{ord(bad.group()):04X}; label values must be printable text: remove it",
            )
    return None


def check_times(timestamps: Sequence[Sequence[int]], lo: int, hi: int) -> int | None:
    """The index of the first series with a sample outside ``[lo, hi]`` (Unix ms), or None. Series sampled at
    the same instants share one list of timestamps: each list is looked at once, with C-level min and max."""
    last: Sequence[int] | None = None
    for ts in timestamps:
        if ts is last:
            continue
        last = ts
        if ts and (min(ts) < lo or max(ts) > hi):
            return next(i for i, seen in enumerate(timestamps) if seen is ts)
    return None


def time_refusal(ls: rw.LabelSet, timestamps: Sequence[int], lo: int, hi: int, window: Window) -> Refusal:
    early = min(timestamps)
    at, where = (early, "before") if early < lo else (min(t for t in timestamps if t > hi), "after")
    return Refusal(
        "timestamp",
        f"series {describe(ls.labels)} has a sample at {_when(at)}, {where} the window the collector takes "
        f"({_when(lo)} to {_when(hi)}: {window.flags()}); set the sender's clock right, or widen the window "
        "with those flags",
    )


def describe(labels: dict[str, str], limit: int = 160) -> str:
    """A series as PromQL writes it, values escaped, cut at ``limit`` characters (for messages and logs)."""
    name = labels.get("__name__", "")
    inner = ",".join(f"{k}={_show(v)}" for k, v in labels.items() if k != "__name__")
    text = f"{_show(name) if not METRIC_NAME.match(name) else name}{{{inner}}}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(text: str, limit: int = 60) -> str:
    """A label value in double quotes, control characters escaped, cut at ``limit`` characters."""
    body = text if len(text) <= limit else text[:limit] + "…"
    return '"' + CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", body.replace('"', '\\"')) + '"'


def _when(ms: int) -> str:
    try:
        return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms since 1970"


class RefusalLog:
    """Logs refusals at warning, one line per reason a minute at most; the lines held back are counted in
    the next one (every refusal is in ``gpufleet_collector_refused_samples_total`` either way)."""

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._lines = LineLimit(every_s, clock)

    def note(self, refusal: Refusal, samples: int) -> None:
        held = self._lines.take(refusal.reason)
        if held is None:
            return
        more = held.since_last("refused for this reason")
        log.warning(
            "refused a write of %d samples (%s): %s%s", samples, refusal.reason, refusal.message, more
        )
