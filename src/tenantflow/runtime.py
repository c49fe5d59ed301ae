"""The shared resources of a process: settings, tenant registry and router, queue, coordination.

Backends are chosen from URL schemes and imported lazily, so an unused driver is never needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from contextvars import Context
from typing import TYPE_CHECKING, Any

import structlog

from tenantflow._extras import require
from tenantflow.backends import log_failure
from tenantflow.coordination import ACCESS_CHANGES
from tenantflow.errors import ConfigError
from tenantflow.platform.registry import TenantRegistry, TenantRouter
from tenantflow.queue.base import Envelope, Queue
from tenantflow.resilience.breaker import open_breakers
from tenantflow.resilience.bulkhead import Bulkheads
from tenantflow.settings import Settings, sqlite_path
from tenantflow.store.records import OutboxEntry
from tenantflow.telemetry.metrics import Metrics
from tenantflow.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from tenantflow.platform.access import AccessGuard, Change
    from tenantflow.platform.artifacts import PlatformArtifacts
    from tenantflow.platform.licensing import LicenseClaims
    from tenantflow.platform.service import Platform
    from tenantflow.telemetry.health import HealthMonitor

log = structlog.get_logger(__name__)

OUTBOX_FLUSH_SECONDS = 0.05
# A tenant's mark of work (see ``note_work``) is renewed when older than REMARK; a sweep drops
# it only once older than CLEAR and the tenant has nothing unfinished. Safe as long as a run is
# committed within CLEAR - REMARK of the mark it relied on: ``TenantClient.start`` marks again
# after a commit that took longer than SLOW_SUBMIT.
MARK_REMARK_SECONDS = 20.0
MARK_CLEAR_SECONDS = 60.0
MARK_SLOW_SUBMIT_SECONDS = 20.0
MARK_RETRY_SECONDS = 2.0


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
        require("redis", "TENANTFLOW_QUEUE_URL=redis://…")
        from tenantflow.queue.redis_streams import RedisStreamsQueue

        return RedisStreamsQueue(
            url,
            prefix=settings.queue_prefix,
            max_deliveries=settings.max_deliveries,
            tenant_max_inflight=settings.tenant_max_inflight,
            timeout=settings.redis_timeout_seconds,
        )
    raise ConfigError(
        f"unsupported queue URL scheme {url.split(':', 1)[0]!r}: "
        "use sqlite:///path or redis://host:port/db"
    )


class Runtime:
    """Opened once per process and shared by its clients and workers."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        tracer_provider: Any = None,
        start_offline: bool = False,
    ) -> None:
        """``tracer_provider``: an OpenTelemetry provider for this runtime's spans when
        ``settings.tracing`` is on (default: the installed one, else one made from OTEL_*).
        ``start_offline``: open even while the platform database does not answer, if an
        earlier start cached the platform's artifacts (keys, licenses, tenants' routes) to
        serve from (the API does; without a cache, the platform's error is raised)."""
        from tenantflow.platform.artifacts import keys_are_cached

        self.settings = settings or Settings()
        self.tracing = Tracing(enabled=self.settings.tracing, provider=tracer_provider)
        cached = start_offline and keys_are_cached(self.settings.home / "cache")
        self.registry = TenantRegistry(self.settings, start_offline=cached)
        self.router = TenantRouter(self.registry)
        self.queue = open_queue(self.settings)
        # Locks, limits, notifications and the breakers' and bulkheads' state: the queue's
        # Redis (and connections) with the Redis queue, this process's own on the embedded one.
        self.coordination = self.queue.coordination()
        self.breakers = open_breakers(self.coordination)
        self.bulkheads = Bulkheads(self.coordination)
        self.metrics = Metrics(per_tenant=self.settings.metrics_per_tenant)
        self._published: dict[str, list[int]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._pending: dict[str, list[OutboxEntry]] = {}
        self._pending_done: asyncio.Future[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._platform: Platform | None = None
        self._artifacts: PlatformArtifacts | None = None
        self._marked: dict[str, float] = {}  # tenant -> when this process last marked it
        self._marking: dict[str, asyncio.Future[None]] = {}
        self._unmarked: set[str] = set()  # marks that failed, retried by _mark_again
        self._remarker: asyncio.Task[None] | None = None
        self._health: HealthMonitor | None = None
        self._access: AccessGuard | None = None

    @property
    def health(self) -> HealthMonitor:
        """The stuck-run detector's latest survey, refreshed in the background once asked."""
        if self._health is None:
            from tenantflow.telemetry.health import HealthMonitor

            self._health = HealthMonitor(self)
        return self._health

    # -- the platform plane, as this process sees it -----------------------------------------

    @property
    def platform(self) -> Platform:
        """The platform plane's operations (on the platform database)."""
        if self._platform is None:
            from tenantflow.platform.service import Platform

            self._platform = Platform(self.registry)
            self._platform.announce = self._announce
        return self._platform

    @property
    def access(self) -> AccessGuard:
        """What each verified token may do now, kept current by changes (``platform.access``)."""
        if self._access is None:
            from tenantflow.platform.access import AccessGuard

            async def tenant_uid(tenant_id: str) -> str:
                return (await self.router.tenant_async(tenant_id)).uid

            self._access = AccessGuard(
                self.registry.engine,
                cache_seconds=self.settings.access_cache_seconds,
                tenant_uid=tenant_uid,
                coordination=self.coordination,
                keys_changed=lambda: self.artifacts.invalidate_keys(),
            )
        return self._access

    def _announce(self, change: Change) -> None:
        """A change that takes access away, committed: dropped from this process's cache at
        once, and published to the others (from a platform call's thread: a blocking client).
        A publish that fails is logged; the others then see the change when their cached
        grants run out (``STALE_SECONDS`` while the channel cannot prove itself live)."""
        if change.kind == "tenant":
            self.router.forget_record(change.id)
        self.access.changed(change)
        try:
            self.coordination.publish_blocking(ACCESS_CHANGES, change.encode())
        except Exception as exc:
            log_failure(log, "announcing an access change failed", exc, change=change.kind)

    @property
    def artifacts(self) -> PlatformArtifacts:
        """Keys and licenses as the tenant plane holds them: verified, cached."""
        if self._artifacts is None:
            from tenantflow.platform.artifacts import PlatformArtifacts

            self._artifacts = PlatformArtifacts(
                self.platform,
                self.settings.home / "cache",
                refresh_seconds=self.settings.license_refresh_seconds,
            )
        return self._artifacts

    async def license(self, tenant_id: str) -> LicenseClaims | None:
        """The tenant's license (None: on no plan, not limited); fetched in a thread when
        due, from memory otherwise."""
        artifacts = self.artifacts
        tenant = await self.router.tenant_async(tenant_id)
        if artifacts.needs_refresh(tenant_id, tenant.uid):
            return await asyncio.to_thread(artifacts.license, tenant_id, tenant.uid)
        return artifacts.license(tenant_id, tenant.uid)

    async def note_work(self, tenant_id: str, *, again: bool = False) -> None:
        """Mark the tenant as one with work, in the platform database, before a run of it is
        created: background sweeps visit only marked tenants, so a run whose message the queue
        lost is still found. Written at most every ``MARK_REMARK_SECONDS`` per tenant and
        process (``again``: now). The platform database away: logged, and the run goes on
        (its message is published as usual) while the mark is retried in the background."""
        now = time.time()
        if not again and now - self._marked.get(tenant_id, -math.inf) < MARK_REMARK_SECONDS:
            return
        pending = self._marking.get(tenant_id)
        if pending is None:
            pending = asyncio.ensure_future(
                asyncio.to_thread(self.registry.mark_active, tenant_id, now)
            )
            self._marking[tenant_id] = pending
            pending.add_done_callback(lambda _: self._marking.pop(tenant_id, None))
        try:
            await asyncio.shield(pending)
        except Exception as exc:
            log_failure(log, "marking the tenant's work failed; retrying", exc, tenant=tenant_id)
            self._unmarked.add(tenant_id)
            if self._remarker is None or self._remarker.done():
                self._remarker = asyncio.get_running_loop().create_task(
                    self._mark_again(), context=Context()
                )
            return
        self._marked[tenant_id] = max(now, self._marked.get(tenant_id, now))

    async def _mark_again(self) -> None:
        while self._unmarked:
            await asyncio.sleep(MARK_RETRY_SECONDS)
            await self._retry_marks()

    async def _retry_marks(self) -> Exception | None:
        """Mark the tenants whose mark failed; the error if the platform is still away."""
        for tenant_id in list(self._unmarked):
            try:
                await asyncio.to_thread(self.registry.mark_active, tenant_id, time.time())
            except Exception as exc:
                return exc
            self._unmarked.discard(tenant_id)
        return None

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

    async def forget(self, tenant_id: str) -> None:
        """The tenant's database is about to go (offboarding): drop what this process still
        meant to do in it (forgetting published outbox records) and close its store."""
        self._published.pop(tenant_id, None)
        await self.router.forget(tenant_id)

    async def flush_outbox(self) -> None:
        published, self._published = self._published, {}
        for tenant_id, ids in published.items():
            try:
                await self.router.store(tenant_id).delete_outbox(ids)
            except Exception as exc:
                log_failure(
                    log, "outbox cleanup failed; the relay will republish", exc, tenant=tenant_id
                )

    async def close(self) -> None:
        if self._health is not None:
            await self._health.close()
        if self._access is not None:
            await self._access.close()
        if self._remarker is not None and not self._remarker.done():
            # One last try; marks still failing are logged (a sweep may miss those tenants'
            # runs only if the queue loses their messages as well).
            self._remarker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remarker
            failed = await self._retry_marks()
            if failed is not None:
                log_failure(log, "tenants' work left unmarked", failed, tenants=len(self._unmarked))
        await self.published()
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_outbox()
        await self.router.close()
        await self.queue.close()
        await self.coordination.close()
        self.registry.close()
        if self.tracing.enabled:  # spans still buffered are exported now
            await asyncio.to_thread(self.tracing.close)
