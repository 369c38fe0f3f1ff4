"""The collector's time-series store on SQLAlchemy 2: SQLite (default) or PostgreSQL (production)."""

from gpufleet.collector.store.engine import BatchRefused, Retention, StoreUnavailable
from gpufleet.collector.store.reads import GpuRecord, GpuValue, Point
from gpufleet.collector.store.store import Store
from gpufleet.core.labels import fingerprint

__all__ = [
    "BatchRefused",
    "GpuRecord",
    "GpuValue",
    "Point",
    "Retention",
    "Store",
    "StoreUnavailable",
    "fingerprint",
]
