"""Slack notifier through slack-sdk: one Block Kit message per alert group, edited in place as the group
changes and on resolve (``chat.update``), with each change also replied in the message's thread.

The notifier sends once and classifies the answer; the engine's send queue keeps a burst of alerts in order
and retries rate limits and server errors. The engine keeps where a group's message landed ``(channel, ts)``
and hands it back as ``previous``, so a restarted collector still edits the right message.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler, ServerErrorRetryHandler

from gpufleet.collector.rules.contract import Delivery
from gpufleet.collector.rules.dispatch import GroupNotification, Notification
from gpufleet.core.retry import Verdict, classify, parse_retry_after

log = logging.getLogger(__name__)

COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4", "resolved": "#2ca02c"}
MAX_ALERTS_LISTED = 10


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def silence_command(n: Notification) -> str:
    keys = [k for k in ("alertname", "cluster", "node", "uuid", "xid") if n.labels.get(k)]
    matchers = " ".join(f"{k}={n.labels[k]}" for k in keys)
    return f'gpufleet silence add {matchers} --duration 2h --author $USER --comment "…"'


def grafana_link(base: str, g: GroupNotification) -> str:
    """The dashboard for this GPU (or node), from 15 minutes before the first alert to 15 after the message."""
    first = min(a.since_ms for a in (g.firing or g.resolved))
    params = {"from": str(first - 15 * 60_000), "to": str(g.at_ms + 15 * 60_000)}
    for k in ("cluster", "node", "uuid"):
        if g.labels.get(k):
            params[f"var-{k}"] = g.labels[k]
    return base + ("&" if "?" in base else "?") + urllib.parse.urlencode(params)


def blocks_for(g: GroupNotification, grafana_url: str | None = None) -> list[dict[str, Any]]:
    alerts = list(g.firing) or list(g.resolved)
    first = alerts[0]
    labels = {**first.labels, **g.labels}
    where = " ".join(
        x for x in (labels.get("node", ""), f"GPU {labels['gpu']}" if "gpu" in labels else "") if x
    )
    if g.state == "resolved":
        head = f"Resolved: {first.rule}" if len(alerts) == 1 else f"Resolved: {len(alerts)} alerts"
    else:
        head = f"[{g.severity.upper()}] " + (first.rule if len(alerts) == 1 else f"{len(alerts)} alerts")
    head += f" on {where}" if where else ""
    fields = []
    for key, title in (
        ("cluster", "Cluster"),
        ("node", "Node"),
        ("gpu", "GPU"),
        ("uuid", "UUID"),
        ("pod", "Pod"),
        ("xid", "XID"),
    ):
        if labels.get(key):
            fields.append({"type": "mrkdwn", "text": f"*{title}*\n{labels[key]}"[:2000]})
    if first.value is not None:
        fields.append({"type": "mrkdwn", "text": f"*Value*\n{first.value:.4g}"})
    fields.append({"type": "mrkdwn", "text": f"*Since*\n{_when(min(a.since_ms for a in alerts))}"})
    if len(alerts) == 1:
        text = first.annotations.get("summary", first.rule)
    else:
        lines = [
            f"• *{a.rule}* ({a.severity}): {a.annotations.get('summary', '')}"
            for a in alerts[:MAX_ALERTS_LISTED]
        ]
        if len(alerts) > MAX_ALERTS_LISTED:
            lines.append(f"… and {len(alerts) - MAX_ALERTS_LISTED} more")
        text = "\n".join(lines)
    if g.state == "resolved":
        text = f"~{text}~" if len(alerts) == 1 else text
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": head[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}, "fields": fields[:10]},
    ]
    if first.annotations.get("description"):
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": first.annotations["description"][:3000]}],
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
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"Silence: `{silence_command(first)}`"[:3000]}],
            }
        )
    return blocks


class SlackNotifier:
    """Posts a group's first message with ``chat.postMessage``; later changes edit it (``chat.update``) and
    reply in its thread; a newly more severe alert is also broadcast to the channel from the thread."""

    name = "slack"

    def __init__(self, client: WebClient, channel: str, *, grafana_url: str | None = None) -> None:
        self._client = client
        # slack-sdk itself waits out Retry-After and retries 500/503 a few times; the send queue retries beyond.
        handlers = client.retry_handlers
        if not any(isinstance(h, RateLimitErrorRetryHandler) for h in handlers):
            handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
        if not any(isinstance(h, ServerErrorRetryHandler) for h in handlers):
            handlers.append(ServerErrorRetryHandler(max_retry_count=2))
        self._channel = channel
        self._grafana_url = grafana_url.rstrip("/") if grafana_url else None

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
        attachments = [
            {"color": colour, "blocks": blocks_for(g, self._grafana_url), "fallback": g.text[:3000]}
        ]
        if g.previous is None:
            resp = self._client.chat_postMessage(channel=self._channel, text=g.text, attachments=attachments)
            return str(resp["channel"]), str(resp["ts"])
        channel, ts = g.previous
        self._client.chat_update(channel=channel, ts=ts, text=g.text, attachments=attachments)
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
            channel=channel, thread_ts=ts, text=reply[:4000], reply_broadcast=bool(g.escalated)
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
