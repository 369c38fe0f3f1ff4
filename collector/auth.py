"""Write tokens: kept only as SHA-256 hashes, compared in constant time, optionally scoped to one cluster.

A token is given as the secret itself or as ``sha256:<64 hex digits>`` (so a config file or a Kubernetes
Secret never needs to hold the secret), optionally followed by ``@<cluster>``: such a token may only write
series labelled ``cluster="<cluster>"``. ``gpufleet hash-token`` prints the hashed form of a secret.

Examples::

    --tokens 's3cret'                                        any cluster
    --tokens 'sha256:2bb80d53…@gpu-east,sha256:9f86d081…@gpu-west'
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """The tokens allowed to write. Empty: writes are open (only sensible on loopback)."""

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


__all__ = ["Token", "TokenSet", "hash_token", "parse_token", "scope_problem"]
