"""Annotation templates: the part of Prometheus' alert templating (Go text/template with Prometheus'
functions) that rule annotations use, checked when a rule loads and rendered for Slack and the console.

Everything accepted here renders the same in Prometheus, so ``gpufleet alerts export`` copies annotations as
they are. What Prometheus would reject, or what only a Prometheus server can render (``query``, external
labels), is a load error naming the fix, never a literal ``{{`` in a Slack message.

* data: ``$labels.NAME`` / ``.Labels.NAME`` (a string, empty when the alert lacks the label),
  ``$value`` / ``.Value`` (the alert's value), ``index $labels "NAME"``;
* literals: "strings", `raw strings`, numbers, true, false;
* pipelines ``{{ $value | humanizePercentage }}``, calls ``{{ humanize $value }}``, parentheses;
* ``{{ if … }} … {{ else if … }} … {{ else }} … {{ end }}``, comments ``{{/* … */}}``, trim markers
  ``{{-`` / ``-}}``;
* the functions of :mod:`gpufleet.collector.rules.template_functions`.

``{{ $value }}`` alone prints four significant digits (Prometheus prints every digit of the float); a rule
that wants the same text in both writes ``{{ $value | printf "%.4g" }}`` or a humanize function.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from gpufleet.collector.rules.template_functions import (
    ANY,
    BOOL,
    COMPARISONS,
    FLOAT,
    FUNCTIONS,
    INT,
    MAP,
    NUMERIC,
    ONLY_IN_PROMETHEUS,
    STR,
    Function,
    Value,
    check_printf,
    go_g4,
    go_value,
    truth,
)


class TemplateError(ValueError):
    """A template that Prometheus would refuse or gpufleet cannot render: what is wrong and what to write."""


# ---- parsing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Lit:
    value: Value
    type: str

    def eval(self, labels: Mapping[str, str], value: float | None) -> Value:
        return self.value


@dataclass(frozen=True)
class _Data:
    """``$labels.NAME``, ``$labels``, ``$value`` (and their ``.Labels`` / ``.Value`` spellings)."""

    label: str | None  # None: the label map
    is_value: bool
    type: str

    def eval(self, labels: Mapping[str, str], value: float | None) -> Value:
        if self.is_value:
            return None if value is None else float(value)
        return labels if self.label is None else labels.get(self.label, "")


@dataclass(frozen=True)
class _Call:
    name: str
    fn: Function
    args: tuple[_Expr, ...]
    type: str

    def eval(self, labels: Mapping[str, str], value: float | None) -> Value:
        if self.name in ("and", "or"):  # Go evaluates these lazily
            x: Value = None
            for a in self.args:
                x = a.eval(labels, value)
                if truth(x) == (self.name == "or"):
                    return x
            return x
        return self.fn.run(*(a.eval(labels, value) for a in self.args))


_Expr = _Lit | _Data | _Call


@dataclass(frozen=True)
class _Print:
    expr: _Expr

    def render(self, labels: Mapping[str, str], value: float | None, out: list[str]) -> None:
        x = self.expr.eval(labels, value)
        if isinstance(x, float) or x is None:
            out.append("" if x is None else go_g4(x))
        else:
            out.append(go_value(x) if not isinstance(x, Mapping) else "")


@dataclass(frozen=True)
class _If:
    branches: tuple[tuple[_Expr, tuple[_Node, ...]], ...]
    otherwise: tuple[_Node, ...]

    def render(self, labels: Mapping[str, str], value: float | None, out: list[str]) -> None:
        for cond, body in self.branches:
            if truth(cond.eval(labels, value)):
                _render_all(body, labels, value, out)
                return
        _render_all(self.otherwise, labels, value, out)


_Node = str | _Print | _If


def _render_all(
    nodes: Sequence[_Node], labels: Mapping[str, str], value: float | None, out: list[str]
) -> None:
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        else:
            n.render(labels, value, out)


@dataclass(frozen=True)
class Template:
    """A checked template; :meth:`render` never raises."""

    text: str
    nodes: tuple[_Node, ...]

    def render(self, labels: Mapping[str, str], value: float | None) -> str:
        out: list[str] = []
        try:
            _render_all(self.nodes, labels, value, out)
        except (ValueError, TypeError, OverflowError, re.error) as exc:  # a regex or number known only now
            return f"<error expanding template: {exc}>"
        return "".join(out)


_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<string>"(?:[^"\\\n]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<number>[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
      | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
      | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<pipe>\|)
      | (?P<open>\()
      | (?P<close>\))
      | (?P<assign>:?=)
    """,
    re.X,
)
_KEYWORDS = ("range", "with", "define", "template", "block", "break", "continue")


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def _snippet(text: str, start: int, end: int) -> str:
    """Part of a template for a one-line message: line breaks shown as \\n, long parts cut."""
    s = text[start:end].replace("\n", "\\n").replace("\r", "\\r")
    return s if len(s) <= 60 else s[:57] + "..."


