"""The outbox relay and the reconciler: one process at a time across the cluster (a lock in the
queue backend with a TTL) sweeps the tenants that may have work: those marked in the platform
database (``Runtime.note_work``, before a run is created). A tenant found with nothing
unfinished, and a mark older than ``MARK_CLEAR_SECONDS``, loses its mark; so an idle tenant
costs nothing, and one with an unfinished run keeps its mark whatever the queue lost.

- Relay: outbox records older than a few seconds were never published (the process died
  between commit and publish): publish them now.
- Reconciler: runs that should have a message and have none — queued, running with a lapsed
  lease, sleeping or waiting past their wake-up — get one again, once they have been so for
  twice the lease (a message on its way is not duplicated). A duplicate is harmless: claims
  decide.
- Rebuild (``run_once(rebuild=True)``): a worker saw the queue's data set change (Redis
  emptied, restarted, failed over). Every outbox record is published, whatever its age, and
  every unfinished run without a live message gets one at once, without the grace: a queued
  run's now, a sleeping or waiting run's at its wake-up, a running run's when its lease ends
  (which finds it still held if its worker lives, and recovers it on time if not).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from tenantflow.backends import log_failure
from tenantflow.errors import TenantNotFoundError
from tenantflow.queue.base import Envelope
from tenantflow.runtime import Runtime
from tenantflow.store.base import RunStore
from tenantflow.store.records import OutboxEntry
from tenantflow.tenant.marks import MARK_CLEAR_SECONDS

log = structlog.get_logger(__name__)

OUTBOX_GRACE_SECONDS = 2.0
LOCK_NAME = "maintenance"
REBUILD_PAGE = 1000  # runs of a tenant read, and looked up in the queue, at a time
REBUILD_PARALLEL = 4  # tenants rebuilt at once (each borrows a database connection)
REBUILD_SETTLE_SECONDS = 1.0  # an outbox record this young may still be on its way


@dataclass
class MaintenanceReport:
    relayed: int = 0
    reenqueued: int = 0
    tenants: int = 0
    cleared: int = 0
    failed: int = 0  # tenants whose sweep failed (their database away, say)
    rebuilds: int = 0
    ran: bool = False
    # Tenants a rebuild left runs of to a second visit (outbox records on their way).
    unsettled: set[str] = field(default_factory=set)


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

    async def run_once(self, *, rebuild: bool = False) -> MaintenanceReport:
        """One sweep of the tenants marked with work, if this process holds the lock; with
        ``rebuild``, the queue is rebuilt from their databases (see the module's docstring).
        Without the lock, another process sweeps; it watches the queue's data set too."""
        report = MaintenanceReport()
        queue = self.runtime.queue
        if not await queue.try_lock(LOCK_NAME, self.owner, 3 * self.interval):
            return report
        report.ran = True
        started = time.monotonic()
        now = time.time()
        # Taken before any tenant is looked at: a mark renewed after it is never dropped.
        clear_before = now - MARK_CLEAR_SECONDS
        marked = await asyncio.to_thread(self.runtime.registry.active_tenants)
        report.tenants = len(marked)
        if not rebuild:
            for tenant_id, marked_at in marked:
                await self._visit(tenant_id, marked_at, clear_before, report, self._reconcile)
        else:
            # A few tenants at a time: the runs of the last must not wait for every other
            # tenant's database. Those with records that were on their way to the queue are
            # visited again once these have arrived or failed.
            await self._rebuild_all(marked, clear_before, report)
            again = [(t, at) for t, at in marked if t in report.unsettled]
            if again:
                await asyncio.sleep(REBUILD_SETTLE_SECONDS)
                report.unsettled.clear()
                await self._rebuild_all(again, clear_before, report)
            report.rebuilds = 1
            self.totals.rebuilds += 1
            self.runtime.metrics.rebuilds.inc()
            log.warning(
                "queue rebuilt from the tenant databases",
                relayed=report.relayed,
                reenqueued=report.reenqueued,
                tenants=report.tenants,
                failed=report.failed,
                seconds=round(time.monotonic() - started, 3),
            )
        if not rebuild and (report.relayed or report.reenqueued):
            log.info(
                "maintenance",
                relayed=report.relayed,
                reenqueued=report.reenqueued,
                tenants=report.tenants,
            )
        return report

    async def _rebuild_all(
        self, marked: list[tuple[str, float]], clear_before: float, report: MaintenanceReport
    ) -> None:
        slots = asyncio.Semaphore(REBUILD_PARALLEL)

        async def visit(tenant_id: str, marked_at: float) -> None:
            async with slots:
                await self._visit(tenant_id, marked_at, clear_before, report, self._rebuild)

        await asyncio.gather(*(visit(tenant_id, marked_at) for tenant_id, marked_at in marked))

    async def _visit(
        self,
        tenant_id: str,
        marked_at: float,
        clear_before: float,
        report: MaintenanceReport,
        sweep: Callable[[str, RunStore, MaintenanceReport], Awaitable[None]],
    ) -> None:
        registry = self.runtime.registry
        try:
            async with self.runtime.router.borrowed(tenant_id) as store:
                await sweep(tenant_id, store, report)
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
            report.failed += 1
            log_failure(log, "maintenance of a tenant failed", exc, tenant=tenant_id)

    async def _reconcile(self, tenant_id: str, store: RunStore, report: MaintenanceReport) -> None:
        now = time.time()
        pending = await store.pending_outbox(older_than=now - OUTBOX_GRACE_SECONDS)
        await self._relay(tenant_id, pending, report)
        stalled = await store.stalled_runs(now=now, grace=self.grace)
        await self._enqueue_missing(
            tenant_id,
            [Envelope(run_id, priority, trace) for run_id, priority, trace in stalled],
            report,
        )

    async def _rebuild(self, tenant_id: str, store: RunStore, report: MaintenanceReport) -> None:
        """Every run that should have a message and has none gets one: its outbox record
        published again, or else the message its state calls for. A record written in the last
        ``REBUILD_SETTLE_SECONDS`` may be on its way to the queue (publishing it again would
        make a duplicate): its run is left to a second visit."""
        now = time.time()
        settled = await store.pending_outbox(older_than=now - REBUILD_SETTLE_SECONDS)
        old = {e.id for e in settled}
        young = {e.run_id for e in await store.pending_outbox(older_than=now) if e.id not in old}
        if young:
            report.unsettled.add(tenant_id)
        queue = self.runtime.queue
        records = [e for e in settled if e.run_id not in young]
        live = await queue.live(tenant_id, [e.run_id for e in records])
        records = [e for e in records if e.run_id not in live]
        await self._relay(tenant_id, records, report)
        skip = young | {e.run_id for e in records}
        after = ""
        while True:
            page = await store.expected_messages(after=after, limit=REBUILD_PAGE)
            now = time.time()
            await self._enqueue_missing(
                tenant_id,
                [
                    Envelope(e.run_id, e.priority, e.trace, delay=max(0.0, (e.due_at or now) - now))
                    for e in page
                    if e.run_id not in skip
                ],
                report,
            )
            if len(page) < REBUILD_PAGE:
                return
            after = page[-1].run_id

    async def _relay(
        self, tenant_id: str, records: Sequence[OutboxEntry], report: MaintenanceReport
    ) -> None:
        if records:
            await self.runtime.outbox.publish(tenant_id, records)
            report.relayed += len(records)
            self.totals.relayed += len(records)

    async def _enqueue_missing(
        self, tenant_id: str, envelopes: Sequence[Envelope], report: MaintenanceReport
    ) -> None:
        """Enqueue those of ``envelopes`` whose runs have no live message."""
        if not envelopes:
            return
        queue = self.runtime.queue
        live = await queue.live(tenant_id, [e.run_id for e in envelopes])
        missing = [e for e in envelopes if e.run_id not in live]
        if missing:
            await queue.enqueue_many({tenant_id: missing})
            report.reenqueued += len(missing)
            self.totals.reenqueued += len(missing)
            self.runtime.metrics.reenqueued.inc(len(missing))
