"""The worker: takes messages from the queue, claims their runs, executes them.

Concurrency is a number of runs in flight on one event loop (sync steps go to threads). A
keep-alive task renews the leases of runs in flight (queue and database together) and looks for
cancellation requests. On SIGTERM the worker takes no new work, lets running steps finish within
the grace period, and gives the rest back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from contextvars import Context
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import structlog

from tenantflow.backends import log_failure
from tenantflow.engine.executor import Execution, Outcome, OutcomeKind
from tenantflow.errors import LicenseError, TenantNotFoundError, WorkflowNotRegisteredError
from tenantflow.platform.registry import TenantStatus
from tenantflow.queue.base import Message
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.store.base import RunStore
from tenantflow.store.records import ClaimOutcome, OutboxEntry
from tenantflow.telemetry.tracing import mark_error, set_attributes
from tenantflow.worker.maintenance import Maintenance, MaintenanceReport

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger(__name__)

CANCEL_POLL_SECONDS = 0.5
QUEUE_RETRY_MAX_SECONDS = 2.0
STORE_RETRY_SECONDS = 1.0
UNREGISTERED_RETRY_SECONDS = 5.0
ACK_FLUSH_SECONDS = 5.0
PLATFORM_VIEW_SECONDS = 1.0
NO_RUNS = -1  # a cap below any count: the queue gives the tenant nothing
FAILED_STATUSES = frozenset({"failed", "needs_attention"})


class _TenantView(TypedDict):
    """The platform's word on tenants, as every dequeue takes it."""

    skip: frozenset[str]  # suspended: not taken from
    caps: dict[str, int]  # licensed caps on runs in flight
    weights: dict[str, int]  # licensed dispatch weights (absent: 1)


@dataclass
class _InFlight:
    message: Message
    execution: Execution | None = None


@dataclass
class WorkerStats:
    claimed: int = 0
    finished: int = 0
    suspended: int = 0
    released: int = 0
    dropped: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sweeps: MaintenanceReport = field(default_factory=MaintenanceReport)

    @property
    def relayed(self) -> int:
        return self.sweeps.relayed

    @property
    def reenqueued(self) -> int:
        return self.sweeps.reenqueued


