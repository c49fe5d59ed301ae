"""The shared resources of a process: settings, tenant registry and router, queue.

Backends are chosen from URL schemes and imported lazily, so an unused driver is never needed.
"""

from __future__ import annotations

from collections.abc import Sequence

from tenantflow.errors import ConfigError
from tenantflow.platform.registry import TenantRegistry, TenantRouter
from tenantflow.queue.base import Queue
from tenantflow.settings import Settings, sqlite_path
from tenantflow.store.records import OutboxEntry


def open_queue(settings: Settings) -> Queue:
    url = settings.resolved_queue_url()
    if url.startswith("sqlite:///"):
        from tenantflow.queue.sqlite import SqliteQueue

        return SqliteQueue(
            sqlite_path(url),
            max_deliveries=settings.max_deliveries,
            synchronous=settings.sqlite_synchronous,
            tenant_max_inflight=settings.tenant_max_inflight,
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        from tenantflow.queue.redis_streams import RedisStreamsQueue

        return RedisStreamsQueue(
            url,
            prefix=settings.queue_prefix,
            max_deliveries=settings.max_deliveries,
            tenant_max_inflight=settings.tenant_max_inflight,
        )
    raise ConfigError(
        f"unsupported queue URL scheme {url.split(':', 1)[0]!r}: "
        "use sqlite:///path or redis://host:port/db"
    )


class Runtime:
    """Opened once per process and shared by its clients and workers."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.registry = TenantRegistry(self.settings)
        self.router = TenantRouter(self.registry)
        self.queue = open_queue(self.settings)

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None:
        """Publish outbox records to the queue, then forget them. A crash in between leaves
        them for the relay, which publishes them again (a duplicate is harmless: claims
        decide)."""
        if not entries:
            return
        for entry in entries:
            await self.queue.enqueue(tenant_id, entry.run_id, priority=entry.priority)
        await self.router.store(tenant_id).delete_outbox([e.id for e in entries])

    async def close(self) -> None:
        await self.router.close()
        await self.queue.close()
        self.registry.close()
