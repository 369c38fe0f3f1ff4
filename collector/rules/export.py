"""Export the rules PromQL can express as a Prometheus rule file, or as a PrometheusRule object for the
Prometheus Operator, for teams that already run Prometheus and Alertmanager.

What does not translate is left out and listed (``skipped``): anomaly rules (z-scores with hysteresis keep
per-series state PromQL has not) and an event rule's escalation (the base rule is exported). Where the
translation is close but not exact, the rule gets a ``gpufleet_export_note`` annotation saying how.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from gpufleet.collector.rules.model import Rule, RulePack, format_duration, with_runbook_base

# Where relative runbook links point unless told otherwise: a collector on the machine that reads the alert
# (`gpufleet up`, or a port-forward to the chart's collector) serves the shipped runbooks there.
DEFAULT_RUNBOOK_BASE_URL = "http://localhost:9446/runbooks"


def _selector(metric: str, matchers: dict[str, str]) -> str:
    if not matchers:
        return metric
    parts = []
    for k, rx in sorted(matchers.items()):
        literal = re.fullmatch(r"[A-Za-z0-9_.:/-]*", rx) is not None
        parts.append(f'{k}{"=" if literal else "=~"}"{rx.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"')
    return metric + "{" + ",".join(parts) + "}"


def _num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(x)


def expression(rule: Rule) -> tuple[str | None, str | None]:
    """(PromQL, note) for one rule; (None, why) when PromQL cannot express it."""
    sel = _selector(rule.metric, rule.matchers)
    on = ", ".join(rule.on)
    if rule.kind == "threshold":
        left = f"rate({sel}[{format_duration(rule.rate_s)}])" if rule.rate_s else sel
        if rule.compare_metric:
            right = f"on({on}) group_left() ({rule.compare_metric} + {_num(rule.offset)})" if rule.offset \
                else f"on({on}) group_left() {rule.compare_metric}"
            expr = f"{left} {rule.op} {right}"
        else:
            expr = f"{left} {rule.op} {_num(rule.threshold)}"
        for c in rule.conditions:
            expr = f"({expr}) and on({on}) ({_selector(c.metric, c.matchers)} {c.op} {_num(c.value)})"
        return expr, None
    if rule.kind == "event":
        # increase() misses a counter's first appearance; the second arm catches a series born non-zero.
        expr = f"increase({sel}[5m]) > 0 or ({sel} > 0 unless {sel} offset 5m)"
        note = "escalation is not exported: the base severity is" if rule.escalate else None
        return expr, note
    if rule.kind == "stale":
        by = ", ".join(rule.by)
        after = format_duration(rule.after_s)
        if rule.inventory:
            per = f"{by}, uuid"
            expr = (f"(group by ({per}) (present_over_time({sel}[1h])) unless group by ({per}) "
                    f"(present_over_time({sel}[{after}]))) and on({by}) group by ({by}) "
                    f"(present_over_time({sel}[{after}]))")
        else:
            expr = (f"group by ({by}) (present_over_time({sel}[1h])) unless group by ({by}) "
                    f"(present_over_time({sel}[{after}]))")
        return expr, "Prometheus forgets a series after the 1h range; gpufleet keeps it stale until data returns"
    if rule.kind == "peer":
        by = ", ".join(rule.by)
        expr = (f"{sel} < on({by}) group_left() ({_num(rule.below)} * (quantile by ({by}) (0.5, {sel}) "
                f">= {_num(rule.min_median)}) and on({by}) count by ({by}) ({sel}) >= {rule.min_peers})")
        return expr, "the alert's value is the GPU's own value here, not its ratio to the median"
    if rule.kind == "trend":
        expr = (f"predict_linear({sel}[{format_duration(rule.window_s)}], {_num(rule.horizon_s)}) >= "
                f"on({on}) group_left() {rule.limit_metric}")
        return expr, "gpufleet also requires steady growth over the window, so a job loading its model is no leak"
    return None, f"{rule.kind} rules keep per-series state PromQL has not"


def prometheus_groups(pack: RulePack, source_groups: dict[str, list[str]] | None = None) -> tuple[list[dict], list[str]]:
    rules: list[dict[str, Any]] = []
    skipped: list[str] = []
    for r in pack.rules:
        expr, note = expression(r)
        if expr is None:
            skipped.append(f"{r.name}: {note}")
            continue
        out: dict[str, Any] = {"alert": r.name, "expr": expr}
        if r.for_s:
            out["for"] = format_duration(r.for_s)
        keep = r.keep_firing_for_s or (300.0 if r.kind == "event" else 0.0)
        if keep:
            out["keep_firing_for"] = format_duration(keep)
        out["labels"] = {**r.labels, "severity": r.severity}
        annotations = {k: v for k, v in r.annotations.items()}
        if note:
            annotations["gpufleet_export_note"] = note
        out["annotations"] = annotations
        rules.append(out)
    return [{"name": "gpufleet", "rules": rules}], skipped


def export(pack: RulePack, fmt: str, *, name: str = "gpufleet-gpu", namespace: str | None = None,
           runbook_base_url: str = DEFAULT_RUNBOOK_BASE_URL) -> tuple[str, list[str]]:
    """The rule file text (``prometheus``) or PrometheusRule manifest (``prometheusrule``), and what was skipped.
    Relative runbook_url annotations become ``runbook_base_url``/NAME: Prometheus gets whole links."""
    groups, skipped = prometheus_groups(with_runbook_base(pack, runbook_base_url))
    header = "# Generated by `gpufleet alerts export`; edit alerts/*.yaml and export again.\n"
    if skipped:
        header += "# Not expressible in PromQL, evaluated only by the gpufleet collector:\n"
        header += "".join(f"#   {s}\n" for s in skipped)
    if fmt == "prometheus":
        body: dict[str, Any] = {"groups": groups}
    elif fmt == "prometheusrule":
        meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "gpufleet",
                                                         "app.kubernetes.io/component": "alerts"}}
        if namespace:
            meta["namespace"] = namespace
        body = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": meta,
                "spec": {"groups": groups}}
    else:
        raise ValueError(f"unknown format {fmt!r}; use prometheus or prometheusrule")
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000), skipped


def write(pack: RulePack, fmt: str, path: Path, **kw: Any) -> list[str]:
    text, skipped = export(pack, fmt, **kw)
    Path(path).write_text(text)
    return skipped
