"""Schema migrations through Alembic, run on start (``gpufleet collector``) or by ``gpufleet db upgrade``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
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


def upgrade(engine: Engine) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Bring the schema to this code's heads. Refuses a database migrated by newer code."""
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
                f"(its newest: {', '.join(head_revisions())}); upgrade gpufleet, or point --db at another database")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
    return current, head_revisions()
