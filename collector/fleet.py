"""The fleet summary behind `/api/v1/fleet`: every GPU by node with the numbers a person scans first
(SM activity next to utilization, memory, temperature, power, throttle reasons) and the alerts on it, each
node's worst GPU, and the fleet's totals.

The fleet page and `gpufleet top` both read this one JSON shape, so they show the same numbers.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from gpufleet.collector.store.reads import GpuRecord, SeriesKey, key_parts

# Clock-event reasons that mean "the GPU runs slower than it could". gpu_idle, applications_clocks,
# display_clocks and sync_boost are set on healthy GPUs and are not shown as throttling.
SLOWDOWN_REASONS = ("hw_thermal", "sw_thermal", "hw_slowdown", "hw_power_brake", "sw_power_cap")

_VALUES = {
    "sm_active": "gpufleet_gpu_sm_active_ratio",
    "utilization": "gpufleet_gpu_utilization_ratio",
    "tensor_active": "gpufleet_gpu_tensor_active_ratio",
    "dram_active": "gpufleet_gpu_dram_active_ratio",
    "memory_used_bytes": "gpufleet_gpu_memory_used_bytes",
    "memory_total_bytes": "gpufleet_gpu_memory_total_bytes",
    "temperature_celsius": "gpufleet_gpu_temperature_celsius",
    "slowdown_temperature_celsius": "gpufleet_gpu_slowdown_temperature_celsius",
    "power_watts": "gpufleet_gpu_power_watts",
    "power_limit_watts": "gpufleet_gpu_power_limit_watts",
    "sm_clock_hertz": "gpufleet_gpu_sm_clock_hertz",
}
FLEET_POLL_S = 2.0  # how old a fleet answer may be: under half the page's 5-second poll
# GPUs /api/v1/fleet lists (its totals count every GPU): twice a fleet of 10,000, so a real fleet is listed
# whole while a client that invents GPUs by the hundred thousand cannot make every poll tens of megabytes.
FLEET_MAX_GPUS = 20_000
MAX_GPUS_PER_NODE = 128  # 8 GPUs of 7 MIG instances each is 56
MAX_ALERTS_LISTED = 2_000  # the fleet's active alerts listed, firing and critical first; all are counted
GPUS_PAGE = 2_000  # GPUs of one page of /api/v1/gpus unless `limit` says otherwise
FLEET_WATCH_S = 15.0  # worked out ahead while asked for at least this often (3 of the page's polls)
# Once nobody asks, the fleet answers are still worked out every FLEET_WARM_MIN_S or so, for at most
# FLEET_KEEP_WARM of a core, so the first page opened after a quiet spell answers at once.
FLEET_WARM_MIN_S = 10.0
FLEET_KEEP_WARM = 0.01
# How old a fleet answer may be, as PerPoll._may_hand_out allows it (the API's descriptions say so).
FLEET_AGE = (
    f"worked out every {FLEET_POLL_S:g} s while polled, so at most {3 * FLEET_POLL_S:g} s old; the first call "
    f"after a quiet spell may get the answer kept warm, up to {FLEET_WARM_MIN_S + 3 * FLEET_POLL_S:g} s old "
    f"(longer where one build takes over {FLEET_KEEP_WARM * FLEET_WARM_MIN_S:g} s); `generated_at` says"
)
log = logging.getLogger(__name__)
_IDENTITY = ("uuid", "gpu", "node", "cluster", "model", "pod", "namespace", "container")

# A GPU's status, worst first: what its node's row shows when the node is collapsed. A GPU that NVML lost,
# then one with a critical alert firing, one with another alert firing, one that stopped reporting, one
# with an alert pending, one whose clocks are held down; among equals, the one doing the least work.
STATUSES = ("lost", "critical", "warning", "stale", "pending", "throttled", "ok")
_RANK = {s: i for i, s in enumerate(STATUSES)}


def _finite(x: Any) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def _alert_view(a: Mapping[str, Any]) -> dict[str, Any]:
    labels = a.get("labels", {})
    annotations = a.get("annotations", {})
    since = a.get("active_since")
    return {
        "rule": a["rule"],
        "state": a["state"],
        "severity": labels.get("severity", "none"),
        "summary": annotations.get("summary", ""),
        "description": annotations.get("description", ""),
        "runbook_url": annotations.get("runbook_url"),
        "cluster": labels.get("cluster"),
        "node": labels.get("node"),
        "gpu": labels.get("gpu"),
        "uuid": labels.get("uuid"),
        "pod": labels.get("pod"),
        "namespace": labels.get("namespace"),
        "labels": dict(labels),
        "value": _finite(a.get("value")),
        "active_since": since / 1000.0 if isinstance(since, int | float) and since > 1e11 else since,
    }


def gpu_status(v: Mapping[str, Any]) -> str:
    """One word for a GPU of the fleet view (see STATUSES)."""
    if not v["up"]:
        return "lost"
    firing = [a["severity"] for a in v["alerts"] if a["state"] == "firing"]
    if firing:
        return "critical" if "critical" in firing else "warning"
    if v["stale"]:
        return "stale"
    if v["alerts"]:
        return "pending"
    return "throttled" if v["throttle"] else "ok"


def gpu_view(g: GpuRecord, alerts: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One GPU of `Store.gpus()` as the page and `top` show it."""
    identity = g.identity
    out: dict[str, Any] = {k: identity.get(k) for k in _IDENTITY}
    out["uuid"] = g.uuid
    out.update(up=g.up, stale=g.stale, last_seen=g.last_seen)
    values = g.values
    for name, metric in _VALUES.items():
        out[name] = values.get(metric)
    throttle: list[str] = []
    xids = 0.0
    ecc = {"corrected": 0.0, "uncorrected": 0.0}
    for key, value in values.items():  # one pass over the GPU's series
        if key[-1] != "}":  # no labels beyond identity
            continue
        role = _ROLES.get(key)
        if role is None:
            role = _role(key)
        kind, what = role
        if kind == "throttle":
            if value >= 1:
                throttle.append(what)
        elif kind == "xid":
            xids += value
        elif kind == "ecc":
            ecc[what] += value
    out["throttle"] = sorted(throttle, key=SLOWDOWN_REASONS.index) if throttle else throttle
    out["xid_errors"] = xids
    out["ecc_errors"] = ecc
    used, total = out["memory_used_bytes"], out["memory_total_bytes"]
    out["memory_ratio"] = used / total if used is not None and total else None
    out["alerts"] = [
        {"rule": a["rule"], "state": a["state"], "severity": a["severity"], "runbook_url": a["runbook_url"]}
        for a in alerts
    ]
    out["status"] = gpu_status(out)
    return out


