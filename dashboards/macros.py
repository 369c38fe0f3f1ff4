"""Grafana's query interpolation, for running dashboard queries outside Grafana (tests, `dashboards check`).

What Grafana does to a query before it reaches the database, reproduced for the parts gpufleet's
dashboards use:

* template variables (``$name`` / ``${name}``): multi-value variables of SQL data sources become
  single-quoted, comma-separated literals (``'a','b'``, quotes doubled); in PromQL they become a regex
  alternation ``(a|b)`` with regex metacharacters escaped, and *All* becomes the variable's ``allValue``;
* global variables: ``$__interval`` (``15s``, ``1m``…), ``$__interval_ms``, ``$__range`` / ``$__range_s`` /
  ``$__range_ms``, ``$__rate_interval`` (max(``$__interval`` + scrape interval, 4 × scrape interval));
* the PostgreSQL data source's macros: ``$__timeFilter(c)`` → ``c BETWEEN 'from' AND 'to'`` (RFC 3339, UTC),
  ``$__timeFrom()`` / ``$__timeTo()`` → ``'from'`` / ``'to'``, ``$__timeGroup(c, '5m')`` →
  ``floor(extract(epoch from c)/300)*300`` and ``$__timeGroupAlias`` the same ``AS "time"``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*'?(\d+(?:\.\d+)?)(ms|s|m|h|d|w)'?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a Grafana interval such as 15s, 1m or 1h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{int(seconds * 1000)}ms"


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _globals(start: float, end: float, interval: str, scrape_interval: float) -> dict[str, str]:
    step = parse_duration(interval)
    rng = end - start
    return {
        "__interval_ms": str(int(step * 1000)),
        "__interval": interval,
        "__rate_interval": format_duration(max(step + scrape_interval, 4 * scrape_interval)),
        "__range_ms": str(int(rng * 1000)),
        "__range_s": str(int(rng)),
        "__range": format_duration(int(rng)),
    }


def _literal(value: str) -> Callable[[re.Match[str]], str]:
    """A replacement that re.sub inserts as it is (no backslash escapes)."""
    return lambda _m: value


def _variables(text: str, values: Mapping[str, str]) -> str:
    # longest names first, so $__interval_ms is not read as $__interval followed by "_ms"
    for name in sorted(values, key=len, reverse=True):
        text = text.replace("${" + name + "}", values[name])
        text = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", _literal(values[name]), text)
    return text


def _args(text: str, start: int) -> tuple[list[str], int]:
    """Comma-separated macro arguments from the '(' at ``start``; nested parentheses allowed."""
    depth, args, cur, i = 0, [], "", start
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
            if depth > 1:
                cur += ch
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(cur.strip())
                return [a for a in args if a != ""], i + 1
            cur += ch
        elif ch == "," and depth == 1:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
        i += 1
    raise ValueError(f"unbalanced parentheses after {text[:start]!r}")


def expand_sql(
    sql: str,
    *,
    start: float,
    end: float,
    interval: str,
    variables: Mapping[str, Sequence[str]],
    scrape_interval: float = 15.0,
) -> str:
    """The SQL Grafana's PostgreSQL data source sends for ``sql`` over [start, end] (Unix seconds)."""
    values = {k: ",".join("'" + v.replace("'", "''") + "'" for v in vs) for k, vs in variables.items()}
    sql = _variables(sql, {**_globals(start, end, interval, scrape_interval), **values})
    out, i = "", 0
    for m in re.finditer(r"\$__(timeFilter|timeFrom|timeTo|timeGroupAlias|timeGroup)\b", sql):
        if m.start() < i:
            continue
        out += sql[i : m.start()]
        args, i = _args(sql, m.end())
        name = m.group(1)
        if name == "timeFilter":
            out += f"{args[0]} BETWEEN '{_rfc3339(start)}' AND '{_rfc3339(end)}'"
        elif name == "timeFrom":
            out += f"'{_rfc3339(start)}'"
        elif name == "timeTo":
            out += f"'{_rfc3339(end)}'"
        else:
            secs = parse_duration(args[1])
            n = f"{secs:g}"
            out += f"floor(extract(epoch from {args[0]})/{n})*{n}" + (
                ' AS "time"' if name == "timeGroupAlias" else ""
            )
    out += sql[i:]
    if "$" in re.sub(r"'[^']*'", "", out):
        raise ValueError(f"unexpanded variable or macro left in query: {out}")
    return out


def expand_promql(
    expr: str,
    *,
    start: float,
    end: float,
    interval: str,
    variables: Mapping[str, Sequence[str]],
    scrape_interval: float = 15.0,
    all_value: str = ".*",
) -> str:
    """The PromQL Grafana's Prometheus data source sends; a variable set to ``["$__all"]`` gets ``all_value``."""
    values = {}
    for k, vs in variables.items():
        if list(vs) == ["$__all"]:
            values[k] = all_value
        elif len(vs) == 1:
            values[k] = re.escape(vs[0])
        else:
            values[k] = "(" + "|".join(re.escape(v) for v in vs) + ")"
    out = _variables(expr, {**_globals(start, end, interval, scrape_interval), **values})
    if re.search(r"\$[A-Za-z_{]", out):
        raise ValueError(f"unexpanded variable left in query: {out}")
    return out
