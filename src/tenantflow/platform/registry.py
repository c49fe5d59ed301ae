"""The tenant registry: the platform plane's record of tenants and where their data lives.

The registry is a table in the platform database (SQLite under the home folder by default,
PostgreSQL at ``TENANTFLOW_DATABASE_URL``). It stands in for the platform plane's tenant
service: it creates tenants (provisioning their databases), looks them up, lists them, and
records which database holds each one (the routing table).
"""

from __future__ import annotations

import builtins
import enum
import multiprocessing
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from tenantflow.backends import log_failure, reason, unavailable
from tenantflow.errors import (
    ConfigError,
    InvalidTenantIdError,
    NotFoundError,
    TenantExistsError,
    TenantNotFoundError,
)
from tenantflow.platform.database import (
    create_database_if_missing,
    migrate_platform,
    platform_engine,
)
from tenantflow.platform.provision import (
    PostgresProvisioner,
    Provisioner,
    SqliteProvisioner,
    check_server,
)
from tenantflow.platform.schema import active_tenants, database_servers
from tenantflow.platform.schema import tenants as tenants_table
from tenantflow.settings import Settings
from tenantflow.store.schema import HEAD_REVISION

log = structlog.get_logger(__name__)

TENANT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class TenantStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@dataclass(frozen=True, kw_only=True)
class DatabaseServer:
    id: str
    url: str = field(repr=False)  # a secret: never logged, never served
    accepting: bool
    tenants: int


@dataclass(frozen=True, kw_only=True)
class Tenant:
    id: str
    # Its identity, which credentials name: an id reused after an offboarding gets a new one.
    uid: str
    name: str
    status: TenantStatus
    created_at: float
    database_url: str = field(repr=False)  # a secret: never logged, never served
    revision: str | None
    plan_id: str | None = None
    server_id: str | None = None
    access_generation: int = 0  # moved on by each suspension: tokens minted before are void


@dataclass(frozen=True, kw_only=True)
class MigrationReport:
    migrated: list[str]
    at_head: list[str]
    failed: dict[str, str]


