"""A worker's leases: renewed in the database (and the queue's visibility with them) every
third of a lease, tenant by tenant and concurrently; and the cancellations its runs were asked
for, looked for in between."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import defaultdict
from typing import Protocol

import structlog

from tenantflow.backends import log_failure
from tenantflow.engine.executor import Execution
from tenantflow.queue.base import Message
from tenantflow.runtime import Runtime

log = structlog.get_logger("tenantflow.worker.worker")

CANCEL_POLL_SECONDS = 0.5


class Host(Protocol):
    """What lease keeping uses of the worker it is part of (``Worker``)."""

    runtime: Runtime
    lease_seconds: float
    _inflight: set[Message]
    _parked: set[Message]
    _running: dict[tuple[str, str], Execution | None]
    _renewing: dict[str, asyncio.Task[None]]

    def _store_answers(self, tenant_id: str) -> None: ...

    def _executions_by_tenant(self) -> dict[str, dict[str, Execution]]: ...

    async def _renew(self) -> None: ...

    def _renewed(self, tenant_id: str, task: asyncio.Task[None]) -> None: ...

    async def _renew_tenant(
        self, tenant_id: str, executions: dict[str, Execution], until: float
    ) -> None: ...

    async def _poll_cancellations(self) -> None: ...


class LeaseKeeping:
    """Mixed into ``Worker``."""

    async def _keepalive(self: Host) -> None:
        renew_every = self.lease_seconds / 3
        last_renew = time.monotonic()
        polling: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(min(CANCEL_POLL_SECONDS, renew_every))
                try:
                    if time.monotonic() - last_renew >= renew_every:
                        last_renew = time.monotonic()
                        await self._renew()
                    elif polling is None or polling.done():
                        # Not waited for: a database that does not answer must not hold up
                        # the renewals (and the queue's visibility with them).
                        polling = asyncio.create_task(self._poll_cancellations())
                except Exception as exc:
                    log_failure(log, "lease renewal failed", exc)
        finally:
            tasks = [*self._renewing.values(), *([polling] if polling else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _executions_by_tenant(self: Host) -> dict[str, dict[str, Execution]]:
        out: dict[str, dict[str, Execution]] = defaultdict(dict)
        for (tenant_id, run_id), execution in list(self._running.items()):
            if execution is not None:
                out[tenant_id][run_id] = execution
        return out

    async def _renew(self: Host) -> None:
        try:
            await self.runtime.queue.extend([*self._inflight, *self._parked], self.lease_seconds)
        except Exception as exc:
            # The queue may be down or emptied; the database leases still matter most.
            log_failure(log, "queue lease renewal failed", exc)
        until = time.time() + self.lease_seconds
        # Concurrently, and waited for a third of a lease at most: one slow tenant database
        # must not let the others' leases lapse, nor hold up the next round (the queue's
        # visibility with it). A renewal that answers later still counts; a tenant whose
        # last one has not answered yet gets none this round.
        started: dict[asyncio.Task[None], dict[str, Execution]] = {}
        for tenant_id, executions in self._executions_by_tenant().items():
            if tenant_id in self._renewing:
                for execution in executions.values():
                    execution.lease_renewal_failed()
                continue
            task = asyncio.create_task(self._renew_tenant(tenant_id, executions, until))
            self._renewing[tenant_id] = task
            task.add_done_callback(functools.partial(self._renewed, tenant_id))
            started[task] = executions
        if not started:
            return
        # Not wait_for: a call cancelled on a server that does not answer waits for it (the
        # driver's own cancel request), up to the database's bound.
        _, pending = await asyncio.wait(set(started), timeout=self.lease_seconds / 3)
        for task in pending:
            for execution in started[task].values():
                execution.lease_renewal_failed()

    def _renewed(self: Host, tenant_id: str, task: asyncio.Task[None]) -> None:
        if self._renewing.get(tenant_id) is task:
            del self._renewing[tenant_id]

    async def _renew_tenant(
        self: Host, tenant_id: str, executions: dict[str, Execution], until: float
    ) -> None:
        leases = {run_id: execution.lease for run_id, execution in executions.items()}
        try:
            store = self.runtime.router.store(tenant_id)
            # An answer later than the lease would be worth nothing (without a database
            # timeout, nothing else bounds the call).
            async with asyncio.timeout(self.lease_seconds):
                cancels, lost = await store.renew_leases(leases, until=until)
        except Exception as exc:
            log.warning(
                "lease renewal of a tenant failed", tenant=tenant_id, error=type(exc).__name__
            )
            # Not renewed: these runs start no new step until a renewal goes through.
            for execution in executions.values():
                execution.lease_renewal_failed()
            return
        self._store_answers(tenant_id)
        for run_id, execution in executions.items():
            if run_id in lost:
                execution.lease_lost()
            else:
                execution.lease_renewed(until)
        for run_id in cancels:
            executions[run_id].cancel()

    async def _poll_cancellations(self: Host) -> None:
        try:
            for tenant_id, executions in self._executions_by_tenant().items():
                store = self.runtime.router.store(tenant_id)
                for run_id in await store.cancel_requested(list(executions)):
                    executions[run_id].cancel()
        except Exception as exc:
            log_failure(log, "looking for cancellations failed", exc)
