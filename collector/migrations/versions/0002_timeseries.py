"""Time-series layout: compressed sample chunks (PostgreSQL, time-partitioned), 1-minute and 1-hour rollups,
store state, and the rollup views `metric_samples_1m` / `metric_samples_1h`.

Revision ID: 0002_timeseries
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_timeseries"
down_revision = "0001"
branch_labels = None
depends_on = None

IDENTITY_PG = """sr.metric, sr.labels::jsonb ->> 'cluster' AS cluster, sr.node, sr.labels::jsonb ->> 'gpu' AS gpu,
       sr.uuid, sr.labels::jsonb ->> 'model' AS model, sr.labels::jsonb ->> 'pod' AS pod,
       sr.labels::jsonb ->> 'namespace' AS namespace, sr.labels::jsonb AS labels"""
IDENTITY_SQLITE = """sr.metric, json_extract(sr.labels, '$.cluster') AS cluster, sr.node,
       json_extract(sr.labels, '$.gpu') AS gpu, sr.uuid, json_extract(sr.labels, '$.model') AS model,
       json_extract(sr.labels, '$.pod') AS pod, json_extract(sr.labels, '$.namespace') AS namespace, sr.labels"""


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "store_state",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    if not pg:
        for name in ("rollup_1m", "rollup_1h"):
            op.create_table(
                name,
                sa.Column("series_id", sa.Integer, primary_key=True),
                sa.Column("bucket_ms", sa.BigInteger, primary_key=True),
                sa.Column("vmin", sa.Float(53), nullable=False),
                sa.Column("vmax", sa.Float(53), nullable=False),
                sa.Column("vsum", sa.Float(53), nullable=False),
                sa.Column("n", sa.Integer, nullable=False),
            )
        op.create_index("ix_samples_ts", "samples", ["ts"])  # retention and rollups scan by time
        op.execute("DROP VIEW IF EXISTS metric_samples")
        op.execute(f"""CREATE VIEW metric_samples AS
            SELECT sm.ts / 1000.0 AS time, {IDENTITY_SQLITE}, sm.value
            FROM samples sm JOIN series sr ON sr.id = sm.series_id""")
        for name in ("1m", "1h"):
            op.execute(f"""CREATE VIEW metric_samples_{name} AS
                SELECT r.bucket_ms / 1000.0 AS time, {IDENTITY_SQLITE},
                       r.vmin AS min, r.vsum / r.n AS avg, r.vmax AS max, r.n AS count
                FROM rollup_{name} r JOIN series sr ON sr.id = r.series_id""")
        return

    # One row per series per stretch of time: timestamps as int4 deltas (the first is 0, so sample i is at
    # start_ms + sum(dts[1..i])) and values as float8. Regular scrapes make dts a run of equal numbers that
    # TOAST compression all but erases; long-lived chunks (one per series per hour after compaction) put
    # the per-row overhead at a few bytes per hour. Partitioned by day on start_ms: retention drops tables.
    op.execute("""
        CREATE TABLE sample_chunks (
            series_id integer NOT NULL,
            start_ms bigint NOT NULL,
            end_ms bigint NOT NULL,
            dts integer[] NOT NULL,
            vals double precision[] NOT NULL,
            PRIMARY KEY (series_id, start_ms)
        ) PARTITION BY RANGE (start_ms)""")
    # Where writes land: the same row shape, partitioned by hour. Compaction merges a closed hour into
    # one row per series in sample_chunks and drops the hour's partition: no DELETE, no bloat.
    op.execute("""
        CREATE TABLE sample_head (
            series_id integer NOT NULL,
            start_ms bigint NOT NULL,
            end_ms bigint NOT NULL,
            dts integer[] NOT NULL,
            vals double precision[] NOT NULL,
            PRIMARY KEY (series_id, start_ms)
        ) PARTITION BY RANGE (start_ms)""")
    op.execute("""
        CREATE FUNCTION gpufleet_points(start_ms bigint, dts integer[], vals double precision[])
        RETURNS TABLE (ts bigint, value double precision)
        LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT start_ms + sum(d) OVER (ORDER BY i), v
            FROM unnest(dts, vals) WITH ORDINALITY AS u(d, v, i)
        $$""")
    for name in ("rollup_1m", "rollup_1h"):
        op.execute(f"""
            CREATE TABLE {name} (
                series_id integer NOT NULL,
                bucket_ms bigint NOT NULL,
                vmin double precision NOT NULL,
                vmax double precision NOT NULL,
                vsum double precision NOT NULL,
                n integer NOT NULL,
                PRIMARY KEY (series_id, bucket_ms) INCLUDE (vsum, n)
            ) PARTITION BY RANGE (bucket_ms)""")
        # Grafana filters the views on `time`: this index makes that filter an index condition.
        op.execute(f"CREATE INDEX ix_{name}_time ON {name} (to_timestamp((bucket_ms / 1000)::float8))")
    op.execute("DROP VIEW IF EXISTS metric_samples")
    # The naive one-row-per-sample table stays readable (a store opened with raw_layout="rows" writes it).
    op.execute(f"""CREATE VIEW metric_samples AS
        SELECT to_timestamp(p.ts::float8 / 1000) AS time, {IDENTITY_PG}, p.value
        FROM (SELECT * FROM sample_chunks UNION ALL SELECT * FROM sample_head) c
        CROSS JOIN LATERAL gpufleet_points(c.start_ms, c.dts, c.vals) p
        JOIN series sr ON sr.id = c.series_id
        UNION ALL
        SELECT to_timestamp(sm.ts::float8 / 1000) AS time, {IDENTITY_PG}, sm.value
        FROM samples sm JOIN series sr ON sr.id = sm.series_id""")
    for name in ("1m", "1h"):
        op.execute(f"""CREATE VIEW metric_samples_{name} AS
            SELECT to_timestamp((r.bucket_ms / 1000)::float8) AS time, {IDENTITY_PG},
                   r.vmin AS min, r.vsum / r.n AS avg, r.vmax AS max, r.n AS count
            FROM rollup_{name} r JOIN series sr ON sr.id = r.series_id""")


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    for view in ("metric_samples_1h", "metric_samples_1m", "metric_samples"):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    for table in ("rollup_1h", "rollup_1m", "store_state"):
        op.drop_table(table)
    if not pg:
        op.drop_index("ix_samples_ts", "samples")
    if pg:
        op.execute("DROP TABLE sample_chunks")
        op.execute("DROP TABLE sample_head")
        op.execute("DROP FUNCTION gpufleet_points(bigint, integer[], double precision[])")
    from importlib import import_module

    import_module("gpufleet.collector.migrations.versions.0001_initial").create_metric_samples_view()
