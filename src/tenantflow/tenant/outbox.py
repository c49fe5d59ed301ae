"""The outbox publisher: a committed run's outbox records sent to the queue in the
background, then forgotten (deleted from the tenant's database) in batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from contextvars import Context

import structlog

from tenantflow.backends import log_failure
from tenantflow.queue.base import Envelope, Queue
from tenantflow.store.records import OutboxEntry
from tenantflow.tenant.router import TenantRouter

log = structlog.get_logger(__name__)

OUTBOX_FLUSH_SECONDS = 0.05


class OutboxPublisher:
    def __init__(self, queue: Queue, router: TenantRouter) -> None:
        self.queue = queue
        self.router = router
        self._published: dict[str, list[int]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._pending: dict[str, list[OutboxEntry]] = {}
        self._pending_done: asyncio.Future[None] | None = None
        self._publisher: asyncio.Task[None] | None = None

    def publish_soon(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> asyncio.Future[None]:
        """Publish outbox records to the queue in the background, then forget them; the
        returned future is done when they were sent (or left to the relay).

        The change they announce is committed already, so nothing waits for this: records
        given while a batch is on its way go together in the next one (one round trip for
        all). Forgetting is batched too (every ``OUTBOX_FLUSH_SECONDS``, one delete per
        tenant). A crash before either leaves the records to the relay, which publishes them
        again: a duplicate message is harmless, claims decide.
        """
        loop = asyncio.get_running_loop()
        if not entries:
            done = loop.create_future()
            done.set_result(None)
            return done
        self._pending.setdefault(tenant_id, []).extend(entries)
        if self._pending_done is None:
            self._pending_done = loop.create_future()
        done = self._pending_done
        if self._publisher is None or self._publisher.done():
            # A fresh context: the batch serves many tenants and runs, not the caller's.
            self._publisher = loop.create_task(self._publish_pending(), context=Context())
        return done

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None:
        """``publish_soon``, waiting until the records were sent."""
        await asyncio.shield(self.publish_soon(tenant_id, entries))

    async def published(self) -> None:
        """Wait until every record given to ``publish_soon`` so far was sent."""
        if self._pending_done is not None:
            await asyncio.shield(self._pending_done)
        if self._publisher is not None and not self._publisher.done():
            await asyncio.shield(self._publisher)

    async def _publish_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            done, self._pending_done = self._pending_done, None
            try:
                await self._send(batch)
            finally:
                if done is not None and not done.done():
                    done.set_result(None)

    async def _send(self, batch: dict[str, list[OutboxEntry]]) -> None:
        try:
            await self.queue.enqueue_many(
                {
                    t: [Envelope(e.run_id, e.priority, e.trace) for e in entries]
                    for t, entries in batch.items()
                }
            )
        except Exception as exc:
            # The changes are committed; their messages wait in the outbox for the relay. The
            # callers' requests succeeded: the queue being away must not undo them.
            log.warning(
                "queue unavailable; the relay will publish",
                pending=sum(len(entries) for entries in batch.values()),
                error=type(exc).__name__,
            )
            return
        for tenant_id, entries in batch.items():
            self._published.setdefault(tenant_id, []).extend(e.id for e in entries)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), context=Context()
            )

    async def _flush_later(self) -> None:
        await asyncio.sleep(OUTBOX_FLUSH_SECONDS)
        await self.flush_outbox()

    async def flush_outbox(self) -> None:
        published, self._published = self._published, {}
        for tenant_id, ids in published.items():
            try:
                await self.router.store(tenant_id).delete_outbox(ids)
            except Exception as exc:
                log_failure(
                    log, "outbox cleanup failed; the relay will republish", exc, tenant=tenant_id
                )

    def forget(self, tenant_id: str) -> None:
        """The tenant's database is about to go (offboarding): its published records are
        not deleted any more."""
        self._published.pop(tenant_id, None)

    async def close(self) -> None:
        await self.published()
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_outbox()
