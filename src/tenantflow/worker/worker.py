"""The worker: takes messages from the queue, claims their runs, executes them.

Concurrency is a number of runs in flight on one event loop (sync steps go to threads). A
keep-alive task renews the leases of runs in flight (queue and database together) and looks for
cancellation requests. On SIGTERM the worker takes no new work, lets running steps finish within
the grace period, and gives the rest back to the queue.

A watcher looks at the queue's data set (``Queue.epoch``) every half second: when it changed
(Redis emptied, restarted, failed over), the queue is rebuilt from the tenant databases at once.
Runs in execution meanwhile go on under their database leases whatever became of their
messages; what could not be sent to the queue while it was away (a message given back, an
acknowledgement) is sent once it answers.
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from tenantflow.backends import log_failure, unavailable
from tenantflow.engine.executor import Execution
from tenantflow.engine.outcomes import Outcome, OutcomeKind
from tenantflow.errors import TenantNotFoundError, WorkflowNotRegisteredError
from tenantflow.queue.base import Message
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.store.base import RunStore
from tenantflow.store.records import Claim, ClaimOutcome, Lease, OutboxEntry
from tenantflow.telemetry.tracing import mark_error, set_attributes
from tenantflow.worker.leases import LeaseKeeping
from tenantflow.worker.maintenance import Maintenance, MaintenanceReport
from tenantflow.worker.platform_view import PlatformView
from tenantflow.worker.returns import GiveBack, GivingBack

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger(__name__)

QUEUE_RETRY_MAX_SECONDS = 2.0
UNREGISTERED_RETRY_SECONDS = 5.0
ACK_FLUSH_SECONDS = 5.0
EPOCH_CHECK_SECONDS = 0.5
REBUILD_RETRY_SECONDS = 0.5
FAILED_STATUSES = frozenset({"failed", "needs_attention"})


@dataclass
class WorkerStats:
    claimed: int = 0
    finished: int = 0
    suspended: int = 0
    released: int = 0
    dropped: int = 0
    handed_back: int = 0  # deliveries of a run already executing here (not started again)
    by_status: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sweeps: MaintenanceReport = field(default_factory=MaintenanceReport)

    @property
    def relayed(self) -> int:
        return self.sweeps.relayed

    @property
    def reenqueued(self) -> int:
        return self.sweeps.reenqueued


class Worker(GivingBack, LeaseKeeping):
    """Executes the runs of ``app``'s workflows, for every tenant, from the runtime's queue:
    ``concurrency`` at once (default ``worker_concurrency``). ``await worker.run()`` works
    until ``stop()``, then drains."""

    def __init__(self, app: App, runtime: Runtime, *, concurrency: int | None = None) -> None:
        self.app = app
        self.runtime = runtime
        settings = runtime.settings
        self.concurrency = concurrency or settings.worker_concurrency
        self.lease_seconds = settings.lease_seconds
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
        # Deliveries being handled. Two deliveries of one message (ours came back while we
        # still work on it) are two entries: they differ in their receipt.
        self._inflight: set[Message] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._acks: list[Message] = []
        # (tenant, run) -> its execution here; None while it is being claimed. A run is in it
        # from before its claim to after its outcome: one execution per run in this process.
        self._running: dict[tuple[str, str], Execution | None] = {}
        self._store_away: dict[str, float] = {}  # tenant -> since when its database is away
        # Messages waiting for their tenant's database to answer again (see ``_retry``), and
        # per tenant, set once it does (a probe asks it meanwhile).
        self._parked: set[Message] = set()
        self._store_back: dict[str, asyncio.Event] = {}
        # Each tenant's lease renewal on its way: one at a time, not waited for past its round.
        self._renewing: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._slot_free = asyncio.Event()
        # The queue: answering again (ends a dequeue's backoff), to be looked at now, to be
        # rebuilt; and what it did not take while it was away.
        self._queue_back = asyncio.Event()
        self._queue_check = asyncio.Event()
        self._rebuild = asyncio.Event()
        self._unsent: dict[tuple[str, str], GiveBack] = {}
        self._unacked: list[Message] = []
        # The platform's word on tenants, refreshed in the background.
        self.platform_view = PlatformView(runtime)

    # -- ExecutionHost -----------------------------------------------------------------------

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None:
        """Send a run's outbox records (a child started, a parent woken) soon."""
        self.runtime.outbox.publish_soon(tenant_id, entries)

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Take no new work; running executions stop at their next step boundary."""
        if not self.stopping:
            log.info("worker stopping", owner=self.owner, in_flight=len(self._inflight))
        self.stopping = True
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """``stop()`` on SIGTERM and SIGINT (a drain, then exit)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Work until ``stop()``; then drain within the grace period."""
        await self.platform_view.refresh()
        self._serve_metrics()
        background = [
            asyncio.create_task(self._keepalive()),
            asyncio.create_task(self._maintenance()),
            asyncio.create_task(self.platform_view.watch()),
            asyncio.create_task(self._watch_queue()),
        ]
        log.info("worker started", owner=self.owner, concurrency=self.concurrency)
        try:
            await self._serve()
        finally:
            await self._drain()
            await self._flush_acks()
            if self._tasks:  # acknowledgements still on their way
                await asyncio.wait(set(self._tasks), timeout=ACK_FLUSH_SECONDS)
            await self._resend()
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            log.info("worker stopped", owner=self.owner)

    async def _serve(self) -> None:
        """Take messages as slots free, until ``stop()``."""
        queue = self.runtime.queue
        poll = self.runtime.settings.poll_interval
        backoff = 0.0
        idle = False
        while not self.stopping:
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                self._slot_free.clear()
                await self._wait_any(self._slot_free.wait(), poll)
                continue
            view = self.platform_view.view
            try:
                if idle:  # nothing last time: wait for work, and take it as it comes
                    messages = await queue.wait_and_dequeue(
                        poll, self.owner, free, self.lease_seconds, **view
                    )
                else:
                    messages = await queue.dequeue(self.owner, free, self.lease_seconds, **view)
            except Exception as exc:
                # The queue is away (restarting, unreachable): keep the runs in flight going
                # and try again, backing off, rather than die; sooner if the watcher finds it
                # answering.
                backoff = min(max(backoff * 2, poll), QUEUE_RETRY_MAX_SECONDS)
                log_failure(log, "dequeue failed; retrying", exc, retry_in=round(backoff, 2))
                self._queue_back.clear()
                await self._wait_any(self._queue_back.wait(), backoff)
                continue
            if backoff:  # answering again: is it the same data set?
                self._queue_check.set()
            backoff = 0.0
            if self.stopping:  # stopped while waiting: these go to another worker
                for message in messages:
                    try:
                        await queue.retry_later(message, 0.0, count_delivery=False)
                    except Exception as exc:  # it comes back when its lease ends
                        log.warning("giving a message back failed", error=type(exc).__name__)
                return
            for message in messages:
                self._spawn(message)
            idle = not messages

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
        for execution in list(self._running.values()):
            if execution is not None:
                execution.release()
        if pending:
            log.warning("grace period over; releasing runs", count=len(pending))
            await asyncio.wait(pending, timeout=max(grace, 1.0))

    def _spawn(self, message: Message) -> None:
        if message.deliveries > 1:
            self.metrics.redelivered(message.tenant_id)
        self._inflight.add(message)
        task = asyncio.create_task(self._process(message))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    # -- one message -------------------------------------------------------------------------

    async def _process(self, message: Message) -> None:
        try:
            await self._handle(message)
        except Exception as exc:
            fields = {"tenant": message.tenant_id, "run": message.run_id}
            log_failure(log, "message handling failed; retrying", exc, **fields)
            await self._retry(message, store_away=unavailable(exc) is not None)
        finally:
            self._inflight.discard(message)

    async def _handle(self, message: Message) -> None:
        key = (message.tenant_id, message.run_id)
        log.debug(
            "delivered",
            tenant=message.tenant_id,
            run=message.run_id,
            message=message.id,
            deliveries=message.deliveries,
        )
        if key in self._running:
            # A delivery of a run this process executes already (ours came back after its
            # visibility lapsed, a duplicate whose claim would see a lease lapsed meanwhile):
            # handed back, never started as a second execution.
            self.stats.handed_back += 1
            await self._give_back(message, self.lease_seconds / 2, count_delivery=False)
            return
        self._running[key] = None  # before the claim: a delivery arriving meanwhile waits too
        try:
            await self._deliver(message)
        finally:
            del self._running[key]

    async def _deliver(self, message: Message) -> None:
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
        now = time.time()
        claim = await store.claim_run(
            message.run_id, owner=self.owner, now=now, lease=self.lease_seconds
        )
        self._store_answers(message.tenant_id)
        log.debug("claimed", outcome=claim.outcome.value, message=message.id)
        set_attributes(span, {"tenantflow.claim": claim.outcome.value})
        if await self._not_claimed(message, claim):
            return
        assert claim.run is not None and claim.lease is not None
        lease = claim.lease
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
        try:
            workflow = self.app.get_workflow(claim.run.workflow)
        except WorkflowNotRegisteredError:
            await self._unregistered(message, store, claim.run.workflow, lease)
            return
        try:
            execution = Execution(
                workflow=workflow,
                store=store,
                run=claim.run,
                steps=claim.steps,
                host=self,
                lease=lease,
                lease_until=now + self.lease_seconds,
            )
            self._running[message.tenant_id, message.run_id] = execution
            execution.task = asyncio.create_task(execution.execute())
            outcome = await execution.task
        except Exception:
            # Something failed between the claim and an outcome: give the run back now rather
            # than leave it leased to nobody until the lease ends.
            with contextlib.suppress(Exception):
                await store.release_run(message.run_id, lease=lease, now=time.time())
            raise
        if outcome.status is not None:
            set_attributes(span, {"tenantflow.status": outcome.status.value})
            if outcome.status.value in FAILED_STATUSES:
                mark_error(span, outcome.status.value)
        await self._settle(message, outcome, claim.run.workflow)

    async def _not_claimed(self, message: Message, claim: Claim) -> bool:
        """Settle a delivery whose claim did not give this worker the run (True)."""
        if claim.outcome is ClaimOutcome.DROP:
            self.stats.dropped += 1
            self._ack(message)
        elif claim.outcome is ClaimOutcome.DEFER:
            assert claim.not_before is not None
            # From now, not from before the claim: it may have waited for the database.
            await self._give_back(message, claim.not_before - time.time(), count_delivery=False)
        elif claim.outcome is ClaimOutcome.EXHAUSTED:
            if claim.run is not None:
                self.metrics.finished(claim.run.workflow, message.tenant_id, "failed")
            self.runtime.outbox.publish_soon(message.tenant_id, claim.wake)
            self._ack(message)
        else:
            return False
        return True

    async def _unregistered(
        self, message: Message, store: RunStore, workflow: str, lease: Lease
    ) -> None:
        """A run of a workflow this worker's app lacks: give it back, for a worker that has it
        (a rolling deployment). Once every delivery has found none, park it with the reason,
        the run visibly stuck and its message in the dead letters, rather than let it go round
        for ever; replaying the dead letter once a worker has the workflow runs it."""
        queue = self.runtime.queue
        reason = f"workflow {workflow!r} is not registered in this worker's app {self.app.name!r}"
        fields = {"tenant": message.tenant_id, "run": message.run_id, "workflow": workflow}
        if message.deliveries < queue.max_deliveries:
            log.error("workflow not registered in this worker; run given back", **fields)
            await store.release_run(message.run_id, lease=lease, now=time.time())
            await self._give_back(message, UNREGISTERED_RETRY_SECONDS)
            return
        log.error("workflow not registered in this worker; run dead-lettered", **fields)
        n = message.deliveries
        stuck = (
            f"{reason}; dead-lettered after {n} deliver{'y' if n == 1 else 'ies'}: replay the "
            "dead letter once a worker has the workflow"
        )
        await store.release_run(message.run_id, lease=lease, now=time.time(), stuck_reason=stuck)
        await queue.dead_letter(message, reason)

    async def _settle(self, message: Message, outcome: Outcome, workflow: str) -> None:
        if outcome.kind is OutcomeKind.FINISHED:
            self.stats.finished += 1
            if outcome.status is not None:
                self.stats.by_status[outcome.status.value] += 1
                self.metrics.finished(workflow, message.tenant_id, outcome.status.value)
            self.runtime.outbox.publish_soon(message.tenant_id, outcome.wake)
            self._ack(message)
        elif outcome.kind is OutcomeKind.SUSPENDED:
            self.stats.suspended += 1
            if outcome.wake_at is None:
                self._ack(message)  # woken by an event or a child, which enqueue it
            else:
                await self._give_back(message, outcome.wake_at - time.time(), count_delivery=False)
        elif outcome.kind is OutcomeKind.RELEASED:
            self.stats.released += 1
            await self._give_back(message, 0.0, count_delivery=False)
        elif outcome.kind is OutcomeKind.RETRY:
            await self._retry(message, store_away=outcome.unavailable)
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

    # -- relay and reconciler ----------------------------------------------------------------

    async def _maintenance(self) -> None:
        maintenance = Maintenance(self.runtime, self.owner, totals=self.stats.sweeps)
        retry = REBUILD_RETRY_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rebuild.wait(), maintenance.interval)
            rebuild = self._rebuild.is_set()
            self._rebuild.clear()
            try:
                report = await maintenance.run_once(rebuild=rebuild)
            except Exception as exc:
                log_failure(log, "maintenance failed; next sweep soon", exc)
                report = None
            if not rebuild:
                continue
            if report is None or report.failed:  # again soon, not at the next sweep
                await asyncio.sleep(retry)
                retry = min(2 * retry, maintenance.interval)
                self._rebuild.set()
            else:
                retry = REBUILD_RETRY_SECONDS

    # -- the queue's data set ----------------------------------------------------------------

    async def _watch_queue(self) -> None:
        """Every ``EPOCH_CHECK_SECONDS``, and at once after a dequeue that follows failures:
        does the queue answer, and is its data set the one seen last? A new one sets off a
        rebuild of the queue from the tenant databases (``Maintenance.run_once``); whichever
        worker holds the maintenance lock does it, and every worker watches."""
        queue = self.runtime.queue
        known: str | None = None
        while True:
            try:
                epoch = await queue.epoch()
            except Exception:  # away: the dequeue loop says so
                pass
            else:
                self._queue_back.set()
                if epoch.new or (known is not None and epoch.id != known):
                    log.warning(
                        "the queue lost its data (or is new); rebuilding it", epoch=epoch.id
                    )
                    self._rebuild.set()
                known = epoch.id
                await self._resend()
            self._queue_check.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue_check.wait(), EPOCH_CHECK_SECONDS)