_SPACE = " \t\r\n"
_RIGHT_TRIM = re.compile(r"[ \t\r\n]+-}}")


def _lex_action(text: str, start: int, i: int) -> tuple[list[_Tok], bool, int]:
    """Tokens of the action opened at ``start`` whose body begins at ``i``; whether it ends with a trim
    marker; the index after its ``}}``."""
    toks: list[_Tok] = []
    while True:
        if text.startswith("}}", i):
            return toks, False, i + 2
        m = _RIGHT_TRIM.match(text, i)
        if m:
            return toks, True, m.end()
        if i >= len(text):
            raise _Unclosed()
        if text[i] == "}":
            raise TemplateError(
                f"'{_snippet(text, start, i + 1)}' closes with a single }}; write {_snippet(text, start, i).rstrip()} }}}}"
            )
        m = _TOKEN.match(text, i)
        if m is None:
            if text[i] == "'":
                raise TemplateError(
                    f"'{_snippet(text, start, i + 8)}': '…' is a character in Go templates; write \"…\" for text"
                )
            if text[i] in '"`':
                raise TemplateError(
                    f"'{_snippet(text, start, len(text))}': a string without its closing {text[i]}"
                )
            raise TemplateError(f"'{_snippet(text, start, i + 1)}': unexpected {text[i]!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            toks.append(_Tok(kind, m.group(0)))
        i = m.end()


class _Unclosed(Exception):
    pass


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


_VARS = {"$labels": "labels", "$value": "value", ".Labels": "labels", ".Value": "value"}
_NOT_HERE = {
    "$externalLabels": "gpufleet has no external labels; the cluster is $labels.cluster",
    ".ExternalLabels": "gpufleet has no external labels; the cluster is $labels.cluster",
    "$externalURL": "templates do not know a server URL; put links in runbook_url",
    ".ExternalURL": "templates do not know a server URL; put links in runbook_url",
}


class _Parser:
    def __init__(self, toks: list[_Tok], action: str) -> None:
        self.toks = toks
        self.pos = 0
        self.action = action

    def fail(self, msg: str) -> TemplateError:
        return TemplateError(f"{self.action}: {msg}")

    def pipeline(self, stop: str | None = None) -> _Expr:
        commands: list[list[_Tok | _Expr]] = [[]]
        while self.pos < len(self.toks):
            t = self.toks[self.pos]
            if t.kind == "close":
                if stop != "close":
                    raise self.fail("a ')' without its '('")
                break
            self.pos += 1
            if t.kind == "pipe":
                if not commands[-1]:
                    raise self.fail("'|' needs a value before it, e.g. {{ $value | humanize }}")
                commands.append([])
            elif t.kind == "open":
                commands[-1].append(self.pipeline("close"))
                if self.pos >= len(self.toks):
                    raise self.fail("a '(' without its ')'")
                self.pos += 1
            else:
                commands[-1].append(t)
        if not commands[-1]:
            raise self.fail(
                "a '|' with nothing after it"
                if len(commands) > 1
                else "an empty action; write {{ $value }} or {{ $labels.NAME }}"
            )
        expr: _Expr | None = None
        for cmd in commands:
            expr = self.command(cmd, expr)
        assert expr is not None
        return expr

    def command(self, ops: list[_Tok | _Expr], piped: _Expr | None) -> _Expr:
        first = ops[0]
        if isinstance(first, _Tok) and first.kind == "ident" and first.text not in ("true", "false", "nil"):
            args = [self.operand(o) for o in ops[1:]]
            if piped is not None:
                args.append(piped)
            return self.call(first.text, args)
        if piped is not None:
            raise self.fail(
                f"{_show_op(first)} after '|' is not a function; a pipeline passes a value to a function, "
                "e.g. {{ $value | humanizePercentage }}"
            )
        if len(ops) > 1:
            raise self.fail(
                f"{_show_op(first)} is not a function and takes no arguments; separate actions: "
                "{{ $labels.a }} {{ $labels.b }}"
            )
        return self.operand(first)

    def operand(self, o: _Tok | _Expr) -> _Expr:
        if not isinstance(o, _Tok):
            return o
        if o.kind == "string":
            try:
                return _Lit(_go_unquote(o.text), STR)
            except ValueError as exc:
                raise self.fail(f"string {o.text}: {exc}") from None
        if o.kind == "raw":
            return _Lit(o.text[1:-1], STR)
        if o.kind == "number":
            try:
                if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|\d+)", o.text):
                    return _Lit(int(o.text, 0), INT)
                return _Lit(float(o.text), FLOAT)
            except ValueError:
                raise self.fail(f"{o.text} is not a number") from None
        if o.kind == "ident":
            if o.text in ("true", "false"):
                return _Lit(o.text == "true", BOOL)
            if o.text == "nil":
                raise self.fail('nil is not a value; compare with "" to test for a missing label')
            return self.call(o.text, [])
        if o.kind in ("var", "field"):
            return self.data(o.text)
        raise self.fail(f"unexpected {o.text!r}")

    def data(self, text: str) -> _Expr:
        if text in (".", "$"):
            raise self.fail(f"{text} is the whole alert; print $labels.NAME or $value")
        if text.startswith("$"):
            head, _, rest = text.partition(".")
        else:
            head, _, rest = text[1:].partition(".")
            head = "." + head
        if head in _NOT_HERE:
            raise self.fail(f"{head}: {_NOT_HERE[head]}")
        if head not in _VARS:
            known = ["$labels", "$value"] if head.startswith("$") else [".Labels", ".Value"]
            kind = "variable" if head.startswith("$") else "field"
            raise self.fail(
                f"unknown {kind} {head}; {_suggest(head, known)}annotations know $labels.NAME and $value"
            )
        fields = rest.split(".") if rest else []
        if _VARS[head] == "value":
            if fields:
                raise self.fail(f"{head} is a number and has no field .{fields[0]}; write {head}")
            return _Data(None, True, FLOAT)
        if len(fields) > 1:
            raise self.fail(
                f"{text}: a label is a string and has no field .{fields[1]}; write {head}.{fields[0]}"
            )
        if not fields:
            return _Data(None, False, MAP)
        return _Data(fields[0], False, STR)

    def call(self, name: str, args: list[_Expr]) -> _Expr:
        if name in ("if", "else", "end", *_KEYWORDS):
            raise self.fail(f"{name} must start the action, as in {{{{ {name} … }}}}")
        fn = FUNCTIONS.get(name)
        if fn is None:
            if name in ONLY_IN_PROMETHEUS:
                raise self.fail(f"function {name} {ONLY_IN_PROMETHEUS[name]}")
            close = _suggest(name, list(FUNCTIONS))
            raise self.fail(
                f"unknown function {name}; "
                + (
                    f"{close}(docs/rules.md lists the functions)"
                    if close
                    else f"use one of {', '.join(FUNCTIONS)}"
                )
            )
        n_min = len(fn.params)
        if len(args) < n_min or (fn.rest is None and len(args) > n_min):
            want = f"{n_min} argument{'s' if n_min != 1 else ''}" + (
                " or more" if fn.rest is not None else ""
            )
            raise self.fail(f"{name} takes {want}, got {len(args)}")
        for i, a in enumerate(args):
            allowed = fn.params[i] if i < n_min else fn.rest
            assert allowed is not None
            if a.type != ANY and a.type not in allowed:
                raise self.fail(_type_problem(name, i, allowed, a.type))
        result = fn.returns
        if name in COMPARISONS:
            if ANY not in (args[0].type, args[1].type) and args[0].type != args[1].type:
                raise self.fail(
                    f"{name} compares {_a(args[0].type)} with {_a(args[1].type)}, which Go refuses; compare "
                    "like with like (a number with 0.5, not 1: write 1.0)"
                )
            if name not in ("eq", "ne") and BOOL in (args[0].type, args[1].type):
                raise self.fail(f"{name} cannot order true and false")
        elif name in ("and", "or"):
            types = {a.type for a in args}
            result = types.pop() if len(types) == 1 else ANY
        elif name == "printf":
            fmt = args[0]
            if not isinstance(fmt, _Lit):
                raise self.fail('printf needs its format as a literal string, e.g. printf "%.2f" $value')
            try:
                check_printf(str(fmt.value), [a.type for a in args[1:]])
            except ValueError as exc:
                raise self.fail(str(exc)) from None
        elif fn.params == (NUMERIC,) and isinstance(args[0], _Lit) and args[0].type == STR:
            try:
                float(str(args[0].value))
            except ValueError:
                raise self.fail(f"{name}: {args[0].value!r} is not a number") from None
        elif name in ("reReplaceAll", "match"):
            pattern = args[0]
            if isinstance(pattern, _Lit):
                try:
                    re.compile(str(pattern.value))
                except re.error as exc:
                    raise self.fail(
                        f"{name}: {pattern.value!r} is not a regular expression ({exc})"
                    ) from None
        return _Call(name, fn, tuple(args), result)


