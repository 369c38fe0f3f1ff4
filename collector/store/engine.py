"""The store's database: opening the SQLAlchemy engine, the settings every part of the store shares, and
what a database error means for the caller (retry later, or give up on this batch)."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DataError, DBAPIError, OperationalError

from gpufleet.core.addresses import DATABASE_EXAMPLE, database_url

LOOKBACK_MS = 5 * 60 * 1000  # a sample counts as "current" for 5 minutes, as in Prometheus
LATE_MS = 2 * 60 * 1000  # maintenance leaves the newest 2 minutes alone; older samples are "late"
RAW_LAYOUTS = ("chunks", "rows")

try:  # the PostgreSQL fast path talks to psycopg directly (COPY), so its errors arrive unwrapped
    import psycopg

    DB_ERRORS: tuple[type[Exception], ...] = (OperationalError, DBAPIError, psycopg.Error)
except ImportError:  # pragma: no cover - SQLite-only installs
    DB_ERRORS = (OperationalError, DBAPIError)


# What a write may raise about the database or the batch: psycopg encodes text for a database that is not in
# UTF-8 itself, and raises UnicodeEncodeError for a character that database cannot hold.
WRITE_ERRORS: tuple[type[Exception], ...] = (*DB_ERRORS, UnicodeEncodeError)


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or refused the transaction; the caller should retry later.
    ``connection``: the connection failed (rather than the database refusing what was sent)."""

    def __init__(self, message: str, *, connection: bool = True) -> None:
        super().__init__(message)
        self.connection = connection


class BatchRefused(ValueError):
    """The database refused what one batch holds (a value its columns cannot hold, a character its encoding
    cannot store): sending the same batch again cannot succeed. The message names the problem, never SQL."""


def one_line(exc: BaseException | None) -> str:
    """A driver's message on one line (psycopg's span several, with a hint on the last)."""
    return " ".join(str(exc).split())


def connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` is about the connection (every batch would fail) rather than about one batch."""
    orig = getattr(exc, "orig", exc)
    if getattr(exc, "connection_invalidated", False):
        return True
    try:
        return isinstance(orig, psycopg.OperationalError) and not isinstance(
            orig, (psycopg.errors.TransactionRollback, psycopg.errors.LockNotAvailable)
        )
    except NameError:  # pragma: no cover - SQLite-only installs
        return isinstance(exc, OperationalError)


# SQLSTATE of PostgreSQL's data exceptions (class 22) that a batch can cause, in words a client can act on.
_DATA_PROBLEMS = {
    "22001": "a label value is longer than the store's column for it",  # string_data_right_truncation
    "22003": "a timestamp or number is out of the store's range",  # numeric_value_out_of_range
    "22008": "a timestamp is out of the store's range",  # datetime_field_overflow
    "22021": "a label holds a character the database's encoding cannot store",  # character_not_in_repertoire
    "22P05": "a label holds a character the database's encoding cannot store",  # untranslatable_character
    "22P02": "a label holds text the database cannot read",  # invalid_text_representation
}


def data_problem(exc: BaseException) -> str | None:
    """What is wrong with a batch's data, when ``exc`` says the database refused that data (PostgreSQL's
    class 22, psycopg refusing a NUL before sending, a DB-API DataError); None for any other error (the
    connection, the server's state, a deadlock), which a later try may get past."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, UnicodeEncodeError):  # psycopg encoding for a database that is not in UTF-8
        return f"a label holds a character the database's encoding ({orig.encoding}) cannot store"
    state = getattr(orig, "sqlstate", None) or ""
    if state.startswith("22"):
        return _DATA_PROBLEMS.get(state, f"the database refused the batch's data (SQLSTATE {state})")
    try:
        if isinstance(orig, psycopg.DataError):  # raised by psycopg itself, before anything is sent
            return "a label holds a NUL character" if "NUL" in str(orig) else "the database refused its data"
    except NameError:  # pragma: no cover - SQLite-only installs
        pass
    if isinstance(orig, sqlite3.DataError) or isinstance(exc, DataError):
        return "the database refused the batch's data"
    return None


@dataclass(frozen=True)
class Retention:
    """How long each resolution is kept; ``None`` keeps it forever."""

    raw_ms: int | None = 15 * 86_400_000
    rollup_1m_ms: int | None = 90 * 86_400_000
    rollup_1h_ms: int | None = 2 * 365 * 86_400_000


class Upsert(Protocol):
    """``INSERT … ON CONFLICT`` of the dialect at hand (SQLite's and PostgreSQL's share this surface)."""

    def __call__(self, table: Table) -> postgresql.Insert | sqlite.Insert: ...


@dataclass(frozen=True)
class Database:
    """One engine and how the store lays samples out on it: the parts of the store share this."""

    engine: Engine
    dialect: str  # "sqlite" | "postgresql"
    chunked: bool  # PostgreSQL compressed chunks (see chunks.py); else one row per sample

    @classmethod
    def on(cls, engine: Engine, raw_layout: str = "chunks") -> Database:
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported database {dialect!r}: use sqlite:///FILE or postgresql+psycopg://…"
            )
        if raw_layout not in RAW_LAYOUTS:
            raise ValueError(f"raw layout {raw_layout!r} is not one of {RAW_LAYOUTS}")
        # SQLite keeps one row per sample; "rows" on PostgreSQL is the naive layout, kept for comparison.
        return cls(engine, dialect, dialect == "postgresql" and raw_layout == "chunks")

    @property
    def insert(self) -> Upsert:
        return postgresql.insert if self.dialect == "postgresql" else sqlite.insert


def open_engine(url: str, *, create: bool = True, **engine_kw: object) -> Engine:
    """The engine for ``url`` (ValueError for a URL gpufleet cannot use). ``create=False``: a SQLite file
    that does not exist is StoreUnavailable instead of a new, empty store (read-only commands)."""
    url = database_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"the database URL is malformed ({exc}); write {DATABASE_EXAMPLE}") from None
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, **engine_kw)
    path = parsed.database
    if not create and path and path != ":memory:" and not os.path.exists(path):
        raise StoreUnavailable(
            f"there is no store at {path} (the SQLite file does not exist): point --db "
            "at the collector's store, or create one with `gpufleet db upgrade --db "
            "URL`",
            connection=False,
        )
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **engine_kw)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: sqlite3.Connection, _: object) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def driver_cursor(conn: Connection) -> Any:
    """A cursor of the driver's own connection under ``conn``'s transaction: psycopg's COPY and its
    server-side arrays are not in SQLAlchemy's API."""
    driver = conn.connection.driver_connection
    if driver is None:
        raise StoreUnavailable("the database connection was closed under a transaction")
    return driver.cursor()
