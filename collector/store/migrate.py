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
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to this code's head. Refuses a database migrated by newer code."""
    cfg = _config()
    script = ScriptDirectory.from_config(cfg)
    current = current_revision(engine)
    if current is not None:
        try:
            script.get_revision(current)
        except Exception:
            raise SchemaTooNew(
                f"the database schema is at revision {current!r}, newer than this gpufleet knows "
                f"(its newest is {script.get_current_head()!r}); upgrade gpufleet, or point --db at another database"
            ) from None
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return current, script.get_current_head()