# What a labelled series of a GPU counts for in its view: ("throttle", reason) for a slowdown clock event,
# ("xid", "") for an XID counter, ("ecc", type) for a volatile ECC counter, ("", "") for the rest; worked out
# once per series key.
_ROLES: dict[SeriesKey, tuple[str, str]] = {}


def _role(key: SeriesKey) -> tuple[str, str]:
    metric, named = key_parts(key)
    role = ("", "")
    if metric == "gpufleet_gpu_clock_event_active" and named.get("reason") in SLOWDOWN_REASONS:
        role = ("throttle", named["reason"])
    elif metric == "gpufleet_gpu_xid_errors_total":
        role = ("xid", "")
    elif (
        metric == "gpufleet_gpu_ecc_errors_total"
        and named.get("scope") == "volatile"
        and named.get("type") in ("corrected", "uncorrected")
    ):
        role = ("ecc", named["type"])
    if len(_ROLES) >= 100_000:  # series churn: start over
        _ROLES.clear()
    _ROLES[key] = role
    return role


def _worse_first(v: Mapping[str, Any]) -> tuple[int, float]:
    sm = v["sm_active"]
    return (_RANK[v["status"]], sm if sm is not None else -1.0)


def fleet_summary(
    gpus: Iterable[GpuRecord],
    alerts: list[Mapping[str, Any]],
    now: float | None = None,
    *,
    max_gpus: int = FLEET_MAX_GPUS,
) -> dict[str, Any]:
    """GPUs grouped by (cluster, node), each node's worst GPU and status, active alerts with runbooks, and
    fleet totals. Past ``max_gpus`` GPUs (or ``MAX_GPUS_PER_NODE`` on a node, ``MAX_ALERTS_LISTED`` alerts)
    the lists are cut and ``truncated`` says what was left out; the totals always count everything."""
    now = time.time() if now is None else now
    alert_views = [_alert_view(a) for a in alerts]
    by_uuid: dict[str, list[dict[str, Any]]] = {}
    for a in alert_views:
        if a["uuid"]:
            by_uuid.setdefault(a["uuid"], []).append(a)
    nodes: dict[tuple[str, str], dict[str, Any]] = {}
    views = []
    for g in gpus:
        v = gpu_view(g, by_uuid.get(g.uuid, ()))
        views.append(v)
        key = (v["cluster"] or "", v["node"] or "")
        node = nodes.get(key)
        if node is None:
            node = nodes[key] = {"cluster": v["cluster"], "node": v["node"], "gpus": []}
        node["gpus"].append(v)
    for node in nodes.values():
        worst = min(node["gpus"], key=_worse_first)
        node["worst"] = worst["uuid"]
        node["status"] = worst["status"]
        node["alerts_firing"] = sum(a["state"] == "firing" for g in node["gpus"] for a in g["alerts"])

    live = [v for v in views if v["up"] and not v["stale"]]

    def mean(name: str) -> float | None:
        xs = [v[name] for v in live if v[name] is not None]
        return sum(xs) / len(xs) if xs else None

    firing = [a for a in alert_views if a["state"] == "firing"]
    totals = {
        "gpus": len(views),
        "up": len(live),
        "down": sum(not v["up"] for v in views),
        "stale": sum(v["stale"] for v in views),
        "nodes": len(nodes),
        "throttled": sum(bool(v["throttle"]) for v in views),
        "alerts_firing": len(firing),
        "alerts_pending": len(alert_views) - len(firing),
        "power_watts": sum(v["power_watts"] or 0.0 for v in live),
        "sm_active": mean("sm_active"),
        "utilization": mean("utilization"),
        "memory_used_bytes": sum(v["memory_used_bytes"] or 0.0 for v in views),
        "memory_total_bytes": sum(v["memory_total_bytes"] or 0.0 for v in views),
    }
    doc: dict[str, Any] = {
        "generated_at": now,
        "totals": totals,
        "nodes": list(nodes.values()),
        "alerts": alert_views,
    }
    if (
        len(views) > max_gpus
        or len(alert_views) > MAX_ALERTS_LISTED
        or any(len(n["gpus"]) > MAX_GPUS_PER_NODE for n in nodes.values())
    ):
        _cut(doc, max_gpus)
    return doc


