"""Label matchers, as Prometheus and Alertmanager write them (``name=value``, ``name!=value``,
``name=~regex``, ``name!~regex``; regexes fully anchored), and series fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypedDict

_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"?(.*?)\"?\s*")
HOW = "write name=value, name!=value, name=~regex or name!~regex"


class MatcherDoc(TypedDict):
    """A matcher as Alertmanager's API v2 spells it (silences in JSON)."""

    name: str
    value: str
    isRegex: bool
    isEqual: bool


@dataclass(frozen=True)
class Matcher:
    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True

    def matches(self, labels: Mapping[str, str]) -> bool:
        """A missing label reads as the empty string, as in Prometheus: ``pod=""`` matches series without one."""
        v = labels.get(self.name, "")
        hit = re.fullmatch(self.value, v) is not None if self.is_regex else v == self.value
        return hit == self.is_equal

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
        if "~" in op:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{text!r}: {value!r} is not a regular expression ({exc})") from None
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
        is_regex = bool(doc.get("isRegex", False))
        if is_regex:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"matcher {name}: {value!r} is not a regular expression ({exc})") from None
        return cls(name, value, is_regex, bool(doc.get("isEqual", True)))


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


def fingerprint(labels: Mapping[str, str]) -> int:
    """64-bit signed hash of a label set (``__name__`` included), stable across processes and releases: it is
    the key of stored series, so changing it splits every series in an existing database in two."""
    raw = json.dumps(sorted(labels.items()), separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)
