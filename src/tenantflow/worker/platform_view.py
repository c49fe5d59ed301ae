"""The platform's word on tenants as a worker takes it into every dequeue: which are
suspended, and each licensed tenant's cap on runs in flight and dispatch weight. Refreshed in
the background; through a platform outage the last view stands."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypedDict

import structlog

from tenantflow.errors import LicenseError
from tenantflow.platform.registry import TenantStatus
from tenantflow.runtime import Runtime

log = structlog.get_logger("tenantflow.worker.worker")

PLATFORM_VIEW_SECONDS = 1.0
NO_RUNS = -1  # a cap below any count: the queue gives the tenant nothing


class TenantView(TypedDict):
    """The platform's word on tenants, as every dequeue takes it."""

    skip: frozenset[str]  # suspended: not taken from
    caps: dict[str, int]  # licensed caps on runs in flight
    weights: dict[str, int]  # licensed dispatch weights (absent: 1)


class PlatformView:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.view: TenantView = {"skip": frozenset(), "caps": {}, "weights": {}}

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(PLATFORM_VIEW_SECONDS)
            tick = asyncio.ensure_future(self._tick())
            try:
                await asyncio.shield(tick)
            except asyncio.CancelledError:
                # Stopping: the tick reads the platform in a thread, which cannot be
                # interrupted. Let it finish and give its connection back before the runtime
                # closes the platform's pool (a connection given back to a closed pool is
                # never closed).
                with contextlib.suppress(Exception):
                    await tick
                raise

    async def _tick(self) -> None:
        await self.refresh()

    async def refresh(self) -> None:
        """Which tenants are suspended, and each licensed tenant's cap on concurrent runs and
        dispatch weight (its plan's). Through a platform outage the last view stands (and
        licenses their cached copies)."""
        try:
            tenants = await asyncio.to_thread(self.runtime.registry.list)
        except Exception as exc:
            log.warning("platform unreachable; keeping the tenant view", error=type(exc).__name__)
            return
        paused = frozenset(t.id for t in tenants if t.status is TenantStatus.SUSPENDED)
        caps: dict[str, int] = {}
        weights: dict[str, int] = {}
        for tenant in tenants:
            if tenant.plan_id is None:
                continue
            try:
                license = await self.runtime.license(tenant.id)
            except LicenseError:
                # No valid license: the tenant's runs wait (a cap nobody can fit under).
                caps[tenant.id] = NO_RUNS
                continue
            if license is None:
                continue
            if license.quotas.concurrent_runs is not None:
                caps[tenant.id] = license.quotas.concurrent_runs
            if license.quotas.dispatch_weight != 1 and tenant.id not in paused:
                weights[tenant.id] = license.quotas.dispatch_weight
        self.view = {"skip": paused, "caps": caps, "weights": weights}
