"""The PostgreSQL partitions this process knows exist, shared by ingest (which creates an hour it writes
when no one did before) and maintenance (which creates the coming hours and days ahead of time, and drops
what retention or compaction retires)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from sqlalchemy.engine import Engine

from gpufleet.collector.store import chunks
from gpufleet.collector.store.engine import driver_cursor

log = logging.getLogger(__name__)

# How long partition DDL waits for a lock before it gives up, to be tried again later. Creating a partition
# (CREATE TABLE, then ATTACH PARTITION) takes no lock a read or a write waits on; dropping one takes an
# ACCESS EXCLUSIVE lock on its parent, which every write to the parent then waits behind: this bounds
# that wait. Under PostgreSQL's default deadlock_timeout (1 s), so a waiting DDL gives up before a writer
# it waits for could be cancelled as a deadlock victim.
LOCK_TIMEOUT_MS = 500


class Partitions:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def ensure(self, table: str, times_ms: Iterable[int]) -> list[str]:
        """Create the partitions of ``table`` that rows at ``times_ms`` need, in a committed transaction of
        their own (a batch that fails later does not take a new partition down with it); the names created.
        Known partitions cost nothing: the hours ingest writes are created ahead by maintenance."""
        times_ms = list(times_ms)
        with self._lock:
            if all(chunks.partition_name(table, t) in self._known for t in times_ms):
                return []
            known = set(self._known)
        started = time.monotonic()
        with self._engine.begin() as conn:
            cur = driver_cursor(conn)
            cur.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            created = chunks.ensure_partitions(cur, table, times_ms, known)
        with self._lock:
            self._known |= known
        if created:
            log.info(
                "store maintenance: partitions took %.2f s: created %s",
                time.monotonic() - started,
                ", ".join(created),
            )
        return created

    def forget(self, name: str) -> None:
        """A partition was dropped (compacted or past retention)."""
        with self._lock:
            self._known.discard(name)

    def forget_all(self) -> None:
        """Another collector may have dropped one we knew: learn them again."""
        with self._lock:
            self._known.clear()
