"""The platform database: its engine (SQLite under the home folder by default, PostgreSQL at
``TENANTFLOW_DATABASE_URL``), its creation, and its migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tenantflow._extras import require
from tenantflow.errors import ConfigError
from tenantflow.platform.provision import sqlalchemy_url
from tenantflow.platform.schema import PLATFORM_HEAD
from tenantflow.settings import PLATFORM_CONNECTIONS

PLATFORM_MIGRATIONS = Path(__file__).with_name("migrations")


def platform_engine(url: str, timeout: float, wait: float) -> sa.Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA busy_timeout = 30000")

        return engine
    if not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        raise ConfigError(
            f"unsupported database URL scheme {url.split(':', 1)[0]!r}: "
            "use sqlite:///path or postgresql://user@host:port/database"
        )
    require("postgres", "TENANTFLOW_DATABASE_URL=postgresql://…")
    from tenantflow.store.db import pg_connect_args, pg_session_limits

    engine = sa.create_engine(
        sqlalchemy_url(url),
        # Its share of the process's connection budget (the tenant stores have the rest).
        pool_size=2,
        max_overflow=PLATFORM_CONNECTIONS - 2,
        pool_timeout=wait,
        pool_pre_ping=True,
        # Opening a connection is bounded by the wait for one, as for the tenant databases:
        # these reads hold their caller (the tenant router's on the event loop) meanwhile.
        connect_args=pg_connect_args(min(timeout, wait) if timeout > 0 else wait),
    )
    limits = pg_session_limits(timeout)

    @sa.event.listens_for(engine, "connect")
    def _limits(conn: Any, _record: Any) -> None:
        autocommit, conn.autocommit = conn.autocommit, True
        for statement in limits:
            conn.execute(statement)
        conn.autocommit = autocommit

    return engine


def create_database_if_missing(url: str, connect_args: dict[str, Any]) -> None:
    import psycopg
    from psycopg import errors, sql

    from tenantflow.platform.provision import database_name, with_database

    name = database_name(url)
    with psycopg.connect(with_database(url, "postgres"), autocommit=True, **connect_args) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            try:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except errors.DuplicateDatabase:
                pass  # created meanwhile by another process


def migrate_platform(engine: sa.Engine) -> None:
    """Bring the platform database to its head revision. At head already, this is one read;
    on PostgreSQL, processes starting together take turns (an advisory lock)."""
    from tenantflow.store.migrate import upgrade_connection

    if platform_revision(engine) == PLATFORM_HEAD:
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # A migration (or the wait for another process's) may take longer than the
            # sessions' statement limit.
            conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
            conn.execute(sa.text("SET LOCAL idle_in_transaction_session_timeout = 0"))
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('tenantflow-platform'))"))
        upgrade_connection(conn, PLATFORM_MIGRATIONS)


def platform_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        row = conn.execute(sa.text("SELECT version_num FROM alembic_version")).first()
    return None if row is None else str(row[0])