def _a(t: str) -> str:
    return {INT: "an integer", ANY: "anything", MAP: "the label map"}.get(t, f"a {t}")


def _type_problem(name: str, i: int, allowed: frozenset[str], got: str) -> str:
    want = " or ".join(_a(t) for t in sorted(allowed - {ANY}))
    fix = {
        MAP: "pass one label: $labels.NAME",
        FLOAT: f'format the number first: printf "%.2f" … | {name}',
        INT: f'format the number first: printf "%d" … | {name}',
        BOOL: "use it as a condition: {{ if … }} … {{ end }}",
        STR: "docs/rules.md lists what each function takes",
    }[got]
    return f"{name} takes {want} as argument {i + 1}, not {_a(got)}; {fix}"


def _show_op(o: _Tok | _Expr) -> str:
    if isinstance(o, _Tok):
        return o.text
    return "(…)"


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _go_unquote(s: str) -> str:
    """A Go interpreted string literal's value."""
    out: list[str] = []
    i = 1
    while i < len(s) - 1:
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = s[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = s[i + 2 : i + 2 + n]
            if not re.fullmatch(f"[0-9a-fA-F]{{{n}}}", digits):
                raise ValueError(f"\\{e} needs {n} hex digits")
            out.append(chr(int(digits, 16)))
            i += 2 + n
        elif e in "01234567":
            digits = s[i + 1 : i + 4]
            if not re.fullmatch(r"[0-7]{3}", digits):
                raise ValueError("an octal escape needs 3 digits")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{e}")
    return "".join(out)


@dataclass
class _Block:
    """An ``{{ if }}`` being read: the branches so far, the open branch's condition (None after ``else``) and
    nodes, and the action that opened it."""

    branches: list[tuple[_Expr, tuple[_Node, ...]]]
    cond: _Expr | None
    parent: list[_Node]
    opened: str


class _Builder:
    def __init__(self) -> None:
        self.root: list[_Node] = []
        self.out = self.root
        self.open: list[_Block] = []

    def action(self, action: str, toks: list[_Tok]) -> None:
        if any(t.kind == "assign" for t in toks):
            raise TemplateError(
                f"{action}: variables cannot be set in annotations; write the expression where it is used"
            )
        head = toks[0].text if toks and toks[0].kind == "ident" else ""
        p = _Parser(toks, action)
        if head in _KEYWORDS:
            raise TemplateError(
                f"{action}: {{{{ {head} }}}} is not rendered in gpufleet annotations; use "
                "{{ if … }} … {{ else }} … {{ end }} with $labels.NAME and $value"
            )
        if head == "if":
            p.pos = 1
            self.open.append(_Block([], p.pipeline(), self.out, action))
            self.out = []
        elif head == "else":
            if not self.open:
                raise TemplateError(f"{action}: an else outside any {{{{ if }}}}")
            b = self.open[-1]
            if b.cond is None:
                raise TemplateError(f"{action}: a second else in {b.opened} … {{{{ end }}}}")
            b.branches.append((b.cond, tuple(self.out)))
            b.cond = None
            if len(toks) > 1:
                if toks[1].kind != "ident" or toks[1].text != "if":
                    raise TemplateError(f"{action}: else takes nothing after it but 'if …'")
                p.pos = 2
                b.cond = p.pipeline()
            self.out = []
        elif head == "end":
            if len(toks) > 1:
                raise TemplateError(f"{action}: end takes nothing after it")
            if not self.open:
                raise TemplateError(f"{action}: an end without its {{{{ if }}}}")
            b = self.open.pop()
            if b.cond is not None:
                b.branches.append((b.cond, tuple(self.out)))
                b.parent.append(_If(tuple(b.branches), ()))
            else:
                b.parent.append(_If(tuple(b.branches), tuple(self.out)))
            self.out = b.parent
        else:
            expr = p.pipeline()
            if expr.type == MAP:
                raise TemplateError(f"{action}: prints the whole label map; print one label: $labels.NAME")
            self.out.append(_Print(expr))


@lru_cache(maxsize=4096)
def parse(text: str) -> Template:
    """Check ``text`` once (cached: the engine renders on every evaluation); TemplateError names the fix."""
    b = _Builder()
    i = 0
    while True:
        j = text.find("{{", i)
        if j < 0:
            b.out.append(text[i:])
            break
        chunk = text[i:j]
        body = j + 2
        if text[body : body + 1] == "-" and text[body + 1 : body + 2] in tuple(_SPACE):  # {{- trims before
            chunk = chunk.rstrip(_SPACE)
            body += 2
        b.out.append(chunk)
        if text.startswith("/*", body):  # {{/* comment */}}
            end = text.find("*/", body + 2)
            m = _COMMENT_END.match(text, end) if end >= 0 else None
            if m is None:
                raise TemplateError(f"'{_snippet(text, j, j + 30)}': a comment ends with */}}}}")
            i = _skip_space(text, m.end()) if m.group(1) else m.end()
            continue
        try:
            toks, trim_right, after = _lex_action(text, j, body)
        except _Unclosed:
            line = text[j:].split("\n")[0].rstrip()
            raise TemplateError(
                f"'{_snippet(text, j, len(text))}' has no closing }}}}; end the action with }}}}, "
                f"e.g. {_snippet(line, 0, len(line))} }}}}"
            ) from None
        b.action(_snippet(text, j, after), toks)
        i = _skip_space(text, after) if trim_right else after
    if b.open:
        raise TemplateError(f"{b.open[-1].opened} has no {{{{ end }}}}; close the block with {{{{ end }}}}")
    return Template(text, tuple(n for n in b.root if n != ""))


_COMMENT_END = re.compile(r"\*/([ \t\r\n]-)?}}")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def render(template: str, labels: Mapping[str, str], value: float | None) -> str:
    """``template`` rendered for one alert; a template that does not check comes out as Prometheus shows it,
    ``<error expanding template: …>`` (rules from files are checked when they load, so only code that builds a
    Rule by hand can get there)."""
    try:
        t = parse(template)
    except TemplateError as exc:
        return f"<error expanding template: {exc}>"
    return t.render(labels, value)
