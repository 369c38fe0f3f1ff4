"""Tokens: kept only as SHA-256 hashes, compared in constant time, optionally scoped to one cluster.

A token is given as the secret itself or as ``sha256:<64 hex digits>`` (so a config file or a Kubernetes
Secret never needs to hold the secret), optionally followed by ``@<cluster>``. ``gpufleet hash-token`` prints
the hashed form of a secret.

Two kinds (:class:`Access`):

* **write tokens** (``--tokens``) write samples, add and expire silences, and read;
* **read tokens** (``--read-tokens``) only read: queries, GPUs, the fleet, the report, alerts, silences.

Once any token is configured every read needs one of either kind; with none at all the API is open (only
sensible on loopback, as ``gpufleet up`` runs). A token scoped to a cluster keeps to it everywhere: it writes
only series labelled ``cluster="<cluster>"``, adds and expires only silences pinned to that cluster by a
``cluster="<cluster>"`` matcher, and reads only that cluster's series, GPUs, alerts and silences.

Examples::

    --tokens 's3cret'                                        any cluster
    --tokens 'sha256:2bb80d53…@gpu-east,sha256:9f86d081…@gpu-west'
    --read-tokens 'sha256:5e884898…@gpu-east'                 reads gpu-east only
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet.core.labels import Matcher

_HEX = re.compile(r"^[0-9a-f]{64}$")
_CLUSTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}$")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Token:
    digest: str  # hex SHA-256 of the secret
    cluster: str | None = None  # None: may write any cluster

    @property
    def name(self) -> str:
        """How logs and errors name a token: a prefix of its hash, never the secret."""
        return f"sha256:{self.digest[:8]}…"


def parse_token(spec: str) -> Token:
    """``SECRET``, ``sha256:HEX``, either one with ``@CLUSTER`` after it."""
    spec = spec.strip()
    secret, cluster = spec, None
    head, at, tail = spec.rpartition("@")
    if at and head and _CLUSTER.match(tail):
        secret, cluster = head, tail
    if not secret:
        raise ValueError("an empty token was given; remove the stray comma or give a secret")
    if secret.lower().startswith("sha256:"):
        digest = secret[7:].lower()
        if not _HEX.match(digest):
            raise ValueError(
                "a token given as sha256:… must be followed by 64 hex digits "
                "(make one with: gpufleet hash-token)"
            )
        return Token(digest, cluster)
    return Token(hash_token(secret), cluster)


class TokenSet:
    """The tokens of one kind (write or read). Empty write tokens: writes are open (only sensible on loopback)."""

    def __init__(self, tokens: Iterable[Token] = ()) -> None:
        self.tokens: tuple[Token, ...] = tuple(tokens)

    @classmethod
    def parse(cls, specs: Sequence[str | Token]) -> TokenSet:
        return cls(
            s if isinstance(s, Token) else parse_token(s) for s in specs if isinstance(s, Token) or s.strip()
        )

    @classmethod
    def from_file(cls, path: str | Path) -> list[Token]:
        """One token per line (``#`` starts a comment): the format of a mounted Kubernetes Secret."""
        out = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                out.append(parse_token(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
        return out

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def check(self, authorization: str | None) -> Token | None:
        """The token an ``Authorization: Bearer …`` header carries, if it is one of ours; else None.
        Every configured hash is compared, in constant time, whichever matches."""
        header = authorization or ""
        if header[:7].lower() != "bearer ":
            return None
        offered = hash_token(header[7:].strip())
        found: Token | None = None
        for t in self.tokens:
            if hmac.compare_digest(offered, t.digest) and found is None:
                found = t
        return found


class Refused(Exception):
    """A request its token does not allow: ``status`` 401 (no token of ours), 403 (outside its scope) or 429
    (over its rate, again after ``retry_after_s``)."""

    def __init__(self, status: int, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


class Access:
    """Who may do what, from the write tokens and the read tokens (see the module's description)."""

    def __init__(self, write: TokenSet, read: TokenSet | None = None) -> None:
        self.write = write
        self.read = read if read is not None else TokenSet()

    @property
    def open(self) -> bool:
        return not self.write and not self.read

    def writer(self, authorization: str | None) -> Token | None:
        """The write token of a change (a silence); None where writes are open. Refused (401) otherwise."""
        if not self.write:
            return None
        token = self.write.check(authorization)
        if token is None:
            raise Refused(
                401,
                "missing or wrong bearer token: changes need a write token; set --token (GPUFLEET_TOKEN) to "
                "one of the collector's --tokens",
            )
        return token

    def reader(self, authorization: str | None) -> Token | None:
        """The token of a read, write or read token; None where the API is open. Refused (401) otherwise."""
        if self.open:
            return None
        # Both sets are checked, whichever holds the token: the time taken does not tell which kind it is.
        as_writer, as_reader = self.write.check(authorization), self.read.check(authorization)
        token = as_writer or as_reader
        if token is None:
            raise Refused(
                401,
                "missing or wrong bearer token: reads need a read or write token when the collector has "
                "tokens; set --token (GPUFLEET_READ_TOKEN or GPUFLEET_TOKEN) to one of its --read-tokens "
                "or --tokens",
            )
        return token


def silence_scope_problem(token: Token | None, matchers: Sequence[Matcher]) -> str | None:
    """Why ``token`` may not add a silence of ``matchers``: a scoped token must pin its own cluster."""
    if token is None or token.cluster is None:
        return None
    if any(m.pins("cluster", token.cluster) for m in matchers):
        return None
    return (
        f"token {token.name} is scoped to cluster {token.cluster!r} and may only silence alerts of that "
        f'cluster: add the matcher cluster="{token.cluster}" (equality, not a regex); nothing was added'
    )


class RateLimit:
    """At most ``per_minute`` events per key in any 60 seconds (a sliding window): ``take`` says 0 when one
    more is allowed now and counts it, else the seconds until one is."""

    WINDOW_S = 60.0
    MAX_KEYS = 10_000  # past it, keys quiet for a whole window are forgotten

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._events: dict[str, deque[float]] = {}

    def take(self, key: str) -> float:
        now = self._clock()
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.WINDOW_S:
            events.popleft()
        if len(events) >= self.per_minute:
            return events[0] + self.WINDOW_S - now
        events.append(now)
        if len(self._events) > self.MAX_KEYS:
            self._events = {k: e for k, e in self._events.items() if e and e[-1] > now - self.WINDOW_S}
        return 0.0


class SampleRate:
    """A token bucket per key: ``rate`` samples a second on average, ``burst`` at once. ``take(key, n)`` says 0
    and counts ``n`` when they fit now, else the seconds until they would (and counts nothing). A request
    larger than ``burst`` passes once the bucket is full, leaving it in debt, so no request is refused for good
    by the rate alone."""

    MAX_KEYS = 10_000  # past it, full buckets (keys quiet long enough to refill) are forgotten

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (samples left, when)

    def take(self, key: str, n: int) -> float:
        now = self._clock()
        left, at = self._buckets.get(key, (self.burst, now))
        left = min(self.burst, left + (now - at) * self.rate)
        need = min(n, self.burst)
        if left < need:
            self._buckets[key] = (left, now)
            return (need - left) / self.rate
        self._buckets[key] = (left - n, now)
        if len(self._buckets) > self.MAX_KEYS:
            full = self.burst / self.rate
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
        return 0.0


def scope_problem(token: Token, series_labels: Iterable[dict[str, str]]) -> str | None:
    """Why a request may not be written with ``token``: the first series outside its cluster."""
    if token.cluster is None:
        return None
    for labels in series_labels:
        got = labels.get("cluster")
        if got != token.cluster:
            where = f"cluster={got!r}" if got is not None else "no cluster label"
            name = labels.get("__name__", "?")
            ident = ",".join(f"{k}={labels[k]}" for k in ("node", "gpu") if k in labels)
            return (
                f"token {token.name} may only write cluster {token.cluster!r}, but series {name}"
                f"{'{' + ident + '}' if ident else ''} has {where}; nothing in this request was stored. "
                f"Run the agent with --cluster {token.cluster} or give it that cluster's token"
            )
    return None


__all__ = [
    "Access",
    "RateLimit",
    "Refused",
    "Token",
    "TokenSet",
    "hash_token",
    "parse_token",
    "scope_problem",
    "silence_scope_problem",
]
