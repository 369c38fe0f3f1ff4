"""Tables of the collector's store (SQLAlchemy Core). Changes go through an Alembic migration."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

# One row per distinct label set. `fingerprint` is a 64-bit hash of the sorted labels.
series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fingerprint", BigInteger, nullable=False, unique=True),
    Column("metric", String(200), nullable=False),
    Column("labels", Text, nullable=False),  # JSON object, __name__ excluded
    Column("node", String(253)),
    Column("uuid", String(64)),
    Column("created_ms", BigInteger, nullable=False),
    Index("ix_series_metric", "metric"),
    Index("ix_series_uuid", "uuid"),
)

# Raw samples. The primary key makes a retried batch a no-op instead of a duplicate.
samples = Table(
    "samples",
    metadata,
    Column("series_id", Integer, primary_key=True),
    Column("ts", BigInteger, primary_key=True),  # Unix milliseconds
    Column("value", Float(53), nullable=False),
)

# PostgreSQL only (partitioned by day on start_ms, see migration 0002): each row holds a stretch of one
# series, timestamps as int4 deltas and values as float8, TOAST-compressed once compacted to one row per hour.
sample_chunks = Table(
    "sample_chunks",
    metadata,
    Column("series_id", Integer, primary_key=True),
    Column("start_ms", BigInteger, primary_key=True),
    Column("end_ms", BigInteger, nullable=False),
)


def _rollup(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("series_id", Integer, primary_key=True),
        Column("bucket_ms", BigInteger, primary_key=True),  # start of the minute / hour
        Column("vmin", Float(53), nullable=False),
        Column("vmax", Float(53), nullable=False),
        Column("vsum", Float(53), nullable=False),
        Column("n", Integer, nullable=False),
    )


rollup_1m = _rollup("rollup_1m")
rollup_1h = _rollup("rollup_1h")

# Watermarks of the maintenance jobs (rollups computed / hours compacted up to) and the oldest late sample
# that arrived behind them, so the next run redoes that stretch.
store_state = Table(
    "store_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# The newest sample of every series: what /api/v1/gpus and the rule engine read.
latest = Table(
    "latest",
    metadata,
    Column("series_id", Integer, primary_key=True),
    Column("ts", BigInteger, nullable=False),
    Column("value", Float(53), nullable=False),
)
