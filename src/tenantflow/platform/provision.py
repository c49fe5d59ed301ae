"""Creating, migrating and dropping tenant databases: a SQLite file per tenant (embedded) or a
PostgreSQL database per tenant, created from a template that already holds the schema."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from tenantflow.backends import reason
from tenantflow.errors import ConfigError, InvalidInputError, Issue, NotFoundError
from tenantflow.store.migrate import migrate_sqlite, migrate_url, sqlite_revision
from tenantflow.store.schema import HEAD_REVISION

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes
SERVER_CHECK_SECONDS = 5  # the test connection to a database server being registered


class Provisioner(Protocol):
    def create_database(self, tenant_id: str) -> str:
        """Create the tenant's database at the head revision; returns its URL."""
        ...

    def drop_database(self, tenant_id: str) -> None: ...

    def revision(self, url: str) -> str | None: ...

    def migrate(self, url: str) -> None: ...


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def sqlalchemy_url(url: str) -> str:
    """The URL SQLAlchemy needs: PostgreSQL through psycopg 3."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_server(url: str, *, sqlite: bool) -> None:
    """Refuse a database server that new tenants could not be placed on, before it is
    registered: a URL of the wrong backend (``sqlite`` is the platform database's), not a URL
    of its kind, a folder that cannot be written, a server that does not answer a test
    connection, or whose user may not create databases. ``InvalidInputError`` at ``url``,
    saying what is wrong without repeating the URL (it may hold a password)."""

    def refuse(what: str) -> InvalidInputError:
        return InvalidInputError(f"url: {what}", issues=[Issue("url", what)])

    if sqlite:
        if not url.startswith("sqlite:///") or not url.removeprefix("sqlite:///"):
            raise refuse("the platform database is SQLite: a server is sqlite:///path/to/folder")
        _check_folder(Path(url.removeprefix("sqlite:///")), refuse)
        return
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise refuse("the platform database is PostgreSQL: a server is postgresql://user@host:port")
    try:
        _ = parts.port  # parsing it is the check
    except ValueError:
        raise refuse("its port is not a number from 0 to 65535") from None
    if not parts.hostname and "host=" not in parts.query:
        raise refuse("it names no host")
    import psycopg

    admin = with_database(url, "postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=SERVER_CHECK_SECONDS) as conn:
            row = conn.execute(
                "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error as exc:
        raise refuse(f"the server did not answer a test connection: {reason(exc)}") from None
    if not row or not row[0]:
        raise refuse("its user may not create databases (CREATEDB)")


def _check_folder(folder: Path, refuse: Callable[[str], InvalidInputError]) -> None:
    import tempfile

    try:
        (folder / "tenants").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder / "tenants"):
            pass
    except OSError as exc:
        raise refuse(f"its folder cannot be written ({type(exc).__name__})") from None


class SqliteProvisioner:
    def __init__(self, home: Path) -> None:
        self.home = home

    def path(self, tenant_id: str) -> Path:
        return self.home / "tenants" / f"{tenant_id}.db"

    def create_database(self, tenant_id: str) -> str:
        migrate_sqlite(self.path(tenant_id))
        return f"sqlite:///{self.path(tenant_id)}"

    def drop_database(self, tenant_id: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path(tenant_id)}{suffix}").unlink(missing_ok=True)

    def revision(self, url: str) -> str | None:
        return sqlite_revision(Path(url.removeprefix("sqlite:///")))

    def migrate(self, url: str) -> None:
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            raise NotFoundError(f"the tenant database {path.name} is missing")
        migrate_sqlite(path)


class PostgresProvisioner:
    """Tenant databases on the server of ``server_url``, named ``{prefix}tenant_{id}``.

    ``CREATE DATABASE … TEMPLATE`` copies a template database that was migrated once, which
    takes milliseconds where running the migrations would take a second.
    """

    def __init__(self, server_url: str, prefix: str, template: str | None = None) -> None:
        self.server_url = server_url
        self.prefix = prefix
        self.template = template or f"{prefix}template"
        self._template_ready = False
        self._lock = threading.Lock()

    def database(self, tenant_id: str) -> str:
        """The tenant's database name: one per tenant id, never two alike. PostgreSQL cuts
        names at 63 bytes, so a name that would be longer is made of a hash of the id."""
        name = f"{self.prefix}tenant_{tenant_id.replace('-', '_')}"
        if len(name.encode()) <= MAX_IDENTIFIER:
            return name
        return f"{self.prefix}t{hashlib.sha256(tenant_id.encode()).hexdigest()[:32]}"

    def ensure_template(self) -> None:
        """Create the template database, or bring it to the head revision (once a process)."""
        import psycopg
        from psycopg import sql

        with self._lock:
            if self._template_ready:
                return
            template_url = with_database(self.server_url, self.template)
            with psycopg.connect(
                with_database(self.server_url, "postgres"), autocommit=True
            ) as admin:
                # Serialize template work across processes (a session-level advisory lock).
                admin.execute("SELECT pg_advisory_lock(hashtext(%s))", (self.template,))
                try:
                    exists = admin.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (self.template,)
                    ).fetchone()
                    if not exists:
                        admin.execute(
                            sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template))
                        )
                    if self.revision(template_url) != HEAD_REVISION:
                        migrate_url(sqlalchemy_url(template_url))
                finally:
                    admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.template,))
            self._template_ready = True

    def create_database(self, tenant_id: str) -> str:
        import psycopg
        from psycopg import errors, sql

        self.ensure_template()
        name = self.database(tenant_id)
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(self.template)
        )
        for attempt in range(50):
            try:
                with psycopg.connect(
                    with_database(self.server_url, "postgres"), autocommit=True
                ) as admin:
                    admin.execute(statement)
                break
            except errors.ObjectInUse:
                # Another CREATE DATABASE is copying the template right now.
                time.sleep(0.05 * (attempt + 1))
            except errors.DuplicateDatabase:
                # Left over by an earlier attempt for this same id that died before
                # registering (names are unique per id; the registry also refuses a database
                # URL that another tenant has).
                break
        else:
            raise ConfigError(f"the template database {self.template} stayed busy")
        url = with_database(self.server_url, name)
        self.migrate(url)  # a no-op unless an older template was copied
        return url

    def drop_database(self, tenant_id: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(with_database(self.server_url, "postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database(tenant_id))
                )
            )

    def revision(self, url: str) -> str | None:
        import psycopg

        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        return str(row[0]) if row else None

    def migrate(self, url: str) -> None:
        if self.revision(url) != HEAD_REVISION:
            migrate_url(sqlalchemy_url(url))

    def drop_all(self) -> None:
        """Drop every database of this prefix (tests, teardown)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(with_database(self.server_url, "postgres"), autocommit=True) as admin:
            names = [
                r[0]
                for r in admin.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s",
                    (self.prefix.replace("_", r"\_") + "%",),
                ).fetchall()
            ]
            for name in names:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self._template_ready = False
