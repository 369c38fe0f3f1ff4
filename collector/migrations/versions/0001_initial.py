"""Initial schema: series, samples, latest, alerts, rule memory, notifications.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.BigInteger, nullable=False, unique=True),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("node", sa.String(253)),
        sa.Column("uuid", sa.String(64)),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_series_metric", "series", ["metric"])
    op.create_index("ix_series_uuid", "series", ["uuid"])
    op.create_table(
        "samples",
        sa.Column("series_id", sa.Integer, primary_key=True),
        sa.Column("ts", sa.BigInteger, primary_key=True),
        sa.Column("value", sa.Float(53), nullable=False),
    )
    op.create_table(
        "latest",
        sa.Column("series_id", sa.Integer, primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Float(53), nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("annotations", sa.Text, nullable=False),
        sa.Column("value", sa.Float(53)),
        sa.Column("active_since", sa.BigInteger),
        sa.Column("last_true", sa.BigInteger),
        sa.Column("fired_at", sa.BigInteger),
        sa.Column("resolved_at", sa.BigInteger),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_alerts_state", "alerts", ["state"])
    op.create_table(
        "rule_memory",
        sa.Column("rule", sa.String(200), primary_key=True),
        sa.Column("series_fingerprint", sa.BigInteger, primary_key=True),
        sa.Column("value", sa.Float(53), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.String(32), nullable=False),
        sa.Column("notifier", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(100)),
        sa.Column("message_ts", sa.String(40)),
        sa.Column("sent_at", sa.BigInteger, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
    )
    op.create_index("ix_notifications_alert", "notifications", ["alert_id"])
    create_metric_samples_view()


# `metric_samples` is the stable read contract for SQL consumers (Grafana's PostgreSQL data source,
# reports): one row per sample with its time, metric, identity labels and value. Storage layout
# changes must keep this view's name and columns.
def create_metric_samples_view() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            CREATE VIEW metric_samples AS
            SELECT to_timestamp(sm.ts / 1000.0) AS time, sr.metric,
                   sr.labels::jsonb ->> 'cluster' AS cluster, sr.node, sr.labels::jsonb ->> 'gpu' AS gpu, sr.uuid,
                   sr.labels::jsonb ->> 'model' AS model, sr.labels::jsonb ->> 'pod' AS pod,
                   sr.labels::jsonb ->> 'namespace' AS namespace, sr.labels::jsonb AS labels, sm.value
            FROM samples sm JOIN series sr ON sr.id = sm.series_id""")
    else:
        op.execute("""
            CREATE VIEW metric_samples AS
            SELECT sm.ts / 1000.0 AS time, sr.metric,
                   json_extract(sr.labels, '$.cluster') AS cluster, sr.node, json_extract(sr.labels, '$.gpu') AS gpu,
                   sr.uuid, json_extract(sr.labels, '$.model') AS model, json_extract(sr.labels, '$.pod') AS pod,
                   json_extract(sr.labels, '$.namespace') AS namespace, sr.labels, sm.value
            FROM samples sm JOIN series sr ON sr.id = sm.series_id""")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS metric_samples")
    for table in ("notifications", "rule_memory", "alerts", "latest", "samples", "series"):
        op.drop_table(table)
