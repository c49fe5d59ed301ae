"""The stuck-run detector: runs that stopped moving, and queues that stopped draining.

A run is stuck when it is queued or running and nothing about it changed (no claim, no
checkpoint) for ``stuck_run_seconds``; a tenant's queue lags when its oldest unacknowledged
message is older than ``queue_lag_seconds``. Shown by ``/readyz`` (counts only: it is
public), the ``tenantflow_stuck_runs`` and queue-age metrics, and ``tenantflow status``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tenantflow.runtime import Runtime


@dataclass(frozen=True, kw_only=True)
class TenantHealth:
    tenant_id: str
    stuck_runs: int
    oldest_stuck_seconds: float | None
    queue_depth: int
    queue_lag_seconds: float
    dead_letters: int
    lagging: bool


async def survey(runtime: Runtime) -> list[TenantHealth]:
    """Every tenant's stuck runs and queue lag (one read of each tenant database and queue)."""
    settings = runtime.settings
    now = time.time()
    out = []
    for tenant in await asyncio.to_thread(runtime.registry.list):
        async with runtime.router.borrowed(tenant.id) as store:
            stuck, oldest = await store.stuck_runs(before=now - settings.stuck_run_seconds)
        stats = await runtime.queue.stats(tenant.id)
        lag = 0.0 if stats.oldest_at is None else max(0.0, now - stats.oldest_at)
        out.append(
            TenantHealth(
                tenant_id=tenant.id,
                stuck_runs=stuck,
                oldest_stuck_seconds=None if oldest is None else now - oldest,
                queue_depth=stats.depth,
                queue_lag_seconds=lag,
                dead_letters=stats.dead_letters,
                lagging=lag > settings.queue_lag_seconds,
            )
        )
    return out
