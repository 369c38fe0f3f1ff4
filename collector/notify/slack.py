"""Slack notifier through slack-sdk: a Block Kit message per alert, edited in place on resolve."""

from __future__ import annotations

import logging
import time
from typing import Any

from collector.rules.engine import Notification

log = logging.getLogger(__name__)

COLOURS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4", "resolved": "#2ca02c"}


def blocks_for(n: Notification) -> list[dict[str, Any]]:
    labels = n.labels
    head = ("Resolved: " if n.state == "resolved" else "") + f"{n.rule} ({n.severity})"
    fields = []
    for key, title in (("cluster", "Cluster"), ("node", "Node"), ("gpu", "GPU"), ("uuid", "UUID"), ("pod", "Pod"),
                       ("xid", "XID")):
        if key in labels:
            fields.append({"type": "mrkdwn", "text": f"*{title}*\n{labels[key]}"})
    if n.value is not None:
        fields.append({"type": "mrkdwn", "text": f"*Value*\n{n.value:g}"})
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(n.since_ms / 1000))
    fields.append({"type": "mrkdwn", "text": f"*Since*\n{since}"})
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": head[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": n.annotations.get("summary", n.rule)[:3000]},
         "fields": fields[:10]},
    ]
    if n.annotations.get("description"):
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                         "text": n.annotations["description"][:3000]}]})
    if n.annotations.get("runbook_url"):
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Runbook"}, "url": n.annotations["runbook_url"]}]})
    return blocks


class SlackNotifier:
    """Posts with ``chat.postMessage``; on resolve edits the original with ``chat.update`` and replies in its thread."""

    name = "slack"

    def __init__(self, client: Any, channel: str) -> None:
        self._client = client  # slack_sdk.WebClient (base_url configurable)
        self._channel = channel

    def send(self, n: Notification, previous: tuple[str, str] | None) -> tuple[str, str] | None:
        colour = COLOURS["resolved" if n.state == "resolved" else n.severity]
        attachments = [{"color": colour, "blocks": blocks_for(n), "fallback": n.text}]
        if n.state == "resolved" and previous is not None:
            channel, ts = previous
            self._client.chat_update(channel=channel, ts=ts, text=n.text, attachments=attachments)
            self._client.chat_postMessage(channel=channel, thread_ts=ts, text=f"Resolved: {n.text}")
            return channel, ts
        resp = self._client.chat_postMessage(channel=self._channel, text=n.text, attachments=attachments)
        return resp["channel"], resp["ts"]
