"""Applying the tenant schema's migrations (Alembic) to a tenant database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from tenantflow.store.schema import HEAD_REVISION

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def script_head() -> str | None:
    """The newest revision as Alembic sees the migrations folder."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def sqlite_revision(path: Path) -> str | None:
    """The revision a SQLite tenant database is at (None: no schema yet)."""
    if not path.exists():
        return None
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def migrate_url(url: str) -> None:
    """Upgrade the database at ``url`` to the head revision."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def migrate_sqlite(path: Path) -> bool:
    """Bring a SQLite tenant database to the head revision; False if it already was there
    (a read of one row, without loading Alembic's scripts)."""
    if sqlite_revision(path) == HEAD_REVISION:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    migrate_url(f"sqlite:///{path}")
    return True
