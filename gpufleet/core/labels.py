"""Label matchers, as Prometheus and Alertmanager write them (``name=value``, ``name!=value``,
``name=~regex``, ``name!~regex``), their regexes, and series fingerprints.

Label regexes run on RE2, as Prometheus' do: matching takes time linear in the label's length whatever the
pattern, so a silence such as ``node=~"(a+)+$"`` costs microseconds, not minutes (Python's backtracking ``re``
doubled its time per character and held the interpreter lock meanwhile). RE2 has no backreferences and no
lookaround; such patterns, and patterns over :data:`MAX_REGEX_BYTES`, are refused where a matcher is made, so a
silence or a rule file is checked when it is added or loaded, never at evaluation."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

import re2

_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"?(.*?)\"?\s*")
HOW = "write name=value, name!=value, name=~regex or name!~regex"
MAX_REGEX_BYTES = 1024
# A pattern without these characters can only match itself; with none but "|", only one of its alternatives.
_META = frozenset("\\.+*?()[]{}^$")
_RE2_OPTIONS = re2.Options()
# RE2 would print every refused pattern to stderr; the caller says why instead.
_RE2_OPTIONS.log_errors = False


class _Compiled(Protocol):
    """What Regex uses of a compiled RE2 pattern (google-re2 ships no type information)."""

    def search(self, text: str) -> object | None: ...


class Regex:
    """A label regex as Prometheus runs it: RE2, fully anchored (``^(?:pattern)$``)."""

    __slots__ = ("_anchored", "_literals", "pattern")

    def __init__(self, pattern: str) -> None:
        size = len(pattern.encode("utf-8", "surrogatepass"))
        if size > MAX_REGEX_BYTES:
            raise ValueError(
                f"the regex is {size} bytes, over the limit of {MAX_REGEX_BYTES}; match fewer values, or "
                "one label that groups them"
            )
        self.pattern = pattern
        self._literals: frozenset[str] | None = None
        if not _META & set(pattern):
            self._literals = frozenset(pattern.split("|"))
        try:
            re2.compile(pattern, _RE2_OPTIONS)  # alone first: "a)|(b" must not pass by way of the anchors
            self._anchored: _Compiled = re2.compile(f"^(?:{pattern})$", _RE2_OPTIONS)
        except re2.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression RE2 accepts ({_why(exc)})") from None
        except UnicodeEncodeError:
            raise ValueError(f"{pattern!r} is not valid UTF-8 (a lone surrogate)") from None

    def fullmatch(self, value: str) -> bool:
        if self._literals is not None:
            return value in self._literals
        try:
            return self._anchored.search(value) is not None
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 pattern matches it
            return False

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


def _why(exc: re2.error) -> str:
    text = exc.args[0] if exc.args else exc
    why = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    if "perl operator" in why or "escape sequence" in why:
        why += "; RE2 has no lookaround or backreferences"
    return why


@functools.lru_cache(maxsize=4096)
def label_regex(pattern: str) -> Regex:
    """The compiled form of ``pattern``, shared by every matcher and rule that uses it; ValueError (saying
    why) for a pattern RE2 refuses or one over :data:`MAX_REGEX_BYTES`."""
    return Regex(pattern)


def regex_fullmatch(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` whole, as ``label=~"pattern"`` does in Prometheus."""
    return label_regex(pattern).fullmatch(value)


class MatcherDoc(TypedDict):
    """A matcher as Alertmanager's API v2 spells it (silences in JSON)."""

    name: str
    value: str
    isRegex: bool
    isEqual: bool


@dataclass(frozen=True)
class Matcher:
    """One matcher; a regex one is compiled when made, so a bad regex never gets as far as a silence."""

    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True
    _regex: Regex | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.is_regex:
            try:
                object.__setattr__(self, "_regex", label_regex(self.value))
            except ValueError as exc:
                raise ValueError(f"matcher {self.name}: {exc}") from None

    def matches(self, labels: Mapping[str, str]) -> bool:
        """A missing label reads as the empty string, as in Prometheus: ``pod=""`` matches series without one."""
        v = labels.get(self.name, "")
        hit = self._regex.fullmatch(v) if self._regex is not None else v == self.value
        return hit == self.is_equal

    def pins(self, name: str, value: str) -> bool:
        """Whether this matcher admits only ``name="value"`` (plain equality): how a silence keeps to one
        cluster."""
        return self.name == name and self.value == value and self.is_equal and not self.is_regex

    @property
    def op(self) -> str:
        return ("=~" if self.is_regex else "=") if self.is_equal else ("!~" if self.is_regex else "!=")

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """``name=value``, ``name!=value``, ``name=~regex``, ``name!~regex`` (as amtool takes them)."""
        m = _MATCHER.fullmatch(text)
        if not m:
            raise ValueError(f"{text!r} is not a matcher; {HOW}")
        name, op, value = m.groups()
        return cls(name, value, is_regex="~" in op, is_equal=not op.startswith("!"))

    def to_api(self) -> MatcherDoc:
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex, "isEqual": self.is_equal}

    @classmethod
    def from_api(cls, doc: object) -> Matcher:
        """A matcher from decoded JSON; anything else is refused with what a matcher needs."""
        name = doc.get("name") if isinstance(doc, dict) else None
        value = doc.get("value") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(
                f"a matcher needs string 'name' and 'value' (and optional isRegex, isEqual), not {doc!r}"
            )
        return cls(name, value, bool(doc.get("isRegex", False)), bool(doc.get("isEqual", True)))


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


def fingerprint(labels: Mapping[str, str]) -> int:
    """64-bit signed hash of a label set (``__name__`` included), stable across processes and releases: it is
    the key of stored series, so changing it splits every series in an existing database in two."""
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)
