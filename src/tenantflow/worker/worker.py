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
import functools
import os
import secrets
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Coroutine, Sequence
from contextvars import Context
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import structlog

from tenantflow.backends import log_failure, unavailable
from tenantflow.engine.executor import Execution
from tenantflow.engine.outcomes import Outcome, OutcomeKind
from tenantflow.errors import LicenseError, TenantNotFoundError, WorkflowNotRegisteredError
from tenantflow.platform.registry import TenantStatus
from tenantflow.queue.base import Message
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.store.base import RunStore
from tenantflow.store.records import ClaimOutcome, Lease, OutboxEntry
from tenantflow.telemetry.tracing import mark_error, set_attributes
from tenantflow.worker.maintenance import Maintenance, MaintenanceReport

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger(__name__)

CANCEL_POLL_SECONDS = 0.5
QUEUE_RETRY_MAX_SECONDS = 2.0
STORE_RETRY_SECONDS = 1.0
STORE_RETRY_MAX_SECONDS = 5.0  # the longest wait for a tenant database that does not answer
STORE_PROBE_PAUSE = 0.25  # between two probes of a tenant database that refused at once
UNREGISTERED_RETRY_SECONDS = 5.0
ACK_FLUSH_SECONDS = 5.0
PLATFORM_VIEW_SECONDS = 1.0
EPOCH_CHECK_SECONDS = 0.5
REBUILD_RETRY_SECONDS = 0.5
NO_RUNS = -1  # a cap below any count: the queue gives the tenant nothing
FAILED_STATUSES = frozenset({"failed", "needs_attention"})


class _TenantView(TypedDict):
    """The platform's word on tenants, as every dequeue takes it."""

    skip: frozenset[str]  # suspended: not taken from
    caps: dict[str, int]  # licensed caps on runs in flight
    weights: dict[str, int]  # licensed dispatch weights (absent: 1)


@dataclass
class _GiveBack:
    """A ``retry_later`` the queue did not take (it was away): sent again once it answers."""

    message: Message
    due: float  # when the message is to be visible (wall clock)
    count_delivery: bool


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


