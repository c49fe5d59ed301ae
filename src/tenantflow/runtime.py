"""The shared resources of a process: settings, tenant registry and router, queue, coordination.

Backends are chosen from URL schemes and imported lazily, so an unused driver is never needed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog

from tenantflow._extras import require
from tenantflow.backends import log_failure
from tenantflow.coordination import ACCESS_CHANGES
from tenantflow.errors import ConfigError
from tenantflow.platform.registry import TenantRegistry
from tenantflow.queue.base import Queue
from tenantflow.resilience.breaker import open_breakers
from tenantflow.resilience.bulkhead import Bulkheads
from tenantflow.settings import Settings, sqlite_path
from tenantflow.telemetry.metrics import Metrics
from tenantflow.telemetry.tracing import Tracing
from tenantflow.tenant.marks import WorkMarks
from tenantflow.tenant.outbox import OutboxPublisher
from tenantflow.tenant.router import TenantRouter

if TYPE_CHECKING:
    from tenantflow.platform.access import AccessGuard, Change
    from tenantflow.platform.licensing import LicenseClaims
    from tenantflow.platform.service import Platform
    from tenantflow.telemetry.health import HealthMonitor
    from tenantflow.tenant.artifacts import PlatformArtifacts

log = structlog.get_logger(__name__)


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
        from tenantflow.tenant.artifacts import keys_are_cached

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
        self.outbox = OutboxPublisher(self.queue, self.router)
        self.marks = WorkMarks(self.registry)
        self._platform: Platform | None = None
        self._artifacts: PlatformArtifacts | None = None
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
            from tenantflow.tenant.artifacts import PlatformArtifacts

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

    async def forget(self, tenant_id: str) -> None:
        """The tenant's database is about to go (offboarding): drop what this process still
        meant to do in it (forgetting published outbox records) and close its store."""
        self.outbox.forget(tenant_id)
        await self.router.forget(tenant_id)

    async def close(self) -> None:
        """Send what is pending (outbox records, marks of work), then close the stores, the
        queue, the coordination backend and the platform database."""
        if self._health is not None:
            await self._health.close()
        if self._access is not None:
            await self._access.close()
        await self.marks.close()
        await self.outbox.close()
        await self.router.close()
        await self.queue.close()
        await self.coordination.close()
        self.registry.close()
        if self.tracing.enabled:  # spans still buffered are exported now
            await asyncio.to_thread(self.tracing.close)
