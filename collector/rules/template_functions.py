"""The functions annotation templates call, as Prometheus defines them (its template reference and
``template/template.go``), with the types of their arguments, and Go's formatting of numbers they print with
(``fmt``'s ``%v``, ``%g``, ``printf`` verbs): gpufleet's rendering is Prometheus' text, character for
character (tests compare the two through ``promtool test rules``).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import quote_plus

# Static types of template values: an expression's type is known when the rule loads, so a call Go would
# refuse at run time (``toUpper $value``) is refused then, with the fix.
FLOAT, INT, STR, BOOL, MAP, ANY = "number", "integer", "string", "bool", "label map", "any"
NUMERIC = frozenset({FLOAT, INT, STR})  # what humanize* convert (a string must hold a number)
SCALAR = frozenset({FLOAT, INT, STR, BOOL, ANY})

Value = float | int | str | bool | Mapping[str, str] | None


# ---- formatting numbers as Go does ------------------------------------------------------------------
def _go_special(v: float) -> str | None:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return None


def go_g(v: float) -> str:
    """Go's ``%v`` / ``%g`` of a float64: the shortest digits that read back as ``v``, in exponent form below
    1e-4 and from 1e+06 on (strconv's rule for the shortest precision)."""
    special = _go_special(v)
    if special is not None:
        return special
    if v == 0:
        return "-0" if math.copysign(1, v) < 0 else "0"
    sign, digits, exp = Decimal(repr(v)).as_tuple()
    assert isinstance(exp, int)
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    exp += len(digits) - len(ds)  # the zeros stripped
    point = len(ds) + exp  # digits before the decimal point
    x = point - 1
    neg = "-" if sign else ""
    if x < -4 or x >= 6:
        mantissa = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if point <= 0:
        return f"{neg}0.{'0' * -point}{ds}"
    if point >= len(ds):
        return f"{neg}{ds}{'0' * (point - len(ds))}"
    return f"{neg}{ds[:point]}.{ds[point:]}"


def go_g4(v: float) -> str:
    """Go's ``%.4g``."""
    special = _go_special(v)
    return special if special is not None else f"{v:.4g}"


def _scaled(v: float, prefixes: Sequence[str], step: float, up: bool) -> tuple[float, str]:
    prefix = ""
    for p in prefixes:
        if (abs(v) < step) if up else (abs(v) >= 1):
            break
        prefix = p
        v = v / step if up else v * step
    return v, prefix


def humanize(v: float) -> str:
    """A number with an SI prefix, four significant digits: 1234567 -> 1.235M, 0.0042 -> 4.2m."""
    if v == 0 or not math.isfinite(v):
        return go_g4(v)
    if abs(v) >= 1:
        v, prefix = _scaled(v, ("k", "M", "G", "T", "P", "E", "Z", "Y"), 1000, up=True)
    else:
        v, prefix = _scaled(v, ("m", "u", "n", "p", "f", "a", "z", "y"), 1000, up=False)
    return f"{go_g4(v)}{prefix}"


def humanize1024(v: float) -> str:
    """Like :func:`humanize` with binary prefixes: 1048576 -> 1Mi."""
    if abs(v) <= 1 or not math.isfinite(v):
        return go_g4(v)
    v, prefix = _scaled(v, ("ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"), 1024, up=True)
    return f"{go_g4(v)}{prefix}"


def humanize_duration(v: float) -> str:
    """Seconds as days, hours, minutes and seconds: 899.99 -> 14m 59s; 0.05 -> 50ms."""
    if not math.isfinite(v):
        return go_g4(v)
    if v == 0:
        return f"{go_g4(v)}s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        whole = int(abs(v))
        days, rest = divmod(whole, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{go_g4(abs(v))}s"
    v, prefix = _scaled(v, ("m", "u", "n", "p", "f", "a", "z", "y"), 1000, up=False)
    return f"{go_g4(v)}{prefix}s"


def humanize_percentage(v: float) -> str:
    """A ratio as a percentage: 0.1234567 -> 12.35%."""
    return f"{go_g4(v * 100)}%"


def humanize_timestamp(v: float) -> str:
    """Unix seconds as UTC time, as Go prints a time: 2015-06-23 13:19:44.128 +0000 UTC."""
    if not math.isfinite(v):
        return go_g4(v)
    ms = int(v * 1000)
    try:
        t = datetime.datetime.fromtimestamp(ms // 1000, datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):  # beyond year 9999: no calendar date to show
        return go_g4(v)
    frac = f".{ms % 1000:03d}".rstrip("0").rstrip(".")
    return f"{t:%Y-%m-%d %H:%M:%S}{frac} +0000 UTC"


# ---- functions --------------------------------------------------------------------------------------
def _number(x: Value) -> float:
    """A humanize function's argument as a float; ValueError for a string that is not a number."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        if x != x.strip():  # Go's strconv.ParseFloat takes no blanks around the number
            raise ValueError(f"{x!r} is not a number")
        return float(x)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise ValueError(f"{x!r} is not a number")


def _humanizer(f: Callable[[float], str]) -> Callable[..., Value]:
    def run(x: Value) -> Value:
        try:
            return f(_number(x))
        except ValueError:  # a label that holds no number: show it as it is rather than lose the message
            return x if isinstance(x, str) else ""

    return run


def _split_host_port(s: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort, or None where it refuses."""
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1 : end + 2] != ":" or ":" in s[end + 2 :]:
            return None
        return s[1:end], s[end + 2 :]
    if s.count(":") != 1:
        return None
    host, port = s.split(":")
    return host, port


def _strip_port(s: str) -> str:
    parts = _split_host_port(s)
    return s if parts is None else parts[0]


def _title(s: str) -> str:
    """Go's strings.Title: the first letter of each word upper-cased, the rest left as they are."""
    return re.sub(r"(?<![\w])([^\W\d_])", lambda m: m.group(1).upper(), s)


def _go_replacement(repl: str, m: re.Match[str]) -> str:
    """Expand Go's regexp replacement ``$1``, ``${1}``, ``$name``, ``${name}``, ``$$`` for one match."""

    def group(name: str) -> str:
        try:
            return m.group(int(name) if name.isdigit() else name) or ""
        except IndexError:  # no such group: Go expands it to nothing
            return ""

    out: list[str] = []
    i = 0
    while i < len(repl):
        c = repl[i]
        if c != "$" or i + 1 >= len(repl):
            out.append(c)
            i += 1
            continue
        nxt = repl[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end = repl.find("}", i + 2)
            name = repl[i + 2 : end] if end > 0 else ""
            if end > 0 and re.fullmatch(r"\w+", name):
                out.append(group(name))
                i = end + 1
            else:
                out.append("$")
                i += 1
        else:
            name_m = re.match(r"\w+", repl[i + 1 :])
            if name_m:
                out.append(group(name_m.group(0)))
                i += 1 + len(name_m.group(0))
            else:
                out.append("$")
                i += 1
    return "".join(out)


def _re_replace_all(pattern: str, repl: str, text: str) -> str:
    return re.sub(pattern, lambda m: _go_replacement(repl, m), text)


def _go_print(*args: Value) -> str:
    """Go's fmt.Sprint: operands side by side, a space between two that are not strings."""
    out = ""
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += go_value(a)
    return out


def go_value(a: Value) -> str:
    if isinstance(a, bool):
        return "true" if a else "false"
    if isinstance(a, float):
        return go_g(a)
    if a is None:
        return "NaN"
    return str(a)


def truth(a: Value) -> bool:
    if isinstance(a, float):
        return a != 0
    return bool(a)


@dataclass(frozen=True)
class Function:
    """One template function: the types each argument may have (``rest``: any further ones), the result's
    type, and what it does."""

    params: tuple[frozenset[str], ...]
    returns: str
    run: Callable[..., Value]
    rest: frozenset[str] | None = None


def _fn(
    params: Sequence[frozenset[str]], returns: str, rest: frozenset[str] | None = None
) -> Callable[[Callable[..., Value]], Function]:
    def wrap(run: Callable[..., Value]) -> Function:
        return Function(tuple(params), returns, run, rest)

    return wrap


_S = frozenset({STR})
COMPARISONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}

FUNCTIONS: dict[str, Function] = {
    "humanize": _fn([NUMERIC], STR)(_humanizer(humanize)),
    "humanize1024": _fn([NUMERIC], STR)(_humanizer(humanize1024)),
    "humanizeDuration": _fn([NUMERIC], STR)(_humanizer(humanize_duration)),
    "humanizePercentage": _fn([NUMERIC], STR)(_humanizer(humanize_percentage)),
    "humanizeTimestamp": _fn([NUMERIC], STR)(_humanizer(humanize_timestamp)),
    "printf": _fn([_S], STR, SCALAR)(lambda fmt, *args: format_go(fmt, args)),
    "print": _fn([], STR, SCALAR)(_go_print),
    "toUpper": _fn([_S], STR)(str.upper),
    "toLower": _fn([_S], STR)(str.lower),
    "title": _fn([_S], STR)(_title),
    "stripPort": _fn([_S], STR)(_strip_port),
    "reReplaceAll": _fn([_S, _S, _S], STR)(_re_replace_all),
    "match": _fn([_S, _S], BOOL)(lambda pattern, text: re.search(pattern, text) is not None),
    "index": _fn([frozenset({MAP}), _S], STR)(lambda labels, name: labels.get(name, "")),
    "len": _fn([frozenset({STR, MAP})], INT)(lambda x: len(x.encode()) if isinstance(x, str) else len(x)),
    "urlquery": _fn([], STR, SCALAR)(lambda *args: quote_plus(_go_print(*args), safe="")),
    "not": _fn([SCALAR | {MAP}], BOOL)(lambda x: not truth(x)),
    "and": _fn([SCALAR], ANY, SCALAR)(lambda *xs: next((x for x in xs if not truth(x)), xs[-1])),
    "or": _fn([SCALAR], ANY, SCALAR)(lambda *xs: next((x for x in xs if truth(x)), xs[-1])),
    **{name: _fn([SCALAR, SCALAR], BOOL)(op) for name, op in COMPARISONS.items()},
}
# Prometheus has these, but they need its server: what to write instead.
ONLY_IN_PROMETHEUS = {
    **dict.fromkeys(
        ("query", "first", "label", "value", "strvalue", "sortByLabel"),
        "runs a PromQL query inside Prometheus, which the gpufleet collector cannot; print the rule's "
        "own value ($value) or link a dashboard",
    ),
    **dict.fromkeys(
        ("graphLink", "tableLink", "externalURL", "pathPrefix"),
        "links into a Prometheus server's UI; put the link in runbook_url or use the Slack Grafana button",
    ),
    **dict.fromkeys(
        ("safeHtml", "tmpl", "args", "toTime", "toDuration", "parseDuration", "now", "stripDomain"),
        "is not rendered by gpufleet (nor by every Prometheus version)",
    ),
    **dict.fromkeys(
        ("html", "js", "slice", "call", "println"), "is a Go template function gpufleet does not render"
    ),
}


# ---- printf -----------------------------------------------------------------------------------------
_VERB = re.compile(r"%([-+# 0]*)(\d*)(?:\.(\d*))?(.?)")
_FLOAT_VERBS = "eEfFgG"


def _verbs(fmt: str) -> list[tuple[str, str, str, str | None, str]]:
    """The directives of a Go format string: (text, flags, width, precision, verb); ValueError where Go
    would print an error into the text instead."""
    out: list[tuple[str, str, str, str | None, str]] = []
    i = 0
    while True:
        j = fmt.find("%", i)
        if j < 0:
            return out
        m = _VERB.match(fmt, j)
        assert m is not None
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        if verb == "%":
            out.append(("%", "", "", None, "%"))
        elif verb == "" or verb not in "vsdq" + _FLOAT_VERBS:
            what = f"%{verb}" if verb else "a lone % at the end"
            raise ValueError(
                f"printf format {fmt!r}: {what} is not a verb gpufleet renders; use %s for text, %.2f, %g or "
                "%e for numbers, %d for whole numbers, %% for a percent sign"
            )
        elif "#" in flags:
            raise ValueError(f"printf format {fmt!r}: the # flag is not rendered by gpufleet; leave it out")
        elif verb == "q":
            raise ValueError(f'printf format {fmt!r}: %q is not rendered by gpufleet; write "%s" instead')
        else:
            out.append((m.group(0), flags, width, prec, verb))
        i = m.end()


_FITS = {"v": {FLOAT, INT, STR, BOOL, ANY}, "s": {STR, ANY}, "d": {INT, ANY}}
_FIX = {
    FLOAT: "a number: use %.2f, %g or %e",
    INT: "a whole number: use %d",
    STR: "a string: use %s, or humanize it first",
    BOOL: "true or false: use %v",
}


def check_printf(fmt: str, types: Sequence[str]) -> None:
    """ValueError naming the fix where Go would print ``%!f(string=…)`` or ``%!d(MISSING)`` into the text."""
    directives = [d for d in _verbs(fmt) if d[4] != "%"]
    if len(directives) != len(types):
        raise ValueError(
            f"printf format {fmt!r} has {len(directives)} verb(s) for {len(types)} value(s); give one value "
            "per verb (write %% for a literal percent sign)"
        )
    for (text, _, _, _, verb), t in zip(directives, types, strict=True):
        if t not in _FITS.get(verb, {FLOAT, ANY}):
            raise ValueError(f"printf format {fmt!r}: {text} does not print {_FIX[t]}")


def _pad(body: str, flags: str, width: str) -> str:
    """``body`` padded to ``width`` as Go pads a number: zeros go after the sign."""
    n = int(width or 0)
    if len(body) >= n:
        return body
    if "-" in flags:
        return body.ljust(n)
    if "0" in flags and body[:1] in "+- " and body[1:2].isdigit():
        return body[0] + body[1:].rjust(n - 1, "0")
    if "0" in flags and body[:1].isdigit():
        return body.rjust(n, "0")
    return body.rjust(n)


def _one(flags: str, width: str, prec: str | None, verb: str, a: Value) -> str:
    precision = "" if prec is None else "." + (prec or "0")
    if isinstance(a, float) and verb in _FLOAT_VERBS + "v":
        special = _go_special(a)
        if special is not None:
            return _pad(special, flags.replace("0", ""), width)
        if verb in "gGv" and prec is None:
            body = go_g(a).upper() if verb == "G" else go_g(a)
            sign = "+" if "+" in flags else " " if " " in flags else ""
            return _pad(body if body.startswith("-") else sign + body, flags, width)
        return f"%{flags}{width}{precision}{'g' if verb == 'v' else verb}" % a
    if verb in "dv" and isinstance(a, int) and not isinstance(a, bool):
        return f"%{flags}{width}d" % a
    return _pad(f"%{precision}s" % go_value(a), flags.replace("0", ""), width)


def format_go(fmt: str, args: Sequence[Value]) -> str:
    """Go's fmt.Sprintf for the verbs :func:`check_printf` accepts."""
    out: list[str] = []
    k = 0
    pos = 0
    while True:
        j = fmt.find("%", pos)
        if j < 0:
            out.append(fmt[pos:])
            return "".join(out)
        out.append(fmt[pos:j])
        m = _VERB.match(fmt, j)
        assert m is not None
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        if verb == "%":
            out.append("%")
        elif k < len(args):
            out.append(_one(flags, width, prec, verb, args[k]))
            k += 1
        else:
            out.append(f"%!{verb}(MISSING)")
        pos = m.end()
