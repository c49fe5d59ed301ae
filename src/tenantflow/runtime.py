"""The shared resources of a process: settings, tenant registry and router, queue.

Backends are chosen from URL schemes and imported lazily, so an unused driver is never needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from tenantflow.errors import ConfigError
from tenantflow.platform.registry import TenantRegistry, TenantRouter
from tenantflow.queue.base import Queue
from tenantflow.settings import Settings, sqlite_path
from tenantflow.store.records import OutboxEntry

log = structlog.get_logger(__name__)

OUTBOX_FLUSH_SECONDS = 0.05


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
        self._published: dict[str, list[int]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None:
        """Publish outbox records to the queue, then forget them.

        Forgetting is batched (every ``OUTBOX_FLUSH_SECONDS``, one delete per tenant) to keep
        a round trip off every submit. A crash before it leaves the records to the relay,
        which publishes them again: a duplicate message is harmless, claims decide.
        """
        if not entries:
            return
        published: list[int] = []
        try:
            for entry in entries:
                await self.queue.enqueue(tenant_id, entry.run_id, priority=entry.priority)
                published.append(entry.id)
        except Exception as exc:
            # The change is committed; its message waits in the outbox for the relay. The
            # caller's request succeeded: the queue being away must not undo it.
            log.warning(
                "queue unavailable; the relay will publish",
                tenant=tenant_id,
                pending=len(entries) - len(published),
                error=type(exc).__name__,
            )
        if not published:
            return
        self._published.setdefault(tenant_id, []).extend(published)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(OUTBOX_FLUSH_SECONDS)
        await self.flush_outbox()

    async def flush_outbox(self) -> None:
        published, self._published = self._published, {}
        for tenant_id, ids in published.items():
            try:
                await self.router.store(tenant_id).delete_outbox(ids)
            except Exception:
                log.exception("outbox cleanup failed; the relay will republish", tenant=tenant_id)

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_outbox()
        await self.router.close()
        await self.queue.close()
        self.registry.close()
