"""The collector's time-series store on SQLAlchemy 2: SQLite (default) or PostgreSQL (production)."""

from gpufleet.collector.store.store import Store, StoreUnavailable, fingerprint

__all__ = ["Store", "StoreUnavailable", "fingerprint"]
