"""The outbox relay and the reconciler: one process at a time across the cluster (a lock in the
queue backend with a TTL) sweeps the tenants that may have work: those marked in the platform
database (``Runtime.note_work``, before a run is created). A tenant found with nothing
unfinished, and a mark older than ``MARK_CLEAR_SECONDS``, loses its mark; so an idle tenant
costs nothing, and one with an unfinished run keeps its mark whatever the queue lost.

- Relay: outbox records older than a few seconds were never published (the process died
  between commit and publish): publish them now.
- Reconciler: runs that should have a message and have none — queued, running with a lapsed
  lease, sleeping or waiting past their wake-up — get one again. That covers a queue that lost
  its data (Redis restarted empty, ``FLUSHALL``). A duplicate is harmless: claims decide.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import structlog

from tenantflow.backends import log_failure
from tenantflow.errors import TenantNotFoundError
from tenantflow.queue.base import Envelope
from tenantflow.runtime import MARK_CLEAR_SECONDS, Runtime
from tenantflow.store.base import RunStore

log = structlog.get_logger(__name__)

OUTBOX_GRACE_SECONDS = 2.0
LOCK_NAME = "maintenance"


@dataclass
class MaintenanceReport:
    relayed: int = 0
    reenqueued: int = 0
    tenants: int = 0
    cleared: int = 0
    ran: bool = False


class Maintenance:
    def __init__(
        self,
        runtime: Runtime,
        owner: str,
        *,
        totals: MaintenanceReport | None = None,
    ) -> None:
        self.runtime = runtime
        self.owner = owner
        # Counted as the work is done, not when a sweep returns: a sweep cut short (the worker
        # stopping) still counts what it published.
        self.totals = totals or MaintenanceReport()
        settings = runtime.settings
        self.interval = settings.reconcile_interval
        self.grace = max(2 * settings.lease_seconds, 1.0)

    async def run_once(self) -> MaintenanceReport:
        report = MaintenanceReport()
        queue = self.runtime.queue
        if not await queue.try_lock(LOCK_NAME, self.owner, 3 * self.interval):
            return report
        report.ran = True
        now = time.time()
        # Taken before any tenant is looked at: a mark renewed after it is never dropped.
        clear_before = now - MARK_CLEAR_SECONDS
        registry = self.runtime.registry
        for tenant_id, marked_at in await asyncio.to_thread(registry.active_tenants):
            report.tenants += 1
            try:
                async with self.runtime.router.borrowed(tenant_id) as store:
                    await self._sweep(tenant_id, store, now, report)
                    idle = marked_at < clear_before and not await store.has_unfinished()
                if idle and await asyncio.to_thread(
                    registry.clear_active, tenant_id, marked_before=clear_before
                ):
                    report.cleared += 1
            except TenantNotFoundError:
                # Offboarded meanwhile: its mark goes with it.
                await asyncio.to_thread(registry.clear_active, tenant_id, marked_before=math.inf)
            except Exception as exc:
                # One tenant's trouble (its database away, say) must not stop the others.
                log_failure(log, "maintenance of a tenant failed", exc, tenant=tenant_id)
        if report.relayed or report.reenqueued:
            log.info(
                "maintenance",
                relayed=report.relayed,
                reenqueued=report.reenqueued,
                tenants=report.tenants,
            )
        return report

    async def _sweep(
        self, tenant_id: str, store: RunStore, now: float, report: MaintenanceReport
    ) -> None:
        queue = self.runtime.queue
        pending = await store.pending_outbox(older_than=now - OUTBOX_GRACE_SECONDS)
        if pending:
            await self.runtime.publish(tenant_id, pending)
            report.relayed += len(pending)
            self.totals.relayed += len(pending)
        stalled = await store.stalled_runs(now=now, grace=self.grace)
        if stalled:
            live = await queue.live(tenant_id, [run_id for run_id, _, _ in stalled])
            missing = [
                Envelope(run_id, priority, trace)
                for run_id, priority, trace in stalled
                if run_id not in live
            ]
            if missing:
                await queue.enqueue_many({tenant_id: missing})
                report.reenqueued += len(missing)
                self.totals.reenqueued += len(missing)
                self.runtime.metrics.reenqueued.inc(len(missing))
