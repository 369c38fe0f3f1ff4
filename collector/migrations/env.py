"""Alembic environment: runs on the connection the collector hands over (no alembic.ini needed)."""

from alembic import context

from gpufleet.collector.rules.state import metadata as alert_metadata
from gpufleet.collector.store.schema import metadata

connection = context.config.attributes["connection"]
# on_version_apply: `gpufleet db upgrade` shows each step on a terminal (gpufleet.collector.store.migrate.upgrade)
context.configure(
    connection=connection,
    target_metadata=[metadata, alert_metadata],
    render_as_batch=True,
    on_version_apply=context.config.attributes.get("on_version_apply", ()),
)
with context.begin_transaction():
    context.run_migrations()