class Worker:
    def __init__(self, app: App, runtime: Runtime, *, concurrency: int | None = None) -> None:
        self.app = app
        self.runtime = runtime
        settings = runtime.settings
        self.concurrency = concurrency or settings.worker_concurrency
        self.lease = settings.lease_seconds
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stopping = False
        self.breakers = runtime.breakers
        for name, config in app.breakers.items():
            self.breakers.configure(name, config)
        self.bulkheads = runtime.bulkheads
        self.metrics = runtime.metrics
        self.tracing = runtime.tracing
        self._metrics_server: Any = None
        for name, bulkhead in app.bulkheads.items():
            self.bulkheads.configure(name, bulkhead)
        self.stats = WorkerStats()
        # Keyed by (tenant, message id): ids are unique within a tenant's queue only.
        self._inflight: dict[tuple[str, str], _InFlight] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: list[Message] = []
        self._running: set[tuple[str, str]] = set()  # (tenant, run) executing here
        self._stop = asyncio.Event()
        self._slot_free = asyncio.Event()
        # The platform's word on tenants, refreshed in the background (_refresh_platform_view).
        self._view: _TenantView = {"skip": frozenset(), "caps": {}, "weights": {}}

    # -- ExecutionHost -----------------------------------------------------------------------

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None:
        self.runtime.publish_soon(tenant_id, entries)

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Take no new work; running executions stop at their next step boundary."""
        if not self.stopping:
            log.info("worker stopping", owner=self.owner, in_flight=len(self._inflight))
        self.stopping = True
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Work until ``stop()``; then drain within the grace period."""
        queue = self.runtime.queue
        poll = self.runtime.settings.poll_interval
        await self._refresh_platform_view()
        self._serve_metrics()
        keepalive = asyncio.create_task(self._keepalive())
        maintenance = asyncio.create_task(self._maintenance())
        platform_view = asyncio.create_task(self._watch_platform())
        log.info("worker started", owner=self.owner, concurrency=self.concurrency)
        backoff = 0.0
        idle = False
        try:
            while not self.stopping:
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    self._slot_free.clear()
                    await self._wait_any(self._slot_free.wait(), poll)
                    continue
                try:
                    if idle:  # nothing last time: wait for work, and take it as it comes
                        messages = await queue.wait_and_dequeue(
                            poll, self.owner, free, self.lease, **self._view
                        )
                    else:
                        messages = await queue.dequeue(self.owner, free, self.lease, **self._view)
                except Exception as exc:
                    # The queue is away (restarting, unreachable): keep the runs in flight
                    # going and try again, backing off, rather than die.
                    backoff = min(max(backoff * 2, poll), QUEUE_RETRY_MAX_SECONDS)
                    log_failure(log, "dequeue failed; retrying", exc, retry_in=round(backoff, 2))
                    await self._wait_any(asyncio.sleep(backoff), None)
                    continue
                backoff = 0.0
                if self.stopping:  # stopped while waiting: these go to another worker
                    for message in messages:
                        try:
                            await queue.retry_later(message, 0.0, count_delivery=False)
                        except Exception as exc:  # it comes back when its lease ends
                            log.warning("giving a message back failed", error=type(exc).__name__)
                    break
                for message in messages:
                    self._spawn(message)
                idle = not messages
        finally:
            await self._drain()
            await self._flush_acks()
            if self._tasks:  # acknowledgements still on their way
                await asyncio.wait(set(self._tasks), timeout=ACK_FLUSH_SECONDS)
            for task in (keepalive, maintenance, platform_view):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            log.info("worker stopped", owner=self.owner)

    async def _wait_any(self, waiter: Awaitable[Any], timeout: float | None) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        other = asyncio.ensure_future(waiter)
        await asyncio.wait({stop, other}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for fut in (stop, other):
            if not fut.done():
                fut.cancel()

    async def _drain(self) -> None:
        self.stopping = True
        if not self._tasks:
            return
        grace = self.runtime.settings.shutdown_grace_seconds
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for item in list(self._inflight.values()):
            if item.execution is not None:
                item.execution.release()
        if pending:
            log.warning("grace period over; releasing runs", count=len(pending))
            await asyncio.wait(pending, timeout=max(grace, 1.0))

    def _spawn(self, message: Message) -> None:
        if message.deliveries > 1:
            self.metrics.redelivered(message.tenant_id)
        self._inflight[message.tenant_id, message.id] = _InFlight(message)
        task = asyncio.create_task(self._process(message))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    # -- one message -------------------------------------------------------------------------

    async def _process(self, message: Message) -> None:
        queue = self.runtime.queue
        try:
            await self._handle(message)
        except Exception as exc:
            # A backend that does not answer (a tenant's database gone, say) is one line.
            fields = {"tenant": message.tenant_id, "run": message.run_id}
            log_failure(log, "message handling failed; retrying", exc, **fields)
            with contextlib.suppress(Exception):
                await queue.retry_later(message, 1.0)
        finally:
            self._inflight.pop((message.tenant_id, message.id), None)

    async def _handle(self, message: Message) -> None:
        queue = self.runtime.queue
        key = (message.tenant_id, message.run_id)
        if key in self._running:
            # Our own lapsed delivery came back while we still execute its run: it must not
            # start a second execution under the same owner.
            await queue.retry_later(message, self.lease / 2, count_delivery=False)
            return
        try:
            # Pinned: the tenant's store stays open while its run executes here. Each delivery
            # is a span of its own in the trace of the run's origin (the message's envelope).
            with (
                self.runtime.router.pinned(message.tenant_id) as store,
                structlog.contextvars.bound_contextvars(
                    tenant=message.tenant_id, run=message.run_id
                ),
                self.tracing.span(
                    "deliver",
                    kind="consumer",
                    origin=message.trace,
                    attributes={
                        "tenantflow.tenant": message.tenant_id,
                        "tenantflow.run": message.run_id,
                        "tenantflow.delivery": message.deliveries,
                        "messaging.message.id": message.id,
                    },
                ) as span,
            ):
                await self._claim_and_execute(message, store, span)
        except TenantNotFoundError:
            log.error("message for an unknown tenant dropped", tenant=message.tenant_id)
            self._ack(message)

    async def _claim_and_execute(
        self, message: Message, store: RunStore, span: Span | None
    ) -> None:
        queue = self.runtime.queue
        now = time.time()
        claim = await store.claim_run(message.run_id, owner=self.owner, now=now, lease=self.lease)
        set_attributes(span, {"tenantflow.claim": claim.outcome.value})
        if claim.outcome is ClaimOutcome.DROP:
            self.stats.dropped += 1
            self._ack(message)
            return
        if claim.outcome is ClaimOutcome.DEFER:
            assert claim.not_before is not None
            await queue.retry_later(message, claim.not_before - now, count_delivery=False)
            return
        if claim.outcome is ClaimOutcome.EXHAUSTED:
            if claim.run is not None:
                self.metrics.finished(claim.run.workflow, message.tenant_id, "failed")
            self.runtime.publish_soon(message.tenant_id, claim.wake)
            self._ack(message)
            return
        assert claim.run is not None
        self.stats.claimed += 1
        if claim.recovered:
            self.metrics.recovered.labels(*self.metrics.tenant(message.tenant_id)).inc()
        if span is not None:
            span.update_name(f"run {claim.run.workflow}")
            span.set_attributes(
                {
                    "tenantflow.workflow": claim.run.workflow,
                    "tenantflow.attempt": claim.run.executions,
                }
            )
        key = (message.tenant_id, message.run_id)
        self._running.add(key)
        try:
            workflow = self.app.get_workflow(claim.run.workflow)
        except WorkflowNotRegisteredError:
            self._running.discard(key)
            await self._unregistered(message, store, claim.run.workflow)
            return
        try:
            execution = Execution(
                workflow=workflow, store=store, run=claim.run, steps=claim.steps, host=self
            )
            self._inflight[message.tenant_id, message.id].execution = execution
            execution.task = asyncio.create_task(execution.execute())
            outcome = await execution.task
        except Exception:
            # Something failed between the claim and an outcome: give the run back now rather
            # than leave it leased to nobody until the lease ends.
            with contextlib.suppress(Exception):
                await store.release_run(message.run_id, owner=self.owner, now=time.time())
            raise
        finally:
            self._running.discard(key)
        if outcome.status is not None:
            set_attributes(span, {"tenantflow.status": outcome.status.value})
            if outcome.status.value in FAILED_STATUSES:
                mark_error(span, outcome.status.value)
        await self._settle(message, outcome, claim.run.workflow)

    async def _unregistered(self, message: Message, store: RunStore, workflow: str) -> None:
        """A run of a workflow this worker's app lacks: give it back, for a worker that has it
        (a rolling deployment). Once every delivery has found none, park it with the reason,
        the run visibly stuck and its message in the dead letters, rather than let it go round
        for ever; replaying the dead letter once a worker has the workflow runs it."""
        queue = self.runtime.queue
        reason = f"workflow {workflow!r} is not registered in this worker's app {self.app.name!r}"
        fields = {"tenant": message.tenant_id, "run": message.run_id, "workflow": workflow}
        if message.deliveries < queue.max_deliveries:
            log.error("workflow not registered in this worker; run given back", **fields)
            await store.release_run(message.run_id, owner=self.owner, now=time.time())
            await queue.retry_later(message, UNREGISTERED_RETRY_SECONDS)
            return
        log.error("workflow not registered in this worker; run dead-lettered", **fields)
        n = message.deliveries
        stuck = (
            f"{reason}; dead-lettered after {n} deliver{'y' if n == 1 else 'ies'}: replay the "
            "dead letter once a worker has the workflow"
        )
        await store.release_run(
            message.run_id, owner=self.owner, now=time.time(), stuck_reason=stuck
        )
        await queue.dead_letter(message, reason)

    def _ack(self, message: Message) -> None:
        """Acknowledge soon: acknowledgements of one turn of the loop go in one round trip.
        (Lost with the process, the delivery comes back and finds its run ended: dropped.)"""
        self._acks.append(message)
        if len(self._acks) == 1:
            # A fresh context: the batch acknowledges many runs, not this one's.
            asyncio.get_running_loop().call_soon(self._flush_acks_soon, context=Context())

    def _flush_acks_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_acks())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            try:
                await self.runtime.queue.ack(acks)
            except Exception:
                log.exception("acknowledgement failed; the deliveries will come back")

    async def _settle(self, message: Message, outcome: Outcome, workflow: str) -> None:
        queue = self.runtime.queue
        if outcome.kind is OutcomeKind.FINISHED:
            self.stats.finished += 1
            if outcome.status is not None:
                self.stats.by_status[outcome.status.value] += 1
                self.metrics.finished(workflow, message.tenant_id, outcome.status.value)
            self.runtime.publish_soon(message.tenant_id, outcome.wake)
            self._ack(message)
        elif outcome.kind is OutcomeKind.SUSPENDED:
            self.stats.suspended += 1
            if outcome.wake_at is None:
                self._ack(message)  # woken by an event or a child, which enqueue it
            else:
                await queue.retry_later(
                    message, outcome.wake_at - time.time(), count_delivery=False
                )
        elif outcome.kind is OutcomeKind.RELEASED:
            self.stats.released += 1
            await queue.retry_later(message, 0.0, count_delivery=False)
        elif outcome.kind is OutcomeKind.RETRY:
            await queue.retry_later(message, STORE_RETRY_SECONDS)
        else:  # LEASE_LOST: another delivery owns the run; this one is a duplicate now
            self._ack(message)

    # -- metrics -----------------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        """With ``metrics_port`` set, serve /metrics from a thread (prometheus-client's
        server); the shared gauges are set by the runtime's background survey."""
        settings = self.runtime.settings
        if settings.metrics_port:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(
                settings.metrics_port,
                addr=settings.metrics_host,
                registry=self.metrics.serving_registry(),
            )
            log.info("metrics served", port=settings.metrics_port)
            self.runtime.health.watch_breakers(self.app.breakers)
            self.runtime.health.start()

    # -- the platform's word on tenants ------------------------------------------------------

    async def _watch_platform(self) -> None:
        while True:
            await asyncio.sleep(PLATFORM_VIEW_SECONDS)
            tick = asyncio.ensure_future(self._platform_tick())
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

    async def _platform_tick(self) -> None:
        await self._refresh_platform_view()

    async def _refresh_platform_view(self) -> None:
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
        self._view = {"skip": paused, "caps": caps, "weights": weights}

    # -- relay and reconciler ----------------------------------------------------------------

    async def _maintenance(self) -> None:
        maintenance = Maintenance(self.runtime, self.owner, totals=self.stats.sweeps)
        while True:
            await asyncio.sleep(maintenance.interval)
            try:
                await maintenance.run_once()
            except Exception as exc:
                log_failure(log, "maintenance failed; next sweep soon", exc)

    # -- leases and cancellation -------------------------------------------------------------

    async def _keepalive(self) -> None:
        renew_every = self.lease / 3
        last_renew = time.monotonic()
        while True:
            await asyncio.sleep(min(CANCEL_POLL_SECONDS, renew_every))
            try:
                if time.monotonic() - last_renew >= renew_every:
                    last_renew = time.monotonic()
                    await self._renew()
                else:
                    await self._poll_cancellations()
            except Exception as exc:
                log_failure(log, "lease renewal failed", exc)

    def _executions_by_tenant(self) -> dict[str, dict[str, Execution]]:
        out: dict[str, dict[str, Execution]] = defaultdict(dict)
        for item in list(self._inflight.values()):
            if item.execution is not None:
                out[item.message.tenant_id][item.execution.run.id] = item.execution
        return out

    async def _renew(self) -> None:
        messages = [item.message for item in self._inflight.values()]
        try:
            await self.runtime.queue.extend(messages, self.lease)
        except Exception as exc:
            # The queue may be down or emptied; the database leases still matter most.
            log_failure(log, "queue lease renewal failed", exc)
        until = time.time() + self.lease
        # Concurrently, each bounded: one slow tenant database must not let the others'
        # leases lapse.
        await asyncio.gather(
            *(
                self._renew_tenant(tenant_id, executions, until)
                for tenant_id, executions in self._executions_by_tenant().items()
            )
        )

    async def _renew_tenant(
        self, tenant_id: str, executions: dict[str, Execution], until: float
    ) -> None:
        try:
            store = self.runtime.router.store(tenant_id)
            cancels, lost = await asyncio.wait_for(
                store.renew_leases(list(executions), owner=self.owner, until=until), self.lease / 3
            )
        except Exception as exc:
            log.warning(
                "lease renewal of a tenant failed", tenant=tenant_id, error=type(exc).__name__
            )
            return
        for run_id in cancels:
            executions[run_id].cancel()
        for run_id in lost:
            executions[run_id].lease_lost()

    async def _poll_cancellations(self) -> None:
        for tenant_id, executions in self._executions_by_tenant().items():
            store = self.runtime.router.store(tenant_id)
            for run_id in await store.cancel_requested(list(executions)):
                executions[run_id].cancel()
