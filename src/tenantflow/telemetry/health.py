"""The stuck-run detector: runs that stopped moving, and queues that stopped draining.

A run is stuck when it is queued or running and nothing about it changed (no claim, no
checkpoint) for ``stuck_run_seconds``; a tenant's queue lags when its oldest unacknowledged
message is older than ``queue_lag_seconds``. Shown by ``/readyz`` (counts only: it is
public), the ``tenantflow_stuck_runs`` and queue-age metrics, and ``tenantflow status``.

A survey costs one read of the tenant list, one pipelined read of every tenant's queue, and a
read of the tenant databases of only the tenants marked as having work (``active_tenants`` in
the platform database): a tenant with an unfinished run is always marked, so an unmarked one
has no stuck run and costs no connection. The API and the workers survey in the background
(``HealthMonitor``) and answer ``/readyz`` and ``/metrics`` from the latest survey, so neither
waits for a walk over the tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from tenantflow.backends import log_failure
from tenantflow.errors import TenantNotFoundError

if TYPE_CHECKING:
    from tenantflow.platform.registry import TenantRegistry
    from tenantflow.queue.base import Queue
    from tenantflow.resilience.breaker import Breakers
    from tenantflow.settings import Settings
    from tenantflow.telemetry.metrics import Metrics
    from tenantflow.tenant.router import TenantRouter

log = structlog.get_logger(__name__)


class Installation(Protocol):
    """What a survey reads: a process's runtime is one (the survey does not import it, as the
    runtime is composed of this module among others)."""

    settings: Settings
    registry: TenantRegistry
    router: TenantRouter
    queue: Queue
    metrics: Metrics
    breakers: Breakers


# Tenant databases read at once: enough to hide a round trip, few enough to leave the
# connection budget to the work.
SURVEY_CONCURRENCY = 4


@dataclass(frozen=True, kw_only=True)
class TenantHealth:
    tenant_id: str
    stuck_runs: int
    oldest_stuck_seconds: float | None
    queue_depth: int
    queue_lag_seconds: float
    dead_letters: int
    lagging: bool
    reachable: bool = True  # False: its database did not answer, so stuck_runs is unknown


@dataclass(frozen=True, kw_only=True)
class Survey:
    tenants: list[TenantHealth]
    taken_at: float  # wall clock, when it started
    seconds: float  # how long it took

    def counts(self) -> dict[str, int]:
        """What ``/readyz`` shows: counts, no tenant id."""
        return {
            "stuck_runs": sum(t.stuck_runs for t in self.tenants),
            "tenants_with_stuck_runs": sum(1 for t in self.tenants if t.stuck_runs),
            "lagging_queues": sum(1 for t in self.tenants if t.lagging),
        }


Progress = Callable[[int, int], None]  # (tenant databases read, of how many)


async def survey(runtime: Installation, *, progress: Progress | None = None) -> list[TenantHealth]:
    """Every tenant's stuck runs and queue lag."""
    settings = runtime.settings
    registry = runtime.registry
    now = time.time()
    tenants = [t.id for t in await asyncio.to_thread(registry.list)]
    marked = {tenant_id for tenant_id, _ in await asyncio.to_thread(registry.active_tenants)}
    stats = await runtime.queue.stats_many(tenants)
    to_read = [tenant_id for tenant_id in tenants if tenant_id in marked]
    stuck: dict[str, tuple[int, float | None]] = {}
    unreachable: set[str] = set()
    done = 0
    if progress is not None:
        progress(0, len(to_read))
    gate = asyncio.Semaphore(SURVEY_CONCURRENCY)

    async def read(tenant_id: str) -> None:
        nonlocal done
        async with gate:
            try:
                async with runtime.router.borrowed(tenant_id) as store:
                    stuck[tenant_id] = await store.stuck_runs(
                        before=now - settings.stuck_run_seconds
                    )
            except TenantNotFoundError:
                pass  # offboarded since the list was read
            except Exception as exc:
                # One tenant's database away must not blind the survey to the others.
                log_failure(log, "surveying a tenant failed", exc, tenant=tenant_id)
                unreachable.add(tenant_id)
        done += 1
        if progress is not None:
            progress(done, len(to_read))

    await asyncio.gather(*(read(tenant_id) for tenant_id in to_read))
    out = []
    for tenant_id in tenants:
        count, oldest = stuck.get(tenant_id, (0, None))
        queue = stats[tenant_id]
        lag = 0.0 if queue.oldest_at is None else max(0.0, now - queue.oldest_at)
        out.append(
            TenantHealth(
                tenant_id=tenant_id,
                stuck_runs=count,
                oldest_stuck_seconds=None if oldest is None else now - oldest,
                queue_depth=queue.depth,
                queue_lag_seconds=lag,
                dead_letters=queue.dead_letters,
                lagging=lag > settings.queue_lag_seconds,
                reachable=tenant_id not in unreachable,
            )
        )
    return out


@dataclass
class HealthMonitor:
    """The latest survey of a process, taken every ``health_refresh_seconds`` in the
    background once something asks for it; each survey also sets the shared gauges of
    ``runtime.metrics`` (and the states of the breakers being watched)."""

    runtime: Installation
    breakers: set[str] = field(default_factory=set)
    latest: Survey | None = None
    _task: asyncio.Task[None] | None = None
    _first: asyncio.Event = field(default_factory=asyncio.Event)

    def watch_breakers(self, names: Iterable[str]) -> None:
        self.breakers.update(names)

    async def current(self, *, wait: float) -> Survey | None:
        """The latest survey. Before the first has finished, wait for it up to ``wait``
        seconds (None if it has not come by then)."""
        self.start()
        if self.latest is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first.wait(), wait)
        return self.latest

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def refresh(self) -> Survey:
        started, began = time.time(), time.monotonic()
        tenants = await survey(self.runtime)
        taken = Survey(tenants=tenants, taken_at=started, seconds=time.monotonic() - began)
        self.latest = taken
        metrics = self.runtime.metrics
        metrics.record(tenants)
        await metrics.record_breakers(self.runtime, self.breakers)
        return taken

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                # The last survey stands (its age says how old it is); tried again next time.
                log_failure(log, "health survey failed", exc)
            finally:
                self._first.set()
            await asyncio.sleep(self.runtime.settings.health_refresh_seconds)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
