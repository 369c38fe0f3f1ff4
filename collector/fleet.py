"""The fleet summary behind `/api/v1/fleet`: every GPU by node with the numbers a person scans first
(SM activity next to utilization, memory, temperature, power, throttle reasons) and the alerts on it.

The fleet page and `gpufleet top` both read this one JSON shape, so they show the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from gpufleet.collector.store.reads import GpuRecord

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
        "value": a.get("value"),
        "active_since": since / 1000.0 if isinstance(since, int | float) and since > 1e11 else since,
    }


def gpu_view(g: GpuRecord, alerts: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One GPU of `Store.gpus()` as the page and `top` show it."""
    out: dict[str, Any] = {
        k: g.label(k) for k in ("uuid", "gpu", "node", "cluster", "model", "pod", "namespace", "container")
    }
    out["uuid"] = g.uuid
    out.update(up=g.up, stale=g.stale, last_seen=g.last_seen)
    for name, metric in _VALUES.items():
        out[name] = g.value(metric)
    throttle: list[str] = []
    for v in g.series("gpufleet_gpu_clock_event_active"):
        reason = v.labels.get("reason")
        if reason is not None and v.value >= 1 and reason in SLOWDOWN_REASONS:
            throttle.append(reason)
    xids = sum((v.value for v in g.series("gpufleet_gpu_xid_errors_total")), 0.0)
    ecc = {"corrected": 0.0, "uncorrected": 0.0}
    for v in g.series("gpufleet_gpu_ecc_errors_total"):
        kind = v.labels.get("type")
        if v.labels.get("scope") == "volatile" and kind in ecc:
            ecc[kind] += v.value
    out["throttle"] = sorted(throttle, key=SLOWDOWN_REASONS.index)
    out["xid_errors"] = xids
    out["ecc_errors"] = ecc
    used, total = out["memory_used_bytes"], out["memory_total_bytes"]
    out["memory_ratio"] = used / total if used is not None and total else None
    out["alerts"] = [
        {"rule": a["rule"], "state": a["state"], "severity": a["severity"], "runbook_url": a["runbook_url"]}
        for a in alerts
    ]
    return out


def fleet_summary(
    gpus: Iterable[GpuRecord], alerts: list[Mapping[str, Any]], now: float | None = None
) -> dict[str, Any]:
    """GPUs grouped by (cluster, node), active alerts with runbooks, and fleet totals."""
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
        nodes.setdefault(key, {"cluster": v["cluster"], "node": v["node"], "gpus": []})["gpus"].append(v)

    def mean(name: str) -> float | None:
        xs = [v[name] for v in views if v[name] is not None and v["up"] and not v["stale"]]
        return sum(xs) / len(xs) if xs else None

    firing = [a for a in alert_views if a["state"] == "firing"]
    totals = {
        "gpus": len(views),
        "up": sum(v["up"] and not v["stale"] for v in views),
        "down": sum(not v["up"] for v in views),
        "stale": sum(v["stale"] for v in views),
        "nodes": len(nodes),
        "throttled": sum(bool(v["throttle"]) for v in views),
        "alerts_firing": len(firing),
        "alerts_pending": len(alert_views) - len(firing),
        "power_watts": sum(v["power_watts"] or 0.0 for v in views if v["up"] and not v["stale"]),
        "sm_active": mean("sm_active"),
        "utilization": mean("utilization"),
        "memory_used_bytes": sum(v["memory_used_bytes"] or 0.0 for v in views),
        "memory_total_bytes": sum(v["memory_total_bytes"] or 0.0 for v in views),
    }
    return {"generated_at": now, "totals": totals, "nodes": list(nodes.values()), "alerts": alert_views}
