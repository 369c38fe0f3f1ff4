"""Slack notifier through slack-sdk: one Block Kit message per alert group, edited in place as the group
changes and on resolve (``chat.update``), with each change also replied in the message's thread.

The notifier sends once and classifies the answer; the engine's send queue keeps a burst of alerts in order
and retries rate limits and server errors. The engine keeps where a group's message landed ``(channel, ts)``
and hands it back as ``previous``, so a restarted collector still edits the right message.
"""

from __future__ import annotations

import logging
import shlex
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler, ServerErrorRetryHandler

from gpufleet.collector.rules.contract import Delivery
from gpufleet.collector.rules.dispatch import GroupNotification, Notification
from gpufleet.core.labels import Matcher
from gpufleet.core.retry import Verdict, classify, parse_retry_after

log = logging.getLogger(__name__)

COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4", "resolved": "#2ca02c"}
MAX_ALERTS_LISTED = 10
MAX_VALUES_SHOWN = 4  # distinct values a field lists before "+N more" (a phone screen is narrow)
MAX_LINK_VALUES = 8  # values one dashboard variable is narrowed to; more and the link leaves it at All
WINDOW_MS = 15 * 60_000  # the dashboard's time range starts this long before the first alert
SILENCE_DURATION = "2h"
# Left out of the group's silence even when every alert has the same value: these change while the fault stays
# the same (an escalating rule raises the severity, each XID code is its own event, a Job's pod restarts on the
# same GPU under a new name), so a silence that names them would let the next page through.
VOLATILE_LABELS = frozenset({"severity", "xid", "pod"})
# The order matchers and fields are written in: what the alert is, then where; other labels follow sorted.
LABEL_ORDER = ("alertname", "cluster", "node", "gpu", "uuid", "namespace", "container", "job")


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def mrkdwn_escape(text: str) -> str:
    """Text as Slack's mrkdwn wants it: ``&``, ``<`` and ``>`` as entities (Slack's "Escaping text"), so a label
    value such as ``<!channel>`` or ``<https://x|Click here>`` shows as written instead of paging the channel or
    hiding a link. Slack shows the entities as the characters again, in code blocks too."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _order(name: str) -> tuple[int, str]:
    return (LABEL_ORDER.index(name) if name in LABEL_ORDER else len(LABEL_ORDER), name)


def _distinct(alerts: Sequence[Notification], key: str) -> list[str]:
    """The values of a label across the alerts, in alert order, each once (alerts without it left out)."""
    return list(dict.fromkeys(a.labels[key] for a in alerts if a.labels.get(key)))


def _listed(values: list[str]) -> str:
    shown = ", ".join(values[:MAX_VALUES_SHOWN])
    more = len(values) - MAX_VALUES_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def _pasteable(name: str, value: str) -> bool:
    """Whether ``name=value`` reads back through the CLI as exactly this matcher (it strips quotes and blanks at
    the ends of a value) and fits in a Slack code block."""
    try:
        return Matcher.parse(f"{name}={value}") == Matcher(name, value) and "```" not in value
    except ValueError:
        return False


def silence_matchers(alerts: Sequence[Notification]) -> list[Matcher]:
    """Equality matchers for the labels every alert of the group has with the same value (``alertname`` when
    they are all one rule), less the volatile ones: together they match each of the alerts."""
    if not alerts:
        return []
    first, *rest = alerts
    common = {k: v for k, v in first.labels.items() if v and all(a.labels.get(k) == v for a in rest)}
    return [
        Matcher(k, common[k])
        for k in sorted(common, key=_order)
        if k not in VOLATILE_LABELS and _pasteable(k, common[k])
    ]


def silence_command(
    alerts: Sequence[Notification], collector_url: str | None = None, *, duration: str = SILENCE_DURATION
) -> str | None:
    """One ``gpufleet silence add`` for all the alerts, quoted for a POSIX shell so that it runs as pasted;
    None when they share no label to match on. The token stays out of it: the CLI reads GPUFLEET_TOKEN."""
    matchers = silence_matchers(alerts)
    if not matchers:
        return None
    rules = ", ".join(dict.fromkeys(a.rule for a in alerts))
    args = ["gpufleet", "silence", "add", *(str(m) for m in matchers), "--duration", duration]
    args += ["--comment", f"acknowledged in Slack: {rules}"]
    if collector_url:
        args += ["--collector", collector_url]
    return shlex.join(args)


def grafana_link(base: str, g: GroupNotification) -> str:
    """The dashboard narrowed to the group's GPUs (its ``cluster``, ``node`` and ``gpu`` variables, several
    values each when the group spans GPUs; GPUs only when they are on one node, as the variables combine) from
    15 minutes before the first alert to now while it fires, to 15 minutes after it resolved once it has."""
    alerts = list(g.firing) or list(g.resolved)
    first = min(a.since_ms for a in alerts)
    to = "now" if g.state == "firing" else str(g.at_ms + WINDOW_MS)
    params = [("from", str(first - WINDOW_MS)), ("to", to)]
    nodes = _distinct(alerts, "node")
    for key in ("cluster", "node", "gpu"):
        values = _distinct(alerts, key)
        if key == "gpu" and len(nodes) != 1:
            continue
        # every alert must name the variable: a node-level alert in the group needs all of the node's GPUs
        if all(a.labels.get(key) for a in alerts) and len(values) <= MAX_LINK_VALUES:
            params += [(f"var-{key}", v) for v in values]
    return base + ("&" if "?" in base else "?") + urllib.parse.urlencode(params)


def _where(alerts: Sequence[Notification]) -> str:
    nodes, gpus = _distinct(alerts, "node"), _distinct(alerts, "gpu")
    if len(nodes) > 1:
        return f"{len(nodes)} nodes"
    if len(gpus) > 1:
        return " ".join([*nodes, f"GPUs {_listed(gpus)}"])
    return " ".join([*nodes, *(f"GPU {x}" for x in gpus)])


def _fields(alerts: Sequence[Notification]) -> list[dict[str, Any]]:
    """Where the alerts are and what runs there, each label's values listed once; at most 10 (Block Kit's cap)."""
    pods = list(
        dict.fromkeys(
            "/".join(x for x in (a.labels.get("namespace"), a.labels["pod"]) if x)
            for a in alerts
            if a.labels.get("pod")
        )
    )
    shown: list[tuple[str, list[str]]] = [
        ("Cluster", _distinct(alerts, "cluster")),
        ("Node", _distinct(alerts, "node")),
        ("GPU", _distinct(alerts, "gpu")),
        ("UUID", _distinct(alerts, "uuid")),
        ("Pod", pods),
        ("Container", _distinct(alerts, "container")),
        ("Job", _distinct(alerts, "job")),
        ("XID", _distinct(alerts, "xid")),
    ]
    if len(alerts) == 1 and alerts[0].value is not None:
        shown.append(("Value", [f"{alerts[0].value:.4g}"]))
    shown.append(("Since", [_when(min(a.since_ms for a in alerts))]))
    return [
        {"type": "mrkdwn", "text": f"*{title}*\n{mrkdwn_escape(_listed(values))}"[:2000]}
        for title, values in shown
        if values
    ][:10]


def _silence_block(
    alerts: Sequence[Notification], collector_url: str | None, needs_token: bool
) -> dict[str, Any]:
    cmd = silence_command(alerts, collector_url)
    if cmd is None:
        text = (
            "No one silence covers these alerts (they share no label): "
            "silence them with `gpufleet silence add` and matchers of your own."
        )
    # a section holds 3000 characters, and a command cut short must not be offered
    elif len(mrkdwn_escape(cmd)) > 2800:
        text = "The silence command for these alerts is too long for Slack: write one with fewer labels."
    else:
        token = " with `GPUFLEET_TOKEN` set to a write token" if needs_token else ""
        what = "this alert" if len(alerts) == 1 else f"these {len(alerts)} alerts"
        text = f"*Silence {what} for {SILENCE_DURATION}*{token}:\n```{mrkdwn_escape(cmd)}```"
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def blocks_for(
    g: GroupNotification,
    grafana_url: str | None = None,
    *,
    collector_url: str | None = None,
    needs_token: bool = False,
) -> list[dict[str, Any]]:
    """The message: what and where, a field per label that locates it (several values when the group spans
    GPUs), the runbook and Grafana buttons, and while it fires one silence command for the whole group, run
    against ``collector_url`` (``needs_token``: the collector wants a write token for it)."""
    alerts = list(g.firing) or list(g.resolved)
    first = alerts[0]
    where = _where(alerts)
    if g.state == "resolved":
        head = f"Resolved: {first.rule}" if len(alerts) == 1 else f"Resolved: {len(alerts)} alerts"
    else:
        head = f"[{g.severity.upper()}] " + (first.rule if len(alerts) == 1 else f"{len(alerts)} alerts")
    head += f" on {where}" if where else ""
    if len(alerts) == 1:
        text = mrkdwn_escape(first.annotations.get("summary", first.rule))
    else:
        lines = [
            f"• *{mrkdwn_escape(a.rule)}* ({a.severity}): {mrkdwn_escape(a.annotations.get('summary', ''))}"
            for a in alerts[:MAX_ALERTS_LISTED]
        ]
        if len(alerts) > MAX_ALERTS_LISTED:
            lines.append(f"… and {len(alerts) - MAX_ALERTS_LISTED} more")
        text = "\n".join(lines)
    if g.state == "resolved":
        text = f"~{text}~" if len(alerts) == 1 else text
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": head[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}, "fields": _fields(alerts)},
    ]
    if first.annotations.get("description"):
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": mrkdwn_escape(first.annotations["description"])[:3000]}
                ],
            }
        )
    buttons: list[dict[str, Any]] = []
    for a in alerts:
        url = a.annotations.get("runbook_url")
        if url and url.startswith("http") and all(b["url"] != url for b in buttons):
            buttons.append(
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": f"Runbook: {a.rule}"[:75]},
                    "url": url[:3000],
                }
            )
    buttons = buttons[:4]
    if grafana_url:
        buttons.append(
            {
                "type": "button",
                "text": {"type": "plain_text", "text": "Grafana"},
                "url": grafana_link(grafana_url, g)[:3000],
            }
        )
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    if g.state == "firing":
        blocks.append(_silence_block(g.firing, collector_url, needs_token))
    return blocks


class SlackNotifier:
    """Posts a group's first message with ``chat.postMessage``; later changes edit it (``chat.update``) and
    reply in its thread; a newly more severe alert is also broadcast to the channel from the thread."""

    name = "slack"

    def __init__(
        self,
        client: WebClient,
        channel: str,
        *,
        grafana_url: str | None = None,
        collector_url: str | None = None,
        collector_needs_token: bool = False,
    ) -> None:
        """``collector_url``: the collector as people reach it, for the silence command's ``--collector``;
        ``collector_needs_token``: it takes silences only with a write token (the message says so)."""
        self._client = client
        # slack-sdk itself waits out Retry-After and retries 500/503 a few times; the send queue retries beyond.
        handlers = client.retry_handlers
        if not any(isinstance(h, RateLimitErrorRetryHandler) for h in handlers):
            handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
        if not any(isinstance(h, ServerErrorRetryHandler) for h in handlers):
            handlers.append(ServerErrorRetryHandler(max_retry_count=2))
        self._channel = channel
        self._grafana_url = grafana_url.rstrip("/") if grafana_url else None
        self._collector_url = collector_url.rstrip("/") if collector_url else None
        self._collector_needs_token = collector_needs_token

    def send(self, g: GroupNotification, /) -> Delivery:
        """Post the group's message, or edit it (and reply in its thread) when ``g.previous`` says where it is."""
        try:
            return Delivery(self._deliver(g))
        except SlackApiError as exc:
            return failure(exc, exc.response.status_code, exc.response.headers)
        except OSError as exc:  # connection refused, reset, timeout
            return Delivery.failed(repr(exc), retry=True)

    def _deliver(self, g: GroupNotification) -> tuple[str, str]:
        colour = COLOURS["resolved" if g.state == "resolved" else g.severity]
        blocks = blocks_for(
            g,
            self._grafana_url,
            collector_url=self._collector_url,
            needs_token=self._collector_needs_token,
        )
        # Slack reads the message text as mrkdwn too: label values in it must not turn into mentions or links.
        text = mrkdwn_escape(g.text)
        attachments = [{"color": colour, "blocks": blocks, "fallback": text[:3000]}]
        if g.previous is None:
            resp = self._client.chat_postMessage(channel=self._channel, text=text, attachments=attachments)
            return str(resp["channel"]), str(resp["ts"])
        channel, ts = g.previous
        self._client.chat_update(channel=channel, ts=ts, text=text, attachments=attachments)
        if g.state == "resolved":
            reply = "Resolved: " + "; ".join(
                f"{n.rule} ({n.annotations.get('summary', '')})" for n in g.resolved
            )
        elif g.repeat:
            reply = "Still firing: " + "; ".join(n.rule for n in g.firing)
        else:
            reply = (
                "; ".join(
                    ("Resolved: " if n.state == "resolved" else f"Now firing ({n.severity}): ") + n.text
                    for n in g.changes
                )
                or g.text
            )
        self._client.chat_postMessage(
            channel=channel,
            thread_ts=ts,
            text=mrkdwn_escape(reply)[:4000],
            reply_broadcast=bool(g.escalated),
        )
        return channel, ts


def failure(exc: Exception, status: int, headers: dict[str, Any]) -> Delivery:
    """A refused Slack call as a delivery, classified by the one retry policy: a rate limit (429, waiting
    ``Retry-After``) and a server error are worth a retry; a bad token, an unknown channel or a malformed
    message is not."""
    if classify(status) is not Verdict.RETRY:
        return Delivery.failed(str(exc), retry=False)
    retry_after = next(
        (v[0] if isinstance(v, list) else v for k, v in headers.items() if k.lower() == "retry-after"), None
    )
    wait = parse_retry_after(str(retry_after)) if retry_after is not None else None
    return Delivery.failed(
        str(exc), retry=True, retry_after_s=1.0 if wait is None and status == 429 else wait
    )
