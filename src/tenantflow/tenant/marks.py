"""Marks of work: which tenants have unfinished runs, kept in the platform database so that
background sweeps (relay, reconciler, stuck-run detector) visit only those tenants.

A tenant's mark is renewed when older than REMARK; a sweep drops it only once older than
CLEAR and the tenant has nothing unfinished. Safe as long as a run is committed within
CLEAR - REMARK of the mark it relied on: ``TenantClient.start`` marks again after a commit
that took longer than SLOW_SUBMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from contextvars import Context

import structlog

from tenantflow.backends import log_failure
from tenantflow.platform.registry import TenantRegistry

log = structlog.get_logger(__name__)

MARK_REMARK_SECONDS = 20.0
MARK_CLEAR_SECONDS = 60.0
MARK_SLOW_SUBMIT_SECONDS = 20.0
MARK_RETRY_SECONDS = 2.0


class WorkMarks:
    """This process's marks of work, written through the registry in a thread."""

    def __init__(self, registry: TenantRegistry) -> None:
        self.registry = registry
        self._marked: dict[str, float] = {}  # tenant -> when this process last marked it
        self._marking: dict[str, asyncio.Future[None]] = {}
        self._unmarked: set[str] = set()  # marks that failed, retried by _mark_again
        self._remarker: asyncio.Task[None] | None = None

    async def note(self, tenant_id: str, *, again: bool = False) -> None:
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

    async def close(self) -> None:
        if self._remarker is not None and not self._remarker.done():
            # One last try; marks still failing are logged (a sweep may miss those tenants'
            # runs only if the queue loses their messages as well).
            self._remarker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remarker
            failed = await self._retry_marks()
            if failed is not None:
                log_failure(log, "tenants' work left unmarked", failed, tenants=len(self._unmarked))
