"""Alerting: notification groups, where their messages landed, silences, per-rule state.

Revision ID: 0002_alerting
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_alerting"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification_groups",
        sa.Column("group_key", sa.String(512), primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "group_messages",
        sa.Column("episode", sa.String(600), primary_key=True),
        sa.Column("notifier", sa.String(32), primary_key=True),
        sa.Column("channel", sa.String(100), nullable=False),
        sa.Column("message_ts", sa.String(40), nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "silences",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("matchers", sa.Text, nullable=False),
        sa.Column("starts_at", sa.BigInteger, nullable=False),
        sa.Column("ends_at", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_silences_ends_at", "silences", ["ends_at"])
    op.create_table(
        "rule_state",
        sa.Column("rule", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(600), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("rule_state", "silences", "group_messages", "notification_groups"):
        op.drop_table(table)
