"""The PostgreSQL partitions this process knows exist, shared by ingest (which creates the hours it
writes) and maintenance (which creates rollup days and drops what retention or compaction retires)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine

from gpufleet.collector.store import chunks
from gpufleet.collector.store.engine import driver_cursor


class Partitions:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def ensure(self, table: str, times_ms: Iterable[int], cur: Any = None) -> None:
        """Create the partitions of ``table`` that rows at ``times_ms`` need. Without ``cur`` they are
        created in their own committed transaction, so a batch that fails later does not take a new
        partition down with it and concurrent batches do not wait on the DDL; with ``cur`` (maintenance's
        transaction, which already holds the tables it reads) in that transaction."""
        times_ms = list(times_ms)
        with self._lock:
            if all(chunks.partition_name(table, t) in self._known for t in times_ms):
                return
            known = set(self._known)
        if cur is not None:
            chunks.ensure_partitions(cur, table, times_ms, known)
        else:
            with self._engine.begin() as conn:
                chunks.ensure_partitions(driver_cursor(conn), table, times_ms, known)
        with self._lock:
            self._known |= known

    def forget(self, name: str) -> None:
        """A partition was dropped (compacted or past retention)."""
        with self._lock:
            self._known.discard(name)

    def forget_all(self) -> None:
        """Another collector may have dropped one we knew: learn them again."""
        with self._lock:
            self._known.clear()
