"""Store: write remote-write series, read ranges, latest values, GPUs.

The same interface runs on SQLite (WAL; one row per sample) and PostgreSQL (compressed chunks in
day partitions, written with COPY; see ``chunks.py`` and docs/storage.md). A batch is stored in one
transaction: whole or not at all, and a retried batch stores nothing twice. ``maintain()`` (an
APScheduler job in the collector) compacts closed hours, keeps the 1-minute and 1-hour rollups current
and enforces retention: by dropping whole partitions on PostgreSQL, by DELETE on SQLite.

``Store`` is the one object the rest of the collector holds; the work is done by its parts on one
database: ``Ingest`` (ingest.py), ``Reads`` (reads.py) and ``Maintenance`` (maintenance.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from gpufleet.collector.store import migrate
from gpufleet.collector.store.engine import (
    BatchRefused,
    Database,
    Retention,
    StoreUnavailable,
    one_line,
    open_engine,
)
from gpufleet.collector.store.ingest import Ingest
from gpufleet.collector.store.maintenance import Maintenance, MaintenanceReport
from gpufleet.collector.store.partitions import Partitions
from gpufleet.collector.store.ranges import QueryCancel, QueryLimits, resolution
from gpufleet.collector.store.reads import GpuRecord, Point, RangeSeries, Reads
from gpufleet.collector.store.series_limit import SeriesLimits
from gpufleet.core.remote_write import Series, SeriesBatch

__all__ = ["BatchRefused", "Retention", "Store", "StoreUnavailable"]


class Store:
    def __init__(
        self,
        engine: Engine,
        *,
        raw_layout: str = "chunks",
        retention: Retention | None = None,
        series_limits: SeriesLimits | None = None,
    ) -> None:
        self.db = Database.on(engine, raw_layout)
        partitions = Partitions(engine)
        self.ingest = Ingest(self.db, partitions, series_limits)
        self.reads = Reads(self.db)
        self.maintenance = Maintenance(self.db, partitions, retention or Retention())

    @classmethod
    def open(
        cls,
        url: str,
        *,
        migrate_schema: bool = True,
        raw_layout: str = "chunks",
        retention: Retention | None = None,
        create: bool = True,
        series_limits: SeriesLimits | None = None,
        **engine_kw: object,
    ) -> Store:
        """The store at ``url`` (ValueError for a URL gpufleet cannot use). ``create=False``: a SQLite file
        that does not exist is StoreUnavailable instead of a new, empty store (read-only commands).
        ``series_limits``: the active series it takes (see series_limit.py); None: no limit."""
        store = cls(
            open_engine(url, create=create, **engine_kw),
            raw_layout=raw_layout,
            retention=retention,
            series_limits=series_limits,
        )
        if migrate_schema:
            store.upgrade_schema()
        return store

    @property
    def engine(self) -> Engine:
        return self.db.engine

    @property
    def dialect(self) -> str:
        return self.db.dialect

    @property
    def retention(self) -> Retention:
        return self.maintenance.retention

    @property
    def dropped(self) -> Mapping[str, int]:
        """Samples that could not be stored, by reason."""
        return self.ingest.dropped

    def upgrade_schema(
        self, progress: Callable[[str], None] | None = None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Migrate the schema to this code's (see ``migrate.upgrade``): the revisions before and after."""
        try:
            return migrate.upgrade(self.engine, progress)
        except OperationalError as exc:
            raise StoreUnavailable(
                f"cannot reach the database at {self.engine.url.render_as_string()}: {one_line(exc.orig)}"
            ) from None
        except DBAPIError as exc:  # reached, but refused: no rights on the schema, not a gpufleet database
            raise StoreUnavailable(
                f"the database at {self.engine.url.render_as_string()} refused the schema "
                f"upgrade: {one_line(exc.orig)}",
                connection=False,
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raises if the database cannot answer (cheap: for health checks)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # ---- ingest (see Ingest) ---------------------------------------------------------------------
    def write(self, series: Sequence[Series], *, now_ms: int | None = None) -> int:
        return self.ingest.write(series, now_ms=now_ms)

    def write_batch(self, batch: SeriesBatch, *, now_ms: int | None = None) -> int:
        """``write`` for a request as the receiver decodes it (``remote_write.decode_batch``)."""
        return self.ingest.write_batch(batch, now_ms=now_ms)

    def write_many(
        self, batches: Sequence[Sequence[Series]], *, now_ms: int | None = None
    ) -> list[int | StoreUnavailable | BatchRefused]:
        return self.ingest.write_many(batches, now_ms=now_ms)

    # ---- reads (see Reads) -----------------------------------------------------------------------
    @staticmethod
    def resolution(start: float, end: float, step: float) -> str:
        return resolution(start, end, step)

    def query_range(
        self,
        metric: str,
        matchers: Mapping[str, str],
        start: float,
        end: float,
        step: float,
        limits: QueryLimits | None = None,
        cancel: QueryCancel | None = None,
    ) -> list[RangeSeries]:
        return self.reads.query_range(metric, matchers, start, end, step, limits, cancel)

    def query_range_json(
        self,
        metric: str,
        matchers: Mapping[str, str],
        start: float,
        end: float,
        step: float,
        limits: QueryLimits | None = None,
        cancel: QueryCancel | None = None,
    ) -> list[bytes]:
        """``query_range``'s series, each encoded as JSON (what /api/v1/query_range answers)."""
        return self.reads.query_range_json(metric, matchers, start, end, step, limits, cancel)

    def latest(
        self,
        metric: str | None = None,
        matchers: Mapping[str, str] | None = None,
        since_ms: int | None = None,
    ) -> list[Point]:
        return self.reads.latest(metric, matchers, since_ms)

    def gpus(self, now_ms: int | None = None, stale_after_ms: int = 60_000) -> list[GpuRecord]:
        return self.reads.gpus(now_ms, stale_after_ms)

    def counts(self) -> dict[str, int]:
        return self.reads.counts()

    # ---- maintenance (see Maintenance) -----------------------------------------------------------
    def maintain(self, now_ms: int | None = None) -> MaintenanceReport:
        """One maintenance pass: compact closed hours, bring rollups up to date, enforce retention."""
        return self.maintenance.maintain(now_ms if now_ms is not None else int(time.time() * 1000))
