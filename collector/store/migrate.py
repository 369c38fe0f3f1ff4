"""Schema migrations through Alembic, run on start (``gpufleet collector``) or by ``gpufleet db upgrade``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


class SchemaTooNew(RuntimeError):
    pass


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def current_revision(engine: Engine) -> str | None:
    revs = current_revisions(engine)
    return ",".join(revs) if revs else None


def head_revisions() -> tuple[str, ...]:
    """Every head of the migration graph (independent schema changes may form separate branches)."""
    return tuple(sorted(ScriptDirectory.from_config(_config()).get_heads()))


def current_revisions(engine: Engine) -> tuple[str, ...]:
    with engine.connect() as conn:
        return tuple(sorted(MigrationContext.configure(conn).get_current_heads()))


def upgrade(
    engine: Engine, progress: Callable[[str], None] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Bring the schema to this code's heads. Refuses a database migrated by newer code. ``progress`` hears
    which migration runs, one call per step (a migration on a large store can take minutes)."""
    cfg = _config()
    script = ScriptDirectory.from_config(cfg)
    current = current_revisions(engine)
    for rev in current:
        try:
            known = script.get_revision(rev) is not None
        except Exception:
            known = False
        if not known:
            raise SchemaTooNew(
                f"the database schema is at revision {rev!r}, newer than this gpufleet knows "
                f"(its newest: {', '.join(head_revisions())}); upgrade gpufleet, or point --db at another database"
            )
    if progress is not None:
        try:
            pending = [r.revision for r in script.iterate_revisions("heads", current or "base")][::-1]
        except Exception:  # an unusual graph: report the steps without a total
            pending = []
        done: list[str] = []

        def applied(*, step: Any, **_: Any) -> None:
            done.append(step.up_revision_id)
            progress(
                f"applied migration {step.up_revision_id}"
                + (f" ({len(done)} of {len(pending)})" if len(done) <= len(pending) else "")
            )

        cfg.attributes["on_version_apply"] = (applied,)
        if pending:
            progress(f"{len(pending)} migration(s) to apply: {', '.join(pending)}")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas started together on a new database would each create the schema and all but one fail
            # on the duplicate tables; the lock makes the others wait and then find the schema at its head.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('gpufleet_migrations'))"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
    return current, head_revisions()
