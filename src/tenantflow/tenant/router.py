"""The tenant router: the only way to reach a tenant's store, from the tenant plane.

It resolves a tenant id through the platform's registry (cached in memory for a moment, and
on disk for a process started while the platform database is down) to the tenant's run
store, and keeps the stores open in a bounded LRU whose connections share one budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import structlog

from tenantflow.backends import reason, unavailable
from tenantflow.errors import StoreUnavailableError, TenantNotFoundError
from tenantflow.platform.registry import TENANT_ID, Tenant, TenantRegistry, TenantStatus
from tenantflow.settings import PLATFORM_CONNECTIONS
from tenantflow.store.base import RunStore
from tenantflow.tenant.artifacts import DiskCache

log = structlog.get_logger(__name__)

TENANT_CACHE_SECONDS = 2.0


class TenantRouter:
    """Resolves a tenant id to its run store.

    Stores are kept in an LRU of at most ``max_open_tenant_dbs``. On PostgreSQL their
    connections all come from one budget (``database_connections`` less the platform
    database's share), so the connections of a process do not grow with the tenants it
    touches. An evicted store is closed at once: its idle connections stay with the budget
    (for the tenant's next store, or closed to make room for another tenant's), and an
    operation that still holds it works as before. An evicted SQLite store is closed a little
    later, when operations that hold it have finished (its connection cannot be reopened
    under them).
    """

    SQLITE_CLOSE_DELAY = 30.0

    def __init__(self, registry: TenantRegistry) -> None:
        from tenantflow.store.pgpool import ConnectionBudget

        self.registry = registry
        self.settings = registry.settings
        self.budget = ConnectionBudget(
            self.settings.database_connections - PLATFORM_CONNECTIONS,
            wait=self.settings.database_wait_seconds,
        )
        sqlite = registry.engine.dialect.name == "sqlite"
        self._close_delay = self.SQLITE_CLOSE_DELAY if sqlite else 0.0
        self._stores: OrderedDict[str, RunStore] = OrderedDict()
        self._tenants: dict[str, tuple[float, Tenant]] = {}
        # The records on disk, for a process started while the platform database is down.
        self._disk = DiskCache(self.settings.home / "cache" / "tenants")
        self._on_disk: dict[str, dict[str, Any]] = {}
        self._pins: dict[str, int] = {}
        self._closing: dict[asyncio.Task[None], RunStore] = {}

    def cached(self, tenant_id: str) -> Tenant | None:
        """The record ``tenant`` would answer from its cache now, without asking the registry
        (None: it would ask)."""
        cached = self._tenants.get(tenant_id)
        if cached is not None and time.monotonic() - cached[0] < TENANT_CACHE_SECONDS:
            return cached[1]
        return None

    async def tenant_async(self, tenant_id: str) -> Tenant:
        """``tenant`` for async callers: from the cache, or read in a thread."""
        cached = self.cached(tenant_id)
        return cached if cached is not None else await asyncio.to_thread(self.tenant, tenant_id)

    def tenant(self, tenant_id: str) -> Tenant:
        """The registry's record, cached for a couple of seconds."""
        cached = self._tenants.get(tenant_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < TENANT_CACHE_SECONDS:
            return cached[1]
        try:
            tenant = self.registry.get(tenant_id)
        except TenantNotFoundError:
            self._tenants.pop(tenant_id, None)
            self._keep_on_disk(tenant_id, None)
            raise
        except Exception as exc:
            last = cached[1] if cached is not None else self._from_disk(tenant_id)
            if last is None:
                if unavailable(exc) is not None:
                    raise StoreUnavailableError(
                        f"the platform database did not answer: {reason(exc)}"
                    ) from exc
                raise
            # The platform database is away: keep serving the tenant as last seen (its own
            # database is what runs need), and ask again after the cache interval.
            log.warning("platform unreachable; using the cached tenant", error=type(exc).__name__)
            tenant = last
        else:
            self._keep_on_disk(tenant_id, tenant)
        # Fresh from the end of the read: with the platform database away, a read takes its
        # whole connect bound, and the next call must not pay it again at once.
        self._tenants[tenant_id] = (time.monotonic(), tenant)
        return tenant

    def _keep_on_disk(self, tenant_id: str, tenant: Tenant | None) -> None:
        """Write the tenant's record to disk when it changed (None: remove it)."""
        if not TENANT_ID.fullmatch(tenant_id):
            return
        record = (
            None
            if tenant is None
            else {**dataclasses.asdict(tenant), "status": tenant.status.value}
        )
        if record == self._on_disk.get(tenant_id) and tenant_id in self._on_disk:
            return
        if record is None:
            self._disk.remove(f"{tenant_id}.json")
            self._on_disk.pop(tenant_id, None)
        else:
            self._disk.write(f"{tenant_id}.json", record)
            self._on_disk[tenant_id] = record

    def _from_disk(self, tenant_id: str) -> Tenant | None:
        record = self._disk.read(f"{tenant_id}.json") if TENANT_ID.fullmatch(tenant_id) else None
        if not isinstance(record, dict):
            return None
        try:
            return Tenant(**{**record, "status": TenantStatus(record["status"])})
        except (TypeError, KeyError, ValueError):
            return None  # written by another version: not to be guessed at

    def store(self, tenant_id: str) -> RunStore:
        store = self._stores.get(tenant_id)
        if store is not None:
            self._stores.move_to_end(tenant_id)
            return store
        store = self._open(self.tenant(tenant_id))
        self._stores[tenant_id] = store
        self._evict()
        return store

    def _evict(self) -> None:
        """Close the least recently used stores beyond the cap, never one pinned by a run in
        flight (the cap may be exceeded meanwhile)."""
        excess = len(self._stores) - self.settings.max_open_tenant_dbs
        for tenant_id in list(self._stores):
            if excess <= 0:
                break
            if self._pins.get(tenant_id):
                continue
            self._close_later(self._stores.pop(tenant_id))
            excess -= 1

    def forget_record(self, tenant_id: str) -> None:
        """Read the tenant's record afresh next time (it changed)."""
        self._tenants.pop(tenant_id, None)

    async def forget(self, tenant_id: str) -> None:
        """Close the tenant's store now and drop what is cached of it (its database is about
        to go away)."""
        cached = self._tenants.pop(tenant_id, None)
        self._keep_on_disk(tenant_id, None)
        store = self._stores.pop(tenant_id, None)
        if store is not None:
            await store.close()
        if cached is not None:
            self.budget.discard(cached[1].database_url)

    @contextlib.contextmanager
    def pinned(self, tenant_id: str) -> Iterator[RunStore]:
        """The tenant's store, kept open for as long as the block runs."""
        store = self.store(tenant_id)
        self._pins[tenant_id] = self._pins.get(tenant_id, 0) + 1
        try:
            yield store
        finally:
            self._pins[tenant_id] -= 1
            if not self._pins[tenant_id]:
                del self._pins[tenant_id]

    @contextlib.asynccontextmanager
    async def borrowed(self, tenant_id: str) -> AsyncIterator[RunStore]:
        """The tenant's store for a sweep: the open one if there is, else a store opened for
        the block and closed after it, so that sweeping every tenant does not flush the LRU."""
        if tenant_id in self._stores:
            with self.pinned(tenant_id) as store:
                yield store
            return
        store = self._open(self.tenant(tenant_id))
        try:
            yield store
        finally:
            await store.close()

    def _open(self, tenant: Tenant) -> RunStore:
        from tenantflow.store.sql import SqlRunStore

        url = tenant.database_url
        if url.startswith("sqlite:///"):
            from tenantflow.store.db import SqliteDatabase

            return SqlRunStore(
                tenant.id,
                SqliteDatabase(
                    Path(url.removeprefix("sqlite:///")),
                    synchronous=self.settings.sqlite_synchronous,
                    create=False,  # made by provisioning; gone once offboarded
                ),
            )
        from tenantflow.store.db import PostgresDatabase

        return SqlRunStore(
            tenant.id,
            PostgresDatabase(
                url,
                max_size=self.settings.tenant_pool_size,
                timeout=self.settings.database_timeout_seconds,
                budget=self.budget,
            ),
        )

    def _close_later(self, store: RunStore) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing async was opened

        async def close() -> None:
            if self._close_delay:
                await asyncio.sleep(self._close_delay)
            await store.close()

        task = loop.create_task(close())
        self._closing[task] = store
        task.add_done_callback(lambda t: self._closing.pop(t, None))

    async def close(self) -> None:
        evicted = list(self._closing.items())
        self._closing.clear()
        for task, store in evicted:
            task.cancel()
            await store.close()
        for store in self._stores.values():
            await store.close()
        self._stores.clear()
        await self.budget.close()
