"""Rule unit tests, in the format of ``promtool test rules``: input series in expanding notation, and the
alerts expected to fire at given times. The tests run the same engine as the collector, in event time.

    rule_files: [../gpu.yaml]
    evaluation_interval: 1s
    tests:
      - name: an XID 48 pages at once
        interval: 1s
        input_series:
          - series: 'gpufleet_gpu_xid_errors_total{node="n1",gpu="0",uuid="GPU-a",xid="48"}'
            values: '_ _ 1 1'
        alert_rule_test:
          - eval_time: 2s
            alertname: GpuXidCritical
            exp_alerts:
              - exp_labels: {node: n1, gpu: "0", uuid: GPU-a, xid: "48", severity: critical}

Series values: ``a+bxN`` (a, a+b, … N more), ``a-bxN``, ``axN`` (a repeated), ``_`` (no sample),
``_xN``, ``stale`` (no sample). ``exp_labels`` must equal the alert's labels (``alertname`` aside);
``exp_annotations``, when given, must equal its annotations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpufleet.collector.rules.engine import Engine
from gpufleet.collector.rules.memory import MemoryState, MemoryView
from gpufleet.collector.rules.model import RuleError, load_pack, parse_duration

_SERIES = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(rf"^(-?{_NUMBER})(?:([+-])({_NUMBER}))?x(\d+)$")  # a+bxn, a-bxn, axn


def parse_series(text: str) -> dict[str, str]:
    m = _SERIES.match(text)
    if not m:
        raise ValueError(f'{text!r} is not a series selector like name{{label="value"}}')
    labels = {"__name__": m.group(1)}
    body = m.group(2) or ""
    pos = 0
    while pos < len(body.strip()):
        lm = _LABEL.match(body, pos)
        if not lm:
            raise ValueError(f"{text!r}: cannot read labels at {body[pos:]!r}")
        labels[lm.group(1)] = lm.group(2).encode().decode("unicode_escape")
        pos = lm.end()
    return labels


def expand_values(text: str) -> list[float | None]:
    out: list[float | None] = []
    for term in str(text).split():
        if term in ("_", "stale"):
            out.append(None)
            continue
        if term.startswith("_x"):
            out += [None] * int(term[2:])
            continue
        m = _TERM.match(term)
        if m:
            start, sign, step, n = float(m.group(1)), m.group(2), float(m.group(3) or 0), int(m.group(4))
            d = -step if sign == "-" else step
            out += [start + d * k for k in range(n + 1)]
            continue
        try:
            out.append(float(term))
        except ValueError:
            raise ValueError(f"{term!r} is not a value (use 1, 1+2x5, _ or stale)") from None
    return out


@dataclass
class Failure:
    file: str
    test: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.test}: {self.message}"


def run_test_file(path: Path) -> tuple[int, list[Failure]]:
    """Run every test in one file. Returns (tests run, failures)."""
    doc = yaml.safe_load(path.read_text()) or {}
    rule_files = [(path.parent / f).resolve() for f in doc.get("rule_files", [])]
    if not rule_files:
        raise RuleError([f"{path}: 'rule_files' lists no rule file"])
    pack = load_pack(rule_files)
    eval_ms = int(parse_duration(doc.get("evaluation_interval", "1m")) * 1000)
    failures: list[Failure] = []
    tests = doc.get("tests") or []
    for t in tests:
        name = t.get("name", "(unnamed)")
        try:
            failures += _run_one(path, name, t, pack, eval_ms)
        except (ValueError, KeyError, TypeError) as exc:
            failures.append(Failure(str(path), name, f"cannot run: {exc}"))
    return len(tests), failures


def _run_one(path: Path, name: str, t: dict[str, Any], pack: Any, eval_ms: int) -> list[Failure]:
    interval_ms = int(parse_duration(t.get("interval", "1m")) * 1000)
    samples: list[tuple[int, dict[str, str], float]] = []
    for s in t.get("input_series") or []:
        labels = parse_series(s["series"])
        for k, v in enumerate(expand_values(s["values"])):
            if v is not None:
                samples.append((k * interval_ms, labels, v))
    samples.sort(key=lambda x: x[0])
    checks = sorted(t.get("alert_rule_test") or [], key=lambda c: parse_duration(c["eval_time"]))
    known = {r.name for r in pack.rules}
    view, state = MemoryView(), MemoryState()
    engine = Engine(pack, view, state, [])
    failures = []
    i, now = 0, 0
    for check in checks:
        at = int(parse_duration(check["eval_time"]) * 1000)
        while now <= at:
            while i < len(samples) and samples[i][0] <= now:
                view.observe(samples[i][1], samples[i][0], samples[i][2])
                i += 1
            engine.tick(now)
            now += eval_ms
        alertname = check["alertname"]
        if alertname not in known:
            failures.append(Failure(str(path), name, f"no rule named {alertname!r} in the rule files"))
            continue
        got = [
            ({k: v for k, v in a["labels"].items() if k != "alertname"}, a["annotations"])
            for a in engine.active_alerts()
            if a["rule"] == alertname and a["state"] == "firing"
        ]
        want = check.get("exp_alerts") or []
        got_labels = sorted(sorted(g[0].items()) for g in got)
        want_labels = sorted(
            sorted({k: str(v) for k, v in (w.get("exp_labels") or {}).items()}.items()) for w in want
        )
        where = f"{alertname} at {check['eval_time']}"
        if got_labels != want_labels:
            failures.append(
                Failure(
                    str(path),
                    name,
                    f"{where}: expected firing {want_labels or 'none'}, got {got_labels or 'none'}",
                )
            )
            continue
        for w in want:
            if "exp_annotations" not in w:
                continue
            wl = sorted({k: str(v) for k, v in (w.get("exp_labels") or {}).items()}.items())
            ann = next(g[1] for g in got if sorted(g[0].items()) == wl)
            exp = {k: str(v) for k, v in w["exp_annotations"].items()}
            if {k: ann.get(k) for k in exp} != exp:
                failures.append(Failure(str(path), name, f"{where}: annotations {ann} do not match {exp}"))
    return failures


def run_tests(paths: list[Path]) -> tuple[int, list[Failure]]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += sorted(x for x in p.rglob("*.y*ml")) if p.is_dir() else [p]
    total, failures = 0, []
    for f in files:
        n, fails = run_test_file(f)
        total += n
        failures += fails
    return total, failures
