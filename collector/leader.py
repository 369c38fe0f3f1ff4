"""Which collector evaluates rules and sends notifications when several share one PostgreSQL store.

Every replica takes writes and answers reads; only the holder of a PostgreSQL session-level advisory lock
evaluates rules. The lock lives on a dedicated connection (outside the pool), so it is held exactly as
long as that session: a leader that is killed, or whose host vanishes, loses its session and with it the
lock (the TCP keepalives set below bound how long PostgreSQL takes to notice a vanished host), and the next
replica to ask gets it. Replicas ask at every evaluation tick, so one takes over within one or two
evaluation intervals.

The leader checks its session is alive before every evaluation; a leader that cannot confirm it steps down
at once rather than risk two replicas notifying. SQLite allows one collector per file: it always leads.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

# One 64-bit key for "evaluates gpufleet rules" in this database.
LOCK_KEY = int.from_bytes(
    hashlib.blake2b(b"gpufleet-rule-evaluation", digest_size=8).digest(), "big", signed=True
)


class AlwaysLeader:
    """A single collector (SQLite store): it always evaluates."""

    is_leader = True

    def check(self) -> bool:
        return True

    def release(self) -> None:
        return None


class AdvisoryLockLeader:
    """Leadership through ``pg_try_advisory_lock`` on a dedicated PostgreSQL session."""

    def __init__(self, engine: Engine, *, key: int = LOCK_KEY, name: str = "") -> None:
        # Its own engine without a pool: the lock's session must never be handed to other work.
        self._engine = create_engine(
            engine.url,
            poolclass=NullPool,
            connect_args={
                "connect_timeout": 5,
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 3,
            },
        )
        self._key = key
        self._conn: Any = None
        self._name = name
        self._last_problem: str | None = None

    @property
    def is_leader(self) -> bool:
        return self._conn is not None

    def check(self) -> bool:
        """Confirm or try to take the lock. True while this collector may evaluate and notify."""
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:
                log.error(
                    "%slost the rule-evaluation lock (its database session ended: %s); "
                    "stepping down until it can be taken again",
                    self._prefix(),
                    _short(exc),
                )
                self._close()
                # Not retaken in the same breath: the other replicas get a tick to take over, so a
                # leader whose session keeps dying does not flap back at once.
                return False
        try:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception as exc:
            self._problem(f"cannot reach the database to take the rule-evaluation lock: {_short(exc)}")
            return False
        try:
            # The server drops the session (and the lock) soon after the leader's host stops answering.
            for setting, value in (
                ("tcp_keepalives_idle", 5),
                ("tcp_keepalives_interval", 2),
                ("tcp_keepalives_count", 3),
            ):
                conn.execute(text(f"SET {setting} = {value}"))
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar_one()
        except Exception as exc:
            conn.close()
            self._problem(f"cannot take the rule-evaluation lock: {_short(exc)}")
            return False
        if not got:
            conn.close()
            self._problem(None)
            return False
        self._conn = conn
        self._last_problem = None
        log.warning("%sthis collector now evaluates rules and sends notifications (leader)", self._prefix())
        return True

    def release(self) -> None:
        """Give the lock up (on shutdown), so another replica takes over at its next tick."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._close()
        self._engine.dispose()

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.invalidate()
        self._conn = None

    def _problem(self, message: str | None) -> None:
        if message and message != self._last_problem:
            log.warning("%s%s; another replica may lead meanwhile", self._prefix(), message)
        self._last_problem = message

    def _prefix(self) -> str:
        return f"{self._name}: " if self._name else ""


def _short(exc: BaseException) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__


def leadership_for(engine: Engine, *, name: str = "") -> AlwaysLeader | AdvisoryLockLeader:
    return AdvisoryLockLeader(engine, name=name) if engine.dialect.name == "postgresql" else AlwaysLeader()


__all__ = ["LOCK_KEY", "AdvisoryLockLeader", "AlwaysLeader", "leadership_for"]