class Worker:
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
        self._unsent: dict[tuple[str, str], _GiveBack] = {}
        self._unacked: list[Message] = []
        # The platform's word on tenants, refreshed in the background (_refresh_platform_view).
        self._view: _TenantView = {"skip": frozenset(), "caps": {}, "weights": {}}

    # -- ExecutionHost -----------------------------------------------------------------------

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None:
        self.runtime.outbox.publish_soon(tenant_id, entries)

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
        queue_watch = asyncio.create_task(self._watch_queue())
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
                            poll, self.owner, free, self.lease_seconds, **self._view
                        )
                    else:
                        messages = await queue.dequeue(
                            self.owner, free, self.lease_seconds, **self._view
                        )
                except Exception as exc:
                    # The queue is away (restarting, unreachable): keep the runs in flight
                    # going and try again, backing off, rather than die; sooner if the
                    # watcher finds it answering.
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
                    break
                for message in messages:
                    self._spawn(message)
                idle = not messages
        finally:
            await self._drain()
            await self._flush_acks()
            if self._tasks:  # acknowledgements still on their way
                await asyncio.wait(set(self._tasks), timeout=ACK_FLUSH_SECONDS)
            await self._resend()
            for task in (keepalive, maintenance, platform_view, queue_watch):
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

    async def _retry(self, message: Message, *, store_away: bool) -> None:
        """Try the message again later. The tenant's database not answering is not the
        message's fault: that delivery does not count, and the message is given back as soon
        as the database answers again (``_park``), after a wait as long as it has been away
        at the latest (``STORE_RETRY_SECONDS`` to ``STORE_RETRY_MAX_SECONDS``, and at most
        half a lease): the longer an outage, the fewer tries."""
        if not store_away:
            await self._give_back(message, STORE_RETRY_SECONDS)
            return
        away = time.monotonic() - self._store_away.setdefault(message.tenant_id, time.monotonic())
        longest = min(STORE_RETRY_MAX_SECONDS, self.lease_seconds / 2)
        delay = min(max(away, min(STORE_RETRY_SECONDS, longest)), longest)
        self._park(message, delay)

    def _park(self, message: Message, delay: float) -> None:
        """Keep ``message`` (its visibility extended with those in flight; no slot taken) until
        its tenant's database answers again, or for ``delay`` at most, then give it back for
        now: a run waits for the database, not for a wait fixed when the database failed."""
        self._parked.add(message)
        back = self._store_back.get(message.tenant_id)
        if back is None:
            back = self._store_back[message.tenant_id] = asyncio.Event()
            self._track(self._probe_store(message.tenant_id, back))

        async def wait_then_give_back() -> None:
            try:
                await self._wait_any(back.wait(), delay)
            finally:
                self._parked.discard(message)
            await self._give_back(message, 0.0, count_delivery=False)

        self._track(wait_then_give_back())

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task of this worker, waited for when it stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_store(self, tenant_id: str, back: asyncio.Event) -> None:
        """While messages of ``tenant_id`` are parked: ask its database, one call at a time
        (each within the database's own bound), until it answers or they are all given back.
        Another call answering (a claim, a renewal) ends it too."""
        try:
            while not back.is_set() and not self.stopping:
                if not any(m.tenant_id == tenant_id for m in self._parked):
                    return
                try:
                    await self.runtime.router.store(tenant_id).ping()
                except Exception:
                    await self._wait_any(back.wait(), STORE_PROBE_PAUSE)
                    continue
                self._store_answers(tenant_id)
        finally:
            if self._store_back.get(tenant_id) is back:
                del self._store_back[tenant_id]

    def _store_answers(self, tenant_id: str) -> None:
        """The tenant's database answered a call: it is not away, and what was parked for it
        goes back to the queue now."""
        self._store_away.pop(tenant_id, None)
        back = self._store_back.pop(tenant_id, None)
        if back is not None:
            back.set()

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
        if claim.outcome is ClaimOutcome.DROP:
            self.stats.dropped += 1
            self._ack(message)
            return
        if claim.outcome is ClaimOutcome.DEFER:
            assert claim.not_before is not None
            # From now, not from before the claim: it may have waited for the database.
            await self._give_back(message, claim.not_before - time.time(), count_delivery=False)
            return
        if claim.outcome is ClaimOutcome.EXHAUSTED:
            if claim.run is not None:
                self.metrics.finished(claim.run.workflow, message.tenant_id, "failed")
            self.runtime.outbox.publish_soon(message.tenant_id, claim.wake)
            self._ack(message)
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
            except Exception as exc:
                # Sent again once the queue answers (else the deliveries come back, and find
                # their runs ended).
                self._unacked.extend(acks)
                log_failure(log, "acknowledgement failed; sent again once the queue answers", exc)

    async def _give_back(
        self, message: Message, delay: float, *, count_delivery: bool = True
    ) -> None:
        """``retry_later``. If the queue is away, it is kept and sent once the queue answers,
        rather than the run waiting for its delivery to lapse, or, if the queue lost the
        message meanwhile, for the reconciler (a ``retry_later`` of a lost message makes a new
        one)."""
        due = time.time() + delay
        fields = {"tenant": message.tenant_id, "run": message.run_id, "message": message.id}
        log.debug("giving back", delay=round(delay, 3), **fields)
        try:
            await self.runtime.queue.retry_later(message, delay, count_delivery=count_delivery)
        except Exception as exc:
            self._unsent[message.tenant_id, message.id] = _GiveBack(message, due, count_delivery)
            log_failure(
                log,
                "giving a message back failed; sent again once the queue answers",
                exc,
                **fields,
            )

    async def _resend(self) -> None:
        """Send what the queue did not take while it was away; stop at the first failure."""
        queue = self.runtime.queue
        for key, unsent in list(self._unsent.items()):
            delay = max(0.0, unsent.due - time.time())
            log.debug(
                "giving back again",
                tenant=unsent.message.tenant_id,
                run=unsent.message.run_id,
                message=unsent.message.id,
                delay=round(delay, 3),
            )
            try:
                await queue.retry_later(unsent.message, delay, count_delivery=unsent.count_delivery)
            except Exception:
                return
            if self._unsent.get(key) is unsent:  # not given back anew meanwhile
                del self._unsent[key]
        if self._unacked:
            acks, self._unacked = self._unacked, []
            try:
                await queue.ack(acks)
            except Exception:
                self._unacked.extend(acks)

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

    # -- leases and cancellation -------------------------------------------------------------

    async def _keepalive(self) -> None:
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

    def _executions_by_tenant(self) -> dict[str, dict[str, Execution]]:
        out: dict[str, dict[str, Execution]] = defaultdict(dict)
        for (tenant_id, run_id), execution in list(self._running.items()):
            if execution is not None:
                out[tenant_id][run_id] = execution
        return out

    async def _renew(self) -> None:
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

    def _renewed(self, tenant_id: str, task: asyncio.Task[None]) -> None:
        if self._renewing.get(tenant_id) is task:
            del self._renewing[tenant_id]

    async def _renew_tenant(
        self, tenant_id: str, executions: dict[str, Execution], until: float
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

    async def _poll_cancellations(self) -> None:
        try:
            for tenant_id, executions in self._executions_by_tenant().items():
                store = self.runtime.router.store(tenant_id)
                for run_id in await store.cancel_requested(list(executions)):
                    executions[run_id].cancel()
        except Exception as exc:
            log_failure(log, "looking for cancellations failed", exc)
