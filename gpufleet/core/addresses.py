"""Where a program listens and where the collector keeps its store, checked before anything starts: a mistake
becomes one sentence naming the fix instead of a failure deep inside a web server or SQLAlchemy."""

from __future__ import annotations

LISTEN_EXAMPLE = "write HOST:PORT, e.g. 0.0.0.0:9446, 127.0.0.1:9446 or [::1]:9446"
DATABASE_EXAMPLE = "sqlite:///PATH/gpufleet.db or postgresql+psycopg://USER:PASSWORD@HOST/DB"


def split_listen(listen: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT``; an IPv6 host goes in brackets, an empty host means every interface and
    port 0 lets the system pick one. ValueError with what to write for anything else."""
    host, colon, port = listen.strip().rpartition(":")
    if not colon:
        raise ValueError(f"{listen!r} is not HOST:PORT (no port): {LISTEN_EXAMPLE}")
    if not port.isdigit():
        raise ValueError(f"{listen!r} is not HOST:PORT: the port {port!r} is not a number; {LISTEN_EXAMPLE}")
    if int(port) > 65535:
        raise ValueError(f"{listen!r}: port {int(port)} is out of range (0-65535); {LISTEN_EXAMPLE}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{listen!r}: put an IPv6 address in brackets; {LISTEN_EXAMPLE}")
    return host.strip("[]") or "0.0.0.0", int(port)


def database_url(url: str) -> str:
    """The store's SQLAlchemy URL, with ``postgresql://`` made ``postgresql+psycopg://`` (the driver gpufleet
    ships). ValueError naming the fix for a URL gpufleet cannot store in. Messages show the scheme, never the
    rest of the URL: it may hold a password."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or not scheme.replace("+", "").replace("_", "").isalnum():
        shown = url if "@" not in url else "the --db value"  # "user:secret@host" without a scheme
        raise ValueError(f"{shown!r} is not a database URL: write {DATABASE_EXAMPLE}")
    dialect, _, driver = scheme.lower().partition("+")
    if dialect == "postgres":
        raise ValueError(
            f"{scheme}:// is not a URL scheme SQLAlchemy knows: write postgresql+psycopg://"
            f" (e.g. postgresql+psycopg://USER:PASSWORD@HOST/DB)"
        )
    if dialect == "postgresql":
        if driver not in ("", "psycopg"):
            raise ValueError(
                f"{scheme}:// needs a driver gpufleet does not ship: write postgresql+psycopg:// (psycopg 3)"
            )
        return "postgresql+psycopg://" + rest
    if dialect == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ValueError(f"{scheme}:// needs a driver gpufleet does not ship: write {DATABASE_EXAMPLE}")
        if rest and not rest.startswith("/"):
            raise ValueError(
                f"{url!r}: a SQLite URL has three slashes before a relative path and four before "
                f"an absolute one: sqlite:///{rest} or sqlite:////var/lib/gpufleet/{rest}"
            )
        return url.strip()
    raise ValueError(
        f"{scheme}:// is not supported: gpufleet stores in SQLite or PostgreSQL only; write "
        f"{DATABASE_EXAMPLE}"
    )