def _cut(doc: dict[str, Any], max_gpus: int) -> None:
    """Cut the fleet's lists to their bounds and say so in ``truncated``. Each cluster gets an equal share
    of ``max_gpus`` (what a small cluster leaves goes to the others), so one cluster that holds an endless
    number of GPUs does not push the other clusters' GPUs out of the list."""
    omitted_gpus = 0
    for node in doc["nodes"]:
        listed = node["gpus"]
        if len(listed) > MAX_GPUS_PER_NODE:  # the worst of them, in their order
            keep = {id(v) for v in sorted(listed, key=_worse_first)[:MAX_GPUS_PER_NODE]}
            node["gpus"] = [v for v in listed if id(v) in keep]
            node["gpus_omitted"] = len(listed) - MAX_GPUS_PER_NODE
            omitted_gpus += node["gpus_omitted"]
    by_cluster: dict[str, list[dict[str, Any]]] = {}
    for node in doc["nodes"]:
        by_cluster.setdefault(node["cluster"] or "", []).append(node)
    share = _shares({c: sum(len(n["gpus"]) for n in ns) for c, ns in by_cluster.items()}, max_gpus)
    kept_nodes = []
    omitted_nodes = 0
    for cluster, ns in by_cluster.items():
        room = share[cluster]
        for node in ns:
            if len(node["gpus"]) <= room:
                room -= len(node["gpus"])
                kept_nodes.append(node)
            else:
                omitted_nodes += 1
                omitted_gpus += len(node["gpus"])
                room = 0  # in fleet order: no node after one left out
    doc["nodes"] = kept_nodes
    alerts = doc["alerts"]
    omitted_alerts = max(0, len(alerts) - MAX_ALERTS_LISTED)
    if omitted_alerts:
        rank = {"critical": 0}
        doc["alerts"] = sorted(alerts, key=lambda a: (a["state"] != "firing", rank.get(a["severity"], 1)))[
            :MAX_ALERTS_LISTED
        ]
    listed = sum(len(n["gpus"]) for n in kept_nodes)
    doc["truncated"] = {
        "gpus_listed": listed,
        "gpus_omitted": omitted_gpus,
        "nodes_omitted": omitted_nodes,
        "alerts_omitted": omitted_alerts,
        "message": (
            f"{doc['totals']['gpus']} GPUs: {listed} listed, at most {MAX_GPUS_PER_NODE} a node and "
            f"{max_gpus} in all (--fleet-max-gpus), shared evenly between clusters; "
            f"{omitted_alerts} alerts not listed. The totals count every GPU; filter by cluster with a token "
            "scoped to it, or read every GPU page by page from /api/v1/gpus"
        ),
    }


