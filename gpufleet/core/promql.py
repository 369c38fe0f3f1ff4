"""The metric names and label names a PromQL expression reads, for checking queries against the catalogue.

Not a parser: a tokenizer that knows enough of the grammar to tell a metric name (an identifier that is
not a keyword, not a function call and not inside a label matcher or a grouping clause) from everything
else. Grafana's ``$variables`` and ``[$__rate_interval]`` ranges pass through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN = re.compile(
    r"""(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      |(?P<range>\[[^\]]*\])
      |(?P<var>\$\{[^}]*\}|\$\w+)
      |(?P<num>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)(?:ms|[smhdwy])*)
      |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      |(?P<op>=~|!~|!=|==|>=|<=|[{}(),=<>+\-*/%^@])
      |(?P<space>\s+)
      |(?P<other>.)""",
    re.VERBOSE,
)
KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
        "start",
        "end",
    ]
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)


@dataclass
class Selector:
    """One metric read by the expression, with the label names its matchers name."""

    name: str
    labels: list[str] = field(default_factory=list)


@dataclass
class Reads:
    selectors: list[Selector] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)  # by/without/on/ignoring/group_* label names
    made: list[str] = field(default_factory=list)  # labels label_replace/label_join write


def _tokens(expr: str) -> list[tuple[str, str]]:
    out = []
    for m in TOKEN.finditer(expr):
        kind = m.lastgroup or "other"
        if kind != "space":
            out.append((kind, m.group()))
    return out


def reads(expr: str) -> Reads:
    """Every metric name (with its matchers' label names) and grouping label the expression reads."""
    toks = _tokens(expr)
    out = Reads()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in GROUPING and nxt == "(":
            j = i + 2
            while j < len(toks) and toks[j][1] != ")":
                if toks[j][0] in ("ident", "str"):
                    out.grouping.append(toks[j][1].strip("\"'`"))
                j += 1
            i = j + 1
            continue
        if kind == "ident" and text in ("label_replace", "label_join") and nxt == "(":
            # label_replace(v, "dst", ...): the first string argument names the label it writes
            for k, t in toks[i + 2 :]:
                if k == "str":
                    out.made.append(t[1:-1])
                    break
        if kind == "ident" and text in AGGREGATIONS and nxt in ("by", "without"):
            i += 1
            continue
        if kind == "ident" and text not in KEYWORDS and nxt != "(" or (kind == "op" and text == "{"):
            sel = Selector(text if kind == "ident" else "")
            j = i + 1 if kind == "ident" else i
            if j < len(toks) and toks[j][1] == "{":
                j += 1
                while j < len(toks) and toks[j][1] != "}":
                    k, t = toks[j]
                    after = toks[j + 1][1] if j + 1 < len(toks) else ""
                    if k in ("ident", "str") and after in ("=", "!=", "=~", "!~"):
                        label = t.strip("\"'`")
                        if label == "__name__" and j + 2 < len(toks) and after == "=":
                            sel.name = toks[j + 2][1][1:-1]
                        else:
                            sel.labels.append(label)
                    elif k == "str" and not sel.name and after in (",", "}") and toks[j - 1][1] in ("{", ","):
                        sel.name = t[1:-1]  # Prometheus 3 quoted metric name: {"name"}
                    j += 1
            if sel.name:
                out.selectors.append(sel)
            i = j + 1 if j < len(toks) and toks[j][1] == "}" else i + 1
            continue
        i += 1
    return out