def check_tenant_id(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not TENANT_ID.fullmatch(tenant_id):
        raise InvalidTenantIdError()
    return tenant_id


def _tenant(row: Any) -> Tenant:
    return Tenant(
        id=row.id,
        uid=row.uid,
        name=row.name,
        status=TenantStatus(row.status),
        created_at=row.created_at,
        database_url=row.database_url,
        revision=row.revision,
        plan_id=row.plan_id,
        server_id=row.server_id,
        access_generation=row.access_generation,
    )


def _migrate_one(url: str) -> None:
    """Runs in a child process (see ``migrate_all``)."""
    if url.startswith("sqlite:///"):
        SqliteProvisioner(Path()).migrate(url)
    else:
        PostgresProvisioner(url, "").migrate(url)


class TenantRegistry:
    """Tenants and the routing table: which database server holds each tenant's database."""

    DEFAULT_SERVER = "default"

    def __init__(self, settings: Settings, *, start_offline: bool = False) -> None:
        """``start_offline``: the platform database not answering is no reason to fail; its
        set-up (creating it, migrating it) is left to ``ensure_set_up``, and meanwhile what the
        tenant plane cached serves (an API process started during a platform outage)."""
        url = settings.resolved_database_url()
        self.settings = settings
        self.engine = platform_engine(
            url, settings.database_timeout_seconds, settings.database_wait_seconds
        )
        self._closed = False

        @sa.event.listens_for(self.engine, "checkin")
        def _close_late_returns(dbapi_conn: Any, record: Any) -> None:
            # A connection in use by a thread while the registry closed (a platform read the
            # caller could not interrupt) comes back to a pool already disposed: close it
            # rather than leave it open until the garbage collector finds it.
            if self._closed and dbapi_conn is not None:
                record.invalidate()

        self._provisioners: dict[str, Provisioner] = {}
        self._set_up_later = False
        self._setting_up = threading.Lock()
        try:
            self._set_up()
        except Exception as exc:
            if not start_offline or unavailable(exc) is None:
                raise
            log_failure(log, "platform database unreachable; serving from the cache", exc)
            self._set_up_later = True

    def ensure_set_up(self) -> None:
        """The set-up a start during a platform outage left undone, now (raises while the
        platform database still does not answer)."""
        with self._setting_up:
            if self._set_up_later:
                self._set_up()
                self._set_up_later = False

    def _set_up(self) -> None:
        url = self.settings.resolved_database_url()
        if not url.startswith("sqlite:///"):
            from tenantflow.store.db import pg_connect_args

            create_database_if_missing(url, pg_connect_args(self.settings.database_timeout_seconds))
        migrate_platform(self.engine)
        # The platform's own server holds tenants too, unless routing says otherwise.
        default = f"sqlite:///{self.settings.home}" if url.startswith("sqlite:///") else url
        with self.engine.begin() as conn:
            if not conn.execute(
                sa.select(database_servers.c.id).where(database_servers.c.id == self.DEFAULT_SERVER)
            ).first():
                conn.execute(
                    database_servers.insert().values(
                        id=self.DEFAULT_SERVER, url=default, accepting=True, created_at=time.time()
                    )
                )

    # -- routing -----------------------------------------------------------------------------

    def add_server(self, server_id: str, url: str) -> DatabaseServer:
        """Register a database server that new tenants may be placed on."""
        check_tenant_id(server_id)  # the same shape of name
        check_server(url, sqlite=self.engine.dialect.name == "sqlite")
        with self.engine.begin() as conn:
            conn.execute(
                database_servers.insert().values(
                    id=server_id, url=url, accepting=True, created_at=time.time()
                )
            )
        return self.server(server_id)

    def set_accepting(self, server_id: str, accepting: bool) -> DatabaseServer:
        with self.engine.begin() as conn:
            conn.execute(
                database_servers.update()
                .where(database_servers.c.id == server_id)
                .values(accepting=accepting)
            )
        return self.server(server_id)

    def servers(self) -> list[DatabaseServer]:
        count = (
            sa.select(sa.func.count())
            .where(tenants_table.c.server_id == database_servers.c.id)
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(database_servers, count.label("tenants")).order_by(database_servers.c.id)
            ).all()
        return [
            DatabaseServer(id=r.id, url=r.url, accepting=r.accepting, tenants=r.tenants)
            for r in rows
        ]

    def server(self, server_id: str) -> DatabaseServer:
        for server in self.servers():
            if server.id == server_id:
                return server
        raise NotFoundError(f"no database server {server_id!r}")

    def place(self) -> DatabaseServer:
        """The routing policy: the accepting server with the fewest tenants."""
        candidates = [s for s in self.servers() if s.accepting]
        if not candidates:
            raise ConfigError("no database server accepts new tenants")
        return min(candidates, key=lambda s: (s.tenants, s.id))

    def provisioner_for(self, server_id: str | None) -> Provisioner:
        server_id = server_id or self.DEFAULT_SERVER
        provisioner = self._provisioners.get(server_id)
        if provisioner is None:
            url = self.server(server_id).url
            if url.startswith("sqlite:///"):
                provisioner = SqliteProvisioner(Path(url.removeprefix("sqlite:///")))
            else:
                provisioner = PostgresProvisioner(
                    url, self.settings.tenant_db_prefix, self.settings.tenant_template
                )
            self._provisioners[server_id] = provisioner
        return provisioner

    @property
    def provisioner(self) -> Provisioner:
        """The default server's provisioner."""
        return self.provisioner_for(self.DEFAULT_SERVER)

    # -- tenants -----------------------------------------------------------------------------

    def create(
        self, tenant_id: str, *, name: str | None = None, plan_id: str | None = None
    ) -> Tenant:
        """Register a tenant and provision its database, at the head revision, on the server
        the routing policy picks."""
        check_tenant_id(tenant_id)
        with self.engine.connect() as conn:
            if conn.execute(
                sa.select(tenants_table.c.id).where(tenants_table.c.id == tenant_id)
            ).first():
                raise TenantExistsError(f"tenant {tenant_id!r} already exists")
        server = self.place()
        url = self.provisioner_for(server.id).create_database(tenant_id)
        tenant = Tenant(
            id=tenant_id,
            uid=uuid.uuid4().hex,
            name=name or tenant_id,
            status=TenantStatus.ACTIVE,
            created_at=time.time(),
            database_url=url,
            revision=HEAD_REVISION,
            plan_id=plan_id,
            server_id=server.id,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    tenants_table.insert().values(
                        id=tenant.id,
                        uid=tenant.uid,
                        name=tenant.name,
                        status=tenant.status.value,
                        created_at=tenant.created_at,
                        database_url=url,
                        revision=HEAD_REVISION,
                        plan_id=plan_id,
                        server_id=server.id,
                    )
                )
        except sa.exc.IntegrityError:
            raise TenantExistsError(f"tenant {tenant_id!r} already exists") from None
        return tenant

    def set_plan(self, tenant_id: str, plan_id: str | None) -> Tenant:
        with self.engine.begin() as conn:
            done = conn.execute(
                tenants_table.update()
                .where(tenants_table.c.id == tenant_id)
                .values(plan_id=plan_id)
            )
            if done.rowcount == 0:
                raise TenantNotFoundError(f"no tenant {tenant_id!r}")
        return self.get(tenant_id)

    def ensure(self, tenant_id: str, *, name: str | None = None) -> Tenant:
        try:
            return self.get(tenant_id)
        except TenantNotFoundError:
            try:
                return self.create(tenant_id, name=name)
            except TenantExistsError:  # created meanwhile by another process
                return self.get(tenant_id)

    def get(self, tenant_id: str) -> Tenant:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(tenants_table).where(tenants_table.c.id == tenant_id)
            ).first()
        if row is None:
            raise TenantNotFoundError(f"no tenant {tenant_id!r}")
        return _tenant(row)

    def list(self) -> list[Tenant]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(tenants_table).order_by(tenants_table.c.id)).all()
        return [_tenant(r) for r in rows]

    def set_status(self, tenant_id: str, status: TenantStatus) -> Tenant:
        with self.engine.begin() as conn:
            done = conn.execute(
                tenants_table.update()
                .where(tenants_table.c.id == tenant_id)
                .values(
                    status=status.value,
                    # A suspension voids every token of the tenant, for good.
                    access_generation=tenants_table.c.access_generation
                    + (1 if status is TenantStatus.SUSPENDED else 0),
                )
            )
            if done.rowcount == 0:
                raise TenantNotFoundError(f"no tenant {tenant_id!r}")
        return self.get(tenant_id)

    def migrate_all(
        self, *, parallel: int = 8, progress: Callable[[str], None] | None = None
    ) -> MigrationReport:
        """Bring every tenant database to the head revision, ``parallel`` at a time.

        A database already at head costs one connection and one read. A failure is reported
        and does not stop the others. Each tenant's revision is recorded in the registry.
        """
        migrated: list[str] = []
        at_head: list[str] = []
        failed: dict[str, str] = {}
        behind: list[Tenant] = []

        def check(tenant: Tenant) -> None:
            try:
                provisioner = self.provisioner_for(tenant.server_id)
                if provisioner.revision(tenant.database_url) == HEAD_REVISION:
                    at_head.append(tenant.id)
                    if tenant.revision != HEAD_REVISION:
                        self._record_revision(tenant.id)
                    if progress is not None:
                        progress(tenant.id)
                else:
                    behind.append(tenant)
            except Exception as exc:
                failed[tenant.id] = f"{type(exc).__name__}: {reason(exc)}"
                if progress is not None:
                    progress(tenant.id)

        for server in self.servers():
            provisioner = self.provisioner_for(server.id)
            if isinstance(provisioner, PostgresProvisioner):
                provisioner.ensure_template()
        # Checking is a connection and a read: threads. Migrating runs Alembic, whose context
        # is global to a process: one process per migration running at once.
        with ThreadPoolExecutor(max_workers=parallel) as threads:
            list(threads.map(check, self.list()))
        if behind:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=min(parallel, len(behind)), mp_context=context
            ) as processes:
                futures = {processes.submit(_migrate_one, t.database_url): t for t in behind}
                for future in as_completed(futures):
                    tenant = futures[future]
                    try:
                        future.result()
                        self._record_revision(tenant.id)
                        migrated.append(tenant.id)
                    except Exception as exc:
                        failed[tenant.id] = f"{type(exc).__name__}: {reason(exc)}"
                    if progress is not None:
                        progress(tenant.id)
        return MigrationReport(
            migrated=sorted(migrated), at_head=sorted(at_head), failed=dict(sorted(failed.items()))
        )

    def _record_revision(self, tenant_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                tenants_table.update()
                .where(tenants_table.c.id == tenant_id)
                .values(revision=HEAD_REVISION)
            )

    def drop(self, tenant_id: str) -> None:
        """Drop the tenant's database and forget it (no archive: see the platform plane)."""
        tenant = self.get(tenant_id)
        self.provisioner_for(tenant.server_id).drop_database(tenant_id)
        with self.engine.begin() as conn:
            conn.execute(active_tenants.delete().where(active_tenants.c.tenant_id == tenant_id))
            conn.execute(tenants_table.delete().where(tenants_table.c.id == tenant_id))

    # -- which tenants have work -------------------------------------------------------------

    def mark_active(self, tenant_id: str, now: float) -> None:
        """Record that the tenant may have unfinished runs from ``now`` on (see
        ``active_tenants`` in the schema)."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        statement = insert(active_tenants).values(tenant_id=tenant_id, marked_at=now)
        # Never moved back (a process whose clock is behind).
        later = sa.case((active_tenants.c.marked_at < now, now), else_=active_tenants.c.marked_at)
        statement = statement.on_conflict_do_update(
            index_elements=[active_tenants.c.tenant_id], set_={"marked_at": later}
        )
        with self.engine.begin() as conn:
            conn.execute(statement)

    def active_tenants(self) -> builtins.list[tuple[str, float]]:
        """The marked tenants and when each was last marked."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(active_tenants.c.tenant_id, active_tenants.c.marked_at).order_by(
                    active_tenants.c.tenant_id
                )
            ).all()
        return [(r.tenant_id, r.marked_at) for r in rows]

    def clear_active(self, tenant_id: str, *, marked_before: float) -> bool:
        """Drop the tenant's mark unless it was renewed at ``marked_before`` or later."""
        with self.engine.begin() as conn:
            done = conn.execute(
                active_tenants.delete().where(
                    active_tenants.c.tenant_id == tenant_id,
                    active_tenants.c.marked_at < marked_before,
                )
            )
        return bool(done.rowcount)

    def close(self) -> None:
        self._closed = True
        self.engine.dispose()
