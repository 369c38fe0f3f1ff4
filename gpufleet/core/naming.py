"""PromQL written over gpufleet's series names, rewritten for another naming of the same series.

An agent in dcgm naming mode serves most GPU series under dcgm-exporter's names, units and labels (see
``gpufleet.agent.dcgm_names``). Rules and dashboards are written once, over gpufleet's names; this module
rewrites their PromQL for such an agent: each selector of a series with a twin becomes the twin's selector,
scaled back to gpufleet's unit, with gpufleet's identity labels (``node``, ``uuid``, …) copied back by
``label_replace`` so that ``by``/``on`` clauses, annotations and Alertmanager grouping keep working. A series
whose twin is one name per label value (ECC type and scope) becomes the union of the twins its matchers
select, each with that label set back; a reason of a bitmask (clock-event reasons) becomes its bit.

What cannot be said over the other names raises :class:`Untranslatable` with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.core.promql import GROUPING, KEYWORDS, TOKEN

__all__ = ["Naming", "Twin", "Untranslatable", "translate"]


class Untranslatable(ValueError):
    """PromQL that reads a series in a way the other naming cannot express."""


@dataclass(frozen=True)
class Twin:
    """How one gpufleet series is spelled in another naming. Exactly one of ``name`` (with ``bits``: a
    bitmask series) or ``by_value`` says where its samples are."""

    name: str = ""
    # One name per value tuple of ``labels`` (the other naming spells those labels in the name).
    by_value: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    # The bit of the ``name`` bitmask per value of the one label in ``labels``.
    bits: Mapping[str, int] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    # Every value tuple of ``labels`` the series has; those without a twin keep the gpufleet name.
    values: tuple[tuple[str, ...], ...] = ()
    scale: float = 1.0  # their value = ours × scale
    # Our labels the twin carries under the naming's other label names (copied back after reading it).
    identity: tuple[str, ...] = ()
    # Matchers (label, op, quoted value) that tell this series from others sharing the twin's name (a GPU's
    # series from its MIG instances').
    matchers: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class Naming:
    name: str
    twins: Mapping[str, Twin]
    labels: Mapping[str, str]  # our label name -> theirs


# ---- tokens ---------------------------------------------------------------------------------------------
_MATCH_OPS = ("=", "!=", "=~", "!~")
# Range functions whose result scales with the samples (f(k·x) = k·f(x)), and those that do not depend on
# the values' unit at all.
_LINEAR = frozenset(
    [
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "predict_linear",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "quantile_over_time",
        "last_over_time",
        "first_over_time",
        "stddev_over_time",
        "mad_over_time",
        "holt_winters",
        "double_exponential_smoothing",
    ]
)
_UNIT_FREE = frozenset(["present_over_time", "count_over_time", "absent_over_time", "changes", "resets"])


@dataclass
class _Tok:
    kind: str
    text: str
    start: int
    end: int


@dataclass
class _Selector:
    name: str
    matchers: list[tuple[str, str, str]]  # (label, op, quoted value as written)
    start: int  # text offsets of the selector, range and modifiers included
    end: int
    range: str | None  # "[5m]" as written
    modifiers: str  # " offset 5m" / " @ 123" as written
    first: int  # index of its first token


def _tokens(expr: str) -> list[_Tok]:
    out = []
    for m in TOKEN.finditer(expr):
        kind = m.lastgroup or "other"
        if kind != "space":
            out.append(_Tok(kind, m.group(), m.start(), m.end()))
    return out


def _unquote(s: str) -> str:
    return s[1:-1] if s.startswith("`") else re.sub(r"\\(.)", r"\1", s[1:-1])


def _selectors(expr: str, toks: list[_Tok]) -> list[_Selector]:
    out: list[_Selector] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1].text if i + 1 < len(toks) else ""
        if t.kind == "ident" and t.text in GROUPING and nxt == "(":
            while i < len(toks) and toks[i].text != ")":
                i += 1
            i += 1
            continue
        starts = (t.kind == "ident" and t.text not in KEYWORDS and nxt != "(") or t.text == "{"
        if not starts:
            i += 1
            continue
        first = i
        name = t.text if t.kind == "ident" else ""
        j = i + 1 if t.kind == "ident" else i
        matchers: list[tuple[str, str, str]] = []
        if j < len(toks) and toks[j].text == "{":
            j += 1
            while j < len(toks) and toks[j].text != "}":
                if toks[j].kind in ("ident", "str") and j + 2 < len(toks) and toks[j + 1].text in _MATCH_OPS:
                    label = toks[j].text if toks[j].kind == "ident" else _unquote(toks[j].text)
                    matchers.append((label, toks[j + 1].text, toks[j + 2].text))
                    j += 3
                else:
                    if toks[j].kind == "str" and not name:
                        name = _unquote(toks[j].text)  # Prometheus 3: {"name"}
                    j += 1
            j += 1  # past "}"
        if not name:
            name = next((_unquote(v) for k, op, v in matchers if k == "__name__" and op == "="), "")
            if name:
                matchers = [m for m in matchers if m[0] != "__name__"]
        rng = None
        if j < len(toks) and toks[j].kind == "range":
            rng = toks[j].text
            j += 1
        mods_start = j
        while j + 1 < len(toks) and toks[j].text in ("offset", "@"):
            j += 2 if toks[j + 1].text != "-" else 3
        end = toks[j - 1].end
        modifiers = " " + expr[toks[mods_start].start : end] if j > mods_start else ""
        if name:
            out.append(_Selector(name, matchers, t.start, end, rng, modifiers, first))
        i = j
    return out


# ---- rewriting ------------------------------------------------------------------------------------------
def _num(x: float) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _matches(op: str, pattern: str, value: str) -> bool:
    if op == "=":
        return value == pattern
    if op == "!=":
        return value != pattern
    hit = re.fullmatch(pattern, value) is not None
    return hit if op == "=~" else not hit


def _identity(expr: str, twin: Twin, naming: Naming) -> str:
    """gpufleet's identity labels copied back from the twin's (a series that kept our name has them already:
    the regex does not match its empty label of the other name, and label_replace leaves it as it is)."""
    for ours in twin.identity:
        theirs = naming.labels.get(ours, ours)
        if theirs != ours:
            expr = f'label_replace({expr}, "{ours}", "$1", "{theirs}", "(.+)")'
    return expr


def _constants(expr: str, constants: Mapping[str, str]) -> str:
    for label, value in constants.items():
        expr = f'label_replace({expr}, "{label}", "{value}", "", "")'
    return expr


@dataclass
class _Alternative:
    selector: str  # the series to read, matchers included
    constants: dict[str, str]  # labels of ours the name spells out, to set back
    bit: int | None = None
    twin: bool = True  # False: the series kept our name (and our labels)


def _alternatives(sel: _Selector, twin: Twin, naming: Naming) -> list[_Alternative]:
    spelled = set(twin.labels)
    own = [m for m in sel.matchers if m[0] not in spelled]
    on_spelled = [m for m in sel.matchers if m[0] in spelled]
    for label, _, value in on_spelled:
        if not value.startswith(('"', "'", "`")) or re.search(r"\$(\w|\{)", value):  # a Grafana variable
            raise Untranslatable(
                f"{sel.name}: the matcher on {label} is not a literal, and {naming.name} names spell {label} "
                "in the metric name"
            )

    def selected(values: tuple[str, ...]) -> bool:
        got = dict(zip(twin.labels, values, strict=True))
        return all(_matches(op, _unquote(v), got[label]) for label, op, v in on_spelled)

    def body(name: str) -> str:
        parts = [f"{naming.labels.get(label, label)}{op}{value}" for label, op, value in own]
        parts += [f"{label}{op}{value}" for label, op, value in twin.matchers]
        return name + ("{" + ", ".join(parts) + "}" if parts else "")

    if twin.by_value or twin.bits:
        out: list[_Alternative] = []
        kept = False
        for values in twin.values:
            if not selected(values):
                continue
            constants = dict(zip(twin.labels, values, strict=True))
            if twin.bits:
                out.append(_Alternative(body(twin.name), constants, bit=twin.bits[values[0]]))
            elif values in twin.by_value:
                out.append(_Alternative(body(twin.by_value[values]), constants))
            else:
                kept = True
        if kept:  # values the other naming has no name for keep ours, labels and all
            out.append(_Alternative(sel.name + _braces(sel.matchers), {}, twin=False))
        return out or [_Alternative(sel.name + _braces(sel.matchers), {}, twin=False)]
    return [_Alternative(body(twin.name), {})]


def _braces(matchers: list[tuple[str, str, str]]) -> str:
    return "{" + ", ".join(f"{k}{op}{v}" for k, op, v in matchers) + "}" if matchers else ""


def _scaled(expr: str, scale: float) -> str:
    if scale == 1:
        return expr
    inverse = 1 / scale
    if abs(inverse - round(inverse)) < 1e-9 * inverse:
        return f"({expr} * {_num(round(inverse))})"
    return f"({expr} / {_num(scale)})"


def _instant(alt: _Alternative, twin: Twin, modifiers: str) -> str:
    expr = alt.selector + modifiers
    if not alt.twin:
        return expr
    expr = f"(floor({expr} / {alt.bit}) % 2)" if alt.bit is not None else _scaled(expr, twin.scale)
    return _constants(expr, alt.constants)


def _enclosing_call(toks: list[_Tok], first: int) -> tuple[int, int]:
    """Token indexes of the function name and of the closing parenthesis of the call a range selector is an
    argument of."""
    depth, i = 0, first - 1
    while i >= 0:
        if toks[i].text == ")":
            depth += 1
        elif toks[i].text == "(":
            if depth == 0:
                break
            depth -= 1
        i -= 1
    if i <= 0 or toks[i - 1].kind != "ident":
        raise Untranslatable("a range selector outside a function call")
    depth, j = 0, i
    while j < len(toks):
        if toks[j].text == "(":
            depth += 1
        elif toks[j].text == ")":
            depth -= 1
            if depth == 0:
                return i - 1, j
        j += 1
    raise Untranslatable("unbalanced parentheses")


def _in_call(
    expr: str,
    toks: list[_Tok],
    sel: _Selector,
    alts: list[_Alternative],
    twin: Twin,
    naming: Naming,
) -> tuple[int, int, str]:
    fn_i, close_i = _enclosing_call(toks, sel.first)
    fn = toks[fn_i].text
    before, after = expr[toks[fn_i].start : sel.start], expr[sel.end : toks[close_i].end]
    assert sel.range is not None
    parts = []
    for alt in alts:
        if not alt.twin:
            parts.append(before + alt.selector + sel.range + sel.modifiers + after)
            continue
        if alt.bit is not None:
            # one bit of a bitmask has no raw samples: read it through a subquery at the evaluation interval
            inner = _instant(alt, twin, sel.modifiers)
            rng = sel.range[:-1] + (":]" if ":" not in sel.range else "]")
            parts.append(f"{before}{inner}{rng}{after}")
            continue
        call = before + alt.selector + sel.range + sel.modifiers + after
        if twin.scale != 1 and fn not in _UNIT_FREE:
            if fn not in _LINEAR:
                raise Untranslatable(
                    f"{fn}() over {sel.name} does not scale with its unit ({naming.name} names use another)"
                )
            call = _scaled(call, twin.scale)
        parts.append(_constants(call, alt.constants))
    union = _union(parts)
    return toks[fn_i].start, toks[close_i].end, _identity(union, twin, naming) if _any_twin(alts) else union


def _any_twin(alts: list[_Alternative]) -> bool:
    return any(a.twin for a in alts)


def _union(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"


def translate(expr: str, naming: Naming) -> str:
    """``expr`` (over gpufleet names) as the same query over ``naming``'s names; :class:`Untranslatable` when
    it cannot be said there."""
    toks = _tokens(expr)
    edits: list[tuple[int, int, str]] = []
    for sel in _selectors(expr, toks):
        twin = naming.twins.get(sel.name)
        if twin is None:
            continue
        alts = _alternatives(sel, twin, naming)
        if sel.range is None:
            union = _union([_instant(a, twin, sel.modifiers) for a in alts])
            edits.append((sel.start, sel.end, _identity(union, twin, naming) if _any_twin(alts) else union))
        else:
            edits.append(_in_call(expr, toks, sel, alts, twin, naming))
    edits.sort()
    for (_, end_a, _), (start_b, _, _) in zip(edits, edits[1:], strict=False):
        if start_b < end_a:
            raise Untranslatable("two renamed series inside one range function call")
    for start, end, text in reversed(edits):
        expr = expr[:start] + text + expr[end:]
    return expr