def _shares(need: Mapping[str, int], total: int) -> dict[str, int]:
    """Split ``total`` between clusters needing ``need``: equal shares, a cluster's unused part to the rest."""
    share: dict[str, int] = {}
    left = dict(need)
    room = total
    while left:
        each = room // len(left)
        small = {c: n for c, n in left.items() if n <= each}
        if not small:
            for c in left:
                share[c] = each
            break
        for c, n in small.items():
            share[c] = n
            room -= n
            del left[c]
    return share


def gpus_document(
    gpus: Sequence[GpuRecord], offset: int = 0, limit: int = GPUS_PAGE, path: str = "/api/v1/gpus"
) -> dict[str, Any]:
    """One page of `/api/v1/gpus`: the GPUs from ``offset`` (in fleet order: cluster, node, GPU index), at most
    ``limit`` of them, the count of all, and ``next``: the address of the next page, None on the last."""
    page = gpus[offset : offset + limit]
    more = offset + len(page) < len(gpus)
    return {
        "gpus": [g.to_api() for g in page],
        "total": len(gpus),
        "offset": offset,
        "next": f"{path}?offset={offset + len(page)}&limit={limit}" if more else None,
    }


class JsonBody:
    """An answer encoded once for every client that asks within a poll: compact JSON, and gzipped the first
    time a client accepts that (the fleet of 1,000 GPUs is about 1 MB of JSON, a tenth of that gzipped)."""

    def __init__(self, doc: Any) -> None:
        try:
            text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except ValueError:  # a value that is not a finite number (an alert's NaN): null, as JSON has no NaN
            text = json.dumps(_nulled(doc), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        self.raw = text.encode()
        self._gzipped: bytes | None = None
        self._lock = threading.Lock()

    def gzipped(self) -> bytes:
        with self._lock:
            if self._gzipped is None:
                self._gzipped = gzip.compress(self.raw, compresslevel=1, mtime=0)
            return self._gzipped


def _nulled(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _nulled(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nulled(v) for v in x]
    return x


T = TypeVar("T")


class PerPoll(Generic[T]):
    """A value worked out at most once per ``ttl_s``: callers within that time share it, and one that comes
    while it is being worked out waits for that result instead of working it out again. However many
    pages and `gpufleet top`s poll the fleet, the store is read and the answer encoded once a poll.

    ``ahead``: while calls keep coming (one in the last ``watch_s``), a thread of its own works the value out
    again every ``ttl_s``, so a call answers at once with a value at most ``ttl_s`` and one build old
    instead of waiting for a build behind the collector's writes and rule evaluations. Only the first
    call after a quiet spell, or one that finds the value older than ``3 * ttl_s``, waits for a build.

    ``keep_warm`` (a share of one core, with ``ahead``): once calls stop, the thread goes on working the
    value out, less often: every ``warm_min_s`` at the most, and never more often than keeps its builds
    (timed from start to end) under that share of the time. A call after a quiet spell then answers at once
    with that value, and the thread is back to every ``ttl_s`` for the calls after it."""

    def __init__(
        self,
        build: Callable[[], T],
        ttl_s: float,
        *,
        ahead: bool = False,
        watch_s: float = FLEET_WATCH_S,
        keep_warm: float = 0.0,
        warm_min_s: float = FLEET_WARM_MIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._ttl_s = ttl_s
        self._ahead = ahead
        self._watch_s = watch_s
        if keep_warm and not ahead:
            raise ValueError(
                "keep_warm needs ahead=True: only the thread that works the value out ahead keeps it warm"
            )
        self._keep_warm = keep_warm
        self._warm_min_s = warm_min_s
        self._clock = clock
        self._lock = threading.Lock()  # the value, its time, the last call, the refresher
        self._building = threading.Lock()  # one build at a time
        self._value: T | None = None
        self._at = -math.inf
        self._build_s = 0.0  # how long the last build took
        self._called = -math.inf
        self._refresher: threading.Thread | None = None
        self._called_again = threading.Event()  # wakes a refresher that waits at the slow pace
        self._closed = False

    @property
    def refreshing(self) -> bool:
        """Whether the value is being worked out ahead (it was asked for in the last ``watch_s``, or it is
        kept warm)."""
        with self._lock:
            return self._refresher is not None

    def close(self) -> None:
        """Stop working the value out ahead (the collector is closing); a later call builds it itself."""
        with self._lock:
            self._closed = True
            refresher = self._refresher
        self._called_again.set()
        if refresher is not None:
            refresher.join(timeout=5)

    def warm_period(self) -> float:
        """Seconds between builds while nobody asks, with ``keep_warm``."""
        return max(self._warm_min_s, self._build_s / self._keep_warm) if self._keep_warm else math.inf

    def get(self) -> T:
        with self._lock:
            now = self._clock()
            quiet, self._called = now - self._called >= self._watch_s, now
            if self._ahead and self._refresher is None and not self._closed:
                self._refresher = threading.Thread(target=self._refresh, name="fleet-refresh", daemon=True)
                self._refresher.start()
            elif quiet and self._keep_warm:
                self._called_again.set()  # kept warm: back to every ttl_s
            if self._value is not None and now - self._at < self._may_hand_out(quiet):
                return self._value
        return self._rebuild(fresher_than=self._ttl_s)

    def _may_hand_out(self, quiet: bool) -> float:
        """How old a value a call may be answered with: a poll interval; three while worked out ahead (one
        build may be under way); after a quiet spell, a kept-warm value's period and three more."""
        if quiet and self._keep_warm and self._refresher is not None:
            return self.warm_period() + 3 * self._ttl_s
        return 3 * self._ttl_s if self._ahead else self._ttl_s

    def _rebuild(self, fresher_than: float) -> T:
        with self._building:
            with self._lock:  # built meanwhile by the caller this one waited for
                if self._value is not None and self._clock() - self._at < fresher_than:
                    return self._value
            started, t0 = self._clock(), time.monotonic()
            value = self._build()
            with self._lock:
                # counted from the read, so the answer is never older than the time since then
                self._value, self._at, self._build_s = value, started, time.monotonic() - t0
            return value

    def _refresh(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                watched = now - self._called < self._watch_s
                if self._closed or (not watched and not self._keep_warm):
                    self._refresher = None
                    return
                wait = self._at + (self._ttl_s if watched else self.warm_period()) - now
                if watched:  # the watch ends without a call: wait no further than that
                    wait = min(wait, self._called + self._watch_s - now)
            if wait > 0:
                if self._called_again.wait(wait):
                    self._called_again.clear()
                continue
            try:
                self._rebuild(fresher_than=self._ttl_s)  # unless a caller's build just made it
            except Exception as exc:  # the next call builds it and answers the error
                log.warning("refreshing the fleet view failed: %s", exc)
                with self._lock:
                    self._refresher = None
                return
