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


def alembic_config(script_location: Path = MIGRATIONS) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


def upgrade_connection(conn: sa.Connection, script_location: Path = MIGRATIONS) -> None:
    """Upgrade the database of an open connection (in its transaction) to the head revision
    of the migrations in ``script_location``."""
    cfg = alembic_config(script_location)
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def script_head(script_location: Path = MIGRATIONS) -> str | None:
    """The newest revision as Alembic sees a migrations folder."""
    return ScriptDirectory.from_config(alembic_config(script_location)).get_current_head()


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
            upgrade_connection(conn)
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
