"""The seams of the alerting path: what the engine needs from its state, its data and its notifiers.

The engine evaluates rules and keeps alerts moving between states; an :class:`AlertState` keeps what must
survive a restart or a change of leader; a :class:`Notifier` sends one group notification once and says,
in a :class:`Delivery`, where the message landed or whether a retry can help. Retrying is not the
notifier's business: the send queue (``gpufleet.collector.notify.queue``) retries for every integration,
as Alertmanager's notify pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the dispatcher imports the rule model, which imports the rule kinds, which import this
    from gpufleet.collector.rules.dispatch import GroupNotification, Silence, Target

__all__ = ["AlertState", "Delivery", "LatestPoint", "Notifier", "View"]


@dataclass(frozen=True)
class Delivery:
    """The outcome of one attempt to send a group notification.

    ``target`` is where the message landed (Slack channel and message ts, or ``("grafana", annotation id)``):
    the engine keeps it per group episode and hands it back as ``GroupNotification.previous``, so later
    notifications of the group edit that message. On failure, ``error`` says why and ``retry`` whether
    sending the same message again can succeed (a rate limit, a server error, a dropped connection) or not
    (a bad token, an unknown channel); ``retry_after_s`` is the wait the remote side asked for, if any."""

    target: Target | None = None
    error: str | None = None
    retry: bool = False
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, error: str, *, retry: bool, retry_after_s: float | None = None) -> Delivery:
        return cls(None, error, retry, retry_after_s)


class Notifier(Protocol):
    """One integration. ``send`` tries once; the send queue decides about retries."""

    name: str

    def send(self, group: GroupNotification, /) -> Delivery: ...


class LatestPoint(Protocol):
    """The newest sample of one series."""

    @property
    def labels(self) -> dict[str, str]: ...

    @property
    def ts(self) -> int: ...

    @property
    def value(self) -> float: ...


class View(Protocol):
    """Where the engine reads the newest sample of every series (the store, or a replayed trace)."""

    def latest(self, metric: str | None = None) -> Sequence[LatestPoint]: ...


class AlertState(Protocol):
    """What the engine and its dispatcher keep across restarts and leader changes.

    Alerts and notification groups are JSON-shaped rows (``id``, ``rule``, ``state``, ``labels``, …, as the
    engine and dispatcher write them); rule memory is the last counter value an event rule saw per series;
    rule state is what a rule keeps per key (escalation history, a node's known GPUs)."""

    def load_alerts(self) -> list[dict[str, Any]]: ...

    def save_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None: ...

    def load_rule_memory(self) -> dict[tuple[str, int], float]: ...

    def save_rule_memory(self, items: Mapping[tuple[str, int], float], now_ms: int) -> None: ...

    def load_rule_state(self) -> dict[tuple[str, str], Any]: ...

    def save_rule_state(self, items: Mapping[tuple[str, str], Any], now_ms: int) -> None: ...

    def load_groups(self) -> list[dict[str, Any]]: ...

    def save_groups(self, rows: Sequence[Mapping[str, Any]], deleted: Sequence[str]) -> None: ...

    def group_target(self, episode: str, notifier: str) -> Target | None: ...

    def save_group_target(self, episode: str, notifier: str, where: Target) -> None: ...

    def record_notification(
        self,
        *,
        alert_id: str,
        notifier: str,
        state: str,
        channel: str | None,
        message_ts: str | None,
        sent_at: int,
        text: str,
    ) -> None: ...

    def active_silences(self, now_ms: int) -> list[Silence]: ...
