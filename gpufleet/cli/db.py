"""`gpufleet db upgrade`: create or migrate the collector's schema."""

from __future__ import annotations

import click

from gpufleet.cli.collector import db_option
from gpufleet.cli.common import Group
from gpufleet.cli.progress import StatusLine


@click.group(cls=Group)
def db() -> None:
    """Manage the collector's database schema."""


@db.command("upgrade")
@db_option(name="url")
def db_upgrade(url: str) -> None:
    """Create the schema, or migrate it to this version of gpufleet (on a terminal, each step shows)."""
    from gpufleet.collector.store import Store, StoreUnavailable
    from gpufleet.collector.store.migrate import SchemaTooNew, current_revision

    store = Store.open(url, migrate_schema=False)  # connects only to upgrade, below
    try:
        with StatusLine("db upgrade: ") as status:
            status(f"connecting to {store.engine.url.render_as_string()}")
            store.upgrade_schema(progress=status)
        click.echo(f"schema at revision {current_revision(store.engine)}")
    except (StoreUnavailable, SchemaTooNew) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
