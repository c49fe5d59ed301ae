"""The local tenant registry, and the tenant router: the only way to reach a tenant's store.

The registry is a table in the platform database (SQLite under the home folder by default).
It stands in for the platform plane's tenant service; its interface is what the engine needs:
look a tenant up, create one (which provisions its database), list them.
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tenantflow import _sqlite
from tenantflow.errors import (
    ConfigError,
    InvalidTenantIdError,
    TenantExistsError,
    TenantNotFoundError,
)
from tenantflow.settings import Settings, sqlite_path
from tenantflow.store.base import RunStore
from tenantflow.store.migrate import migrate_sqlite

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


class TenantStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


@dataclass(frozen=True, kw_only=True)
class Tenant:
    id: str
    name: str
    status: TenantStatus
    created_at: float


def check_tenant_id(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not TENANT_ID.match(tenant_id):
        raise InvalidTenantIdError()
    return tenant_id


class TenantRegistry:
    def __init__(self, settings: Settings) -> None:
        url = settings.resolved_database_url()
        if not url.startswith("sqlite:///"):
            raise ConfigError(
                "only the embedded (sqlite:///) platform database is available in this version"
            )
        self.home = settings.home
        self.synchronous = settings.sqlite_synchronous
        self._conn = _sqlite.connect(sqlite_path(url), synchronous=self.synchronous)
        self._conn.executescript(SCHEMA)

    def tenant_db_path(self, tenant_id: str) -> Path:
        return self.home / "tenants" / f"{check_tenant_id(tenant_id)}.db"

    def create(self, tenant_id: str, *, name: str | None = None) -> Tenant:
        """Register a tenant and provision its database (migrated to the head revision)."""
        check_tenant_id(tenant_id)
        migrate_sqlite(self.tenant_db_path(tenant_id))
        now = time.time()
        with _sqlite.transaction(self._conn) as cur:
            if cur.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone():
                raise TenantExistsError(f"tenant {tenant_id!r} already exists")
            cur.execute(
                "INSERT INTO tenants (id, name, status, created_at) VALUES (?, ?, ?, ?)",
                (tenant_id, name or tenant_id, TenantStatus.ACTIVE.value, now),
            )
        return Tenant(
            id=tenant_id, name=name or tenant_id, status=TenantStatus.ACTIVE, created_at=now
        )

    def ensure(self, tenant_id: str, *, name: str | None = None) -> Tenant:
        try:
            return self.get(tenant_id)
        except TenantNotFoundError:
            try:
                return self.create(tenant_id, name=name)
            except TenantExistsError:  # created meanwhile by another process
                return self.get(tenant_id)

    def get(self, tenant_id: str) -> Tenant:
        row = self._conn.execute(
            "SELECT id, name, status, created_at FROM tenants WHERE id = ?", (tenant_id,)
        ).fetchone()
        if row is None:
            raise TenantNotFoundError(f"no tenant {tenant_id!r}")
        return Tenant(id=row[0], name=row[1], status=TenantStatus(row[2]), created_at=row[3])

    def list(self) -> list[Tenant]:
        rows = self._conn.execute(
            "SELECT id, name, status, created_at FROM tenants ORDER BY id"
        ).fetchall()
        return [
            Tenant(id=r[0], name=r[1], status=TenantStatus(r[2]), created_at=r[3]) for r in rows
        ]

    def set_status(self, tenant_id: str, status: TenantStatus) -> Tenant:
        with _sqlite.transaction(self._conn) as cur:
            if (
                cur.execute(
                    "UPDATE tenants SET status = ? WHERE id = ? RETURNING id",
                    (status.value, tenant_id),
                ).fetchone()
                is None
            ):
                raise TenantNotFoundError(f"no tenant {tenant_id!r}")
        return self.get(tenant_id)

    def close(self) -> None:
        self._conn.close()


class TenantRouter:
    """Resolves a tenant id to its run store. Stores are opened once and kept."""

    def __init__(self, registry: TenantRegistry) -> None:
        self.registry = registry
        self._stores: dict[str, RunStore] = {}

    def store(self, tenant_id: str) -> RunStore:
        store = self._stores.get(tenant_id)
        if store is None:
            self.registry.get(tenant_id)  # raises TenantNotFoundError
            from tenantflow.store.sqlite import SqliteRunStore

            store = SqliteRunStore(
                tenant_id,
                self.registry.tenant_db_path(tenant_id),
                synchronous=self.registry.synchronous,
            )
            self._stores[tenant_id] = store
        return store

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()
