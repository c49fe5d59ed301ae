"""Executes one claimed run: replays the workflow function from its checkpoints, runs new
steps, and commits each step's result before the workflow moves on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from pydantic import ValidationError

from tenantflow.backends import unavailable
from tenantflow.errors import (
    BulkheadFullError,
    ChildWorkflowError,
    CircuitOpenError,
    EventPayloadError,
    NonDeterminismError,
    StepFailedError,
    StepTimeoutError,
    StoreUnavailableError,
    WorkflowCancelled,
    WorkflowSuspended,
    WorkflowTimeoutError,
    summarize,
)
from tenantflow.sdk.context import StepContext, WorkflowContext, in_step, in_workflow
from tenantflow.serde import adapter_for, dumps, issues_of, loads
from tenantflow.store.base import LeaseLost, RunStore
from tenantflow.store.records import (
    TERMINAL,
    Lease,
    NewRun,
    OutboxEntry,
    RunRecord,
    RunStatus,
    StepKind,
    StepRecord,
    StepStatus,
    SuspendOutcome,
    Wait,
    WaitKind,
)

if TYPE_CHECKING:
    from tenantflow.resilience.breaker import Breakers
    from tenantflow.resilience.bulkhead import Bulkheads
    from tenantflow.sdk.app import Step, Workflow
    from tenantflow.telemetry.metrics import Metrics
    from tenantflow.telemetry.tracing import Tracing

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A sleep this close to its end is finished in place rather than by releasing the worker.
INLINE_SLEEP = 0.05
BREAKER_INLINE_WAIT = 2.0  # an open breaker's wait this short is spent holding the run
BULKHEAD_POLL = 0.05
# While the database is away: how often a run tries again to renew its lease before a step, or
# to commit a step's checkpoint.
LEASE_RETRY_SECONDS = 0.5


class StoreUnavailable(BaseException):
    """A store call failed (its cause says how), or the lease could not be renewed before it
    ended: give the run back and retry later."""


class WorkflowReleased(BaseException):
    """The worker is shutting down: stop at this step boundary and give the run back."""


class SagaCompensated(BaseException):
    """A saga failed or was cancelled, and every compensation ran: end the run
    ``compensated``. ``args[0]`` is what made it compensate."""


class SagaNeedsAttention(BaseException):
    """A saga cannot be brought to a clean state (a compensation failed after its retries,
    or it failed past its pivot): end the run ``needs_attention``. ``args[0]`` says why."""


class OutcomeKind(enum.Enum):
    FINISHED = "finished"
    SUSPENDED = "suspended"
    RELEASED = "released"
    RETRY = "retry"  # the store failed: the run was given back, try the message again later
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    kind: OutcomeKind
    status: RunStatus | None = None
    wake_at: float | None = None
    wake: tuple[OutboxEntry, ...] = ()
    unavailable: bool = False  # RETRY: the database did not answer (not the message's fault)


class ExecutionHost(Protocol):
    """What an execution needs from the worker that runs it."""

    lease_seconds: float
    stopping: bool
    breakers: Breakers
    bulkheads: Bulkheads
    metrics: Metrics
    tracing: Tracing

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None: ...


def encode_input(
    workflow: Workflow[Any, Any], args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
) -> bytes:
    """Check the arguments against the workflow's signature and encode them as JSON."""
    workflow.codec.signature.bind(None, *args, **kwargs)  # TypeError on a wrong call
    return dumps(
        {"args": list(args), "kwargs": kwargs}, what=f"the input of workflow {workflow.name!r}"
    )


def _event_payload(name: str, payload: bytes | None, as_type: type[Any] | None) -> Any:
    """An event's checkpointed payload (None: the wait timed out), validated into ``as_type``.
    A payload that does not fit raises ``EventPayloadError`` in the workflow, the same on every
    replay, since the payload is checkpointed as it came."""
    if payload is None:
        return None
    value = loads(payload)
    if as_type is None:
        return value
    try:
        return adapter_for(as_type).validate_python(value)
    except ValidationError as exc:
        issues = issues_of(exc.errors(include_url=False))
        what = getattr(as_type, "__name__", repr(as_type))
        raise EventPayloadError(
            f"the payload of event {name!r} does not fit {what}: {summarize(issues)}",
            issues=issues,
        ) from None


def error_info(exc: BaseException) -> bytes:
    return dumps({"type": type(exc).__name__, "message": str(exc)})


class Execution:
    def __init__(
        self,
        *,
        workflow: Workflow[Any, Any],
        store: RunStore,
        run: RunRecord,
        steps: tuple[StepRecord, ...],
        host: ExecutionHost,
        lease: Lease,
        lease_until: float,
    ) -> None:
        self.workflow = workflow
        self.store = store
        self.run = run
        self.host = host
        # Every write of this execution is fenced by its lease (owner and attempt). Its end,
        # as last confirmed by the claim or a renewal; a renewal that failed since puts the
        # lease in doubt, and no step starts before one succeeds.
        self.lease = lease
        self.lease_until = lease_until
        self._lease_doubted = False
        self.checkpoints = {s.seq: s for s in steps}
        self.seq = 0
        self.cancel_requested = run.cancel_requested
        self.task: asyncio.Task[Outcome] | None = None
        self._interrupt: str | None = None  # why the task was cancelled from outside
        self._nondeterminism: NonDeterminismError | None = None
        self._pending: StepRecord | None = None
        self.compensating = False  # running a saga's compensations: a cancel does not stop them
        self._mark_compensable = False  # a saga registered a compensation: persist that

    # -- control from the worker -------------------------------------------------------------

    def cancel(self) -> None:
        """Cancellation was requested: interrupt the run now (a running async step included),
        unless it is compensating already: compensations are what a cancel asks for."""
        self.cancel_requested = True
        if not self.compensating:
            self._interrupt_task("cancel")

    def release(self) -> None:
        """Shutdown grace is over: stop now and give the run back."""
        self._interrupt_task("release")

    def lease_lost(self) -> None:
        self._interrupt_task("lease_lost")

    def lease_renewed(self, until: float) -> None:
        self.lease_until = until
        self._lease_doubted = False

    def lease_renewal_failed(self) -> None:
        """The worker could not renew the lease (the database away, slow): start no new step
        until a renewal goes through."""
        self._lease_doubted = True

    def _interrupt_task(self, why: str) -> None:
        if self.task is not None and not self.task.done() and self._interrupt is None:
            self._interrupt = why
            self.task.cancel()

    # -- the run -----------------------------------------------------------------------------

    async def execute(self) -> Outcome:
        """Run the workflow to an outcome. The store failing (a database away, a deadlock
        victim) is never taken for the workflow's own failure: the run is given back and its
        message retried."""
        run = self.run
        try:
            return await self._execute()
        except LeaseLost:
            log.warning("lease lost", tenant=run.tenant_id, run=run.id)
            return Outcome(kind=OutcomeKind.LEASE_LOST)
        except StoreUnavailable as exc:
            log.warning(
                "store unavailable; run given back",
                tenant=run.tenant_id,
                run=run.id,
                error=type(exc.__cause__).__name__,
            )
            # The step that just ran, if its checkpoint did not commit, commits with the
            # release: the database may answer this call, and then the step is not run again.
            with contextlib.suppress(Exception):
                await self.store.release_run(
                    run.id, lease=self.lease, now=time.time(), step=self._pending
                )
            return Outcome(
                kind=OutcomeKind.RETRY,
                unavailable=exc.__cause__ is not None and unavailable(exc.__cause__) is not None,
            )

    async def _execute(self) -> Outcome:
        run = self.run
        try:
            try:
                result = await self._invoke()
                if self._nondeterminism is not None:
                    raise self._nondeterminism
                output = dumps(result, what=f"the result of workflow {run.workflow!r}")
                return await self._finish(RunStatus.COMPLETED, result=output)
            except asyncio.CancelledError:
                why = self._interrupt
                if why == "cancel":
                    raise WorkflowCancelled() from None
                if why == "release":
                    raise WorkflowReleased() from None
                if why == "lease_lost":
                    raise LeaseLost(run.id) from None
                raise
        except WorkflowSuspended as suspended:
            wake_at = suspended.args[0] if suspended.args else None
            return Outcome(kind=OutcomeKind.SUSPENDED, wake_at=wake_at)
        except WorkflowCancelled:
            return await self._finish(
                RunStatus.CANCELLED,
                error=dumps({"type": "RunCancelledError", "message": "the run was cancelled"}),
            )
        except SagaCompensated as compensated:
            cause = compensated.args[0]
            log.info("saga compensated", tenant=run.tenant_id, run=run.id, cause=cause["type"])
            return await self._finish(RunStatus.COMPENSATED, error=dumps(cause))
        except SagaNeedsAttention as stuck:
            log.warning("saga needs attention", tenant=run.tenant_id, run=run.id)
            return await self._finish(RunStatus.NEEDS_ATTENTION, error=dumps(stuck.args[0]))
        except WorkflowReleased:
            await self._flush()
            await self._io(self.store.release_run(run.id, lease=self.lease, now=time.time()))
            return Outcome(kind=OutcomeKind.RELEASED)
        except Exception as raised:
            # A workflow that swallowed a NonDeterminismError still fails with it.
            failure: BaseException = self._nondeterminism or raised
            log.info(
                "run failed",
                tenant=run.tenant_id,
                run=run.id,
                workflow=run.workflow,
                error=type(failure).__name__,
            )
            return await self._finish(RunStatus.FAILED, error=error_info(failure))

    @staticmethod
    async def _io(call: Awaitable[T]) -> T:
        """A store call: its failures become ``StoreUnavailable``, which workflow code cannot
        catch (a ``BaseException``), so they never pass for the workflow's own errors."""
        try:
            return await call
        except Exception as exc:
            raise StoreUnavailable() from exc

    async def _commit(self, call: Callable[[], Awaitable[T]]) -> T:
        """A checkpoint's commit (a repeated one changes nothing): while the database does not
        answer, tried again every ``LEASE_RETRY_SECONDS`` for as long as the lease lasts, so
        that an outage shorter than the lease costs the step that just ran nothing."""
        while True:
            try:
                return await call()
            except Exception as exc:
                if (
                    unavailable(exc) is None
                    or time.time() + LEASE_RETRY_SECONDS >= self.lease_until
                ):
                    raise StoreUnavailable() from exc
            await asyncio.sleep(LEASE_RETRY_SECONDS)

    async def _hold_lease(self) -> None:
        """Before a step attempt: it starts only under a lease known to last a while yet (a
        third of its length). One in doubt (a renewal failed) or running short (a claim that
        waited for the database) is renewed here first, tried again every
        ``LEASE_RETRY_SECONDS`` while the database does not answer; once the lease has ended
        unrenewed the run is given up, for the next attempt."""
        length = self.host.lease_seconds
        while self._lease_doubted or self.lease_until - time.time() < length / 3:
            now = time.time()
            try:
                async with asyncio.timeout(max(self.lease_until - now, length / 3)):
                    _, lost = await self.store.renew_leases(
                        {self.run.id: self.lease}, until=now + length
                    )
            except Exception as exc:
                if time.time() >= self.lease_until:
                    raise StoreUnavailable() from StoreUnavailableError(
                        f"the lease could not be renewed before it ended ({type(exc).__name__})"
                    )
                await asyncio.sleep(LEASE_RETRY_SECONDS)
                continue
            if lost:
                raise LeaseLost(self.run.id)
            self.lease_renewed(now + length)

    async def _invoke(self) -> Any:
        run = self.run
        raw = loads(run.input)
        args, kwargs = self.workflow.codec.decode_args(raw["args"], raw["kwargs"])
        ctx = WorkflowContext(self)
        with in_workflow(ctx):
            coro: Awaitable[Any] = self.workflow.fn(ctx, *args, **kwargs)
            if run.deadline is None:
                return await coro
            loop = asyncio.get_running_loop()
            scope = asyncio.timeout_at(loop.time() + run.deadline - time.time())
            try:
                async with scope:
                    return await coro
            except TimeoutError:
                if scope.expired():
                    raise WorkflowTimeoutError() from None
                raise

    async def _finish(
        self, status: RunStatus, *, result: bytes | None = None, error: bytes | None = None
    ) -> Outcome:
        # The last step's checkpoint, if still pending, commits with the run's end (pending
        # until then: a release after a failure takes it).
        step = self._pending
        finished = await self._commit(
            lambda: self.store.finish_run(
                self.run.id,
                status,
                result=result,
                error=error,
                lease=self.lease,
                now=time.time(),
                step=step,
            )
        )
        self._pending = None
        return Outcome(kind=OutcomeKind.FINISHED, status=status, wake=finished.wake)

    # -- positions ---------------------------------------------------------------------------

    def _next(self, name: str, kind: StepKind) -> tuple[int, StepRecord | None]:
        """The position of the next durable call, with its checkpoint if it has one.

        A cancelled run replays what it recorded and stops at its first new position (a saga
        must see its history to know what to compensate); compensations themselves go on."""
        if self.host.stopping:
            raise WorkflowReleased()
        seq = self.seq
        checkpoint = self.checkpoints.get(seq)
        if self.cancel_requested and checkpoint is None and not self.compensating:
            raise WorkflowCancelled()
        self.seq += 1
        if checkpoint is not None and (checkpoint.name != name or checkpoint.kind != kind):
            self._nondeterminism = NonDeterminismError(
                f"at position {seq} the workflow called {kind.value} {name!r}, but its history "
                f"recorded {checkpoint.kind.value} {checkpoint.name!r}; workflow code changed "
                "or is not deterministic"
            )
            raise self._nondeterminism
        return seq, checkpoint

    async def _record(self, step: StepRecord) -> None:
        if await self._commit(lambda: self.store.record_step(step, lease=self.lease)):
            self.cancel_requested = True

    async def _flush(self) -> None:
        """Commit the pending checkpoint (the result of the step that just ran)."""
        if self._pending is not None:
            await self._record(self._pending)
            self._pending = None  # only once committed: a failed write keeps it pending

    # -- steps -------------------------------------------------------------------------------

    async def run_step(
        self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        await self._flush()
        seq, checkpoint = self._next(step.name, StepKind.STEP)
        if checkpoint is not None:
            return self._step_result(checkpoint, step)
        await self._persist_compensable()
        run = self.run
        policy = step.options.retry
        started = time.time()
        attempt = 0
        breaker = self._breaker_name(step)
        while True:
            await self._hold_lease()
            permit = None
            if breaker is not None:
                try:
                    permit = await self.host.breakers.acquire(breaker)
                except CircuitOpenError as refused:
                    # The dependency is known to be down: wait (durably, if long) instead of
                    # using up this step's retries on calls bound to fail.
                    await self._wait_for_breaker(refused)
                    continue
            attempt += 1
            with in_step(
                StepContext(
                    tenant_id=run.tenant_id,
                    run_id=run.id,
                    step_name=step.name,
                    seq=seq,
                    attempt=attempt,
                )
            ):
                try:
                    try:
                        with self.host.tracing.span(
                            f"{'compensate' if self.compensating else 'step'} {step.name}",
                            attributes={
                                "tenantflow.tenant": run.tenant_id,
                                "tenantflow.run": run.id,
                                "tenantflow.workflow": run.workflow,
                                "tenantflow.step": step.name,
                                "tenantflow.seq": seq,
                                "tenantflow.attempt": attempt,
                                "tenantflow.compensation": self.compensating,
                            },
                        ):
                            value = await self._attempt(step, args, kwargs)
                    except Exception:
                        if permit is not None:
                            await self.host.breakers.record(permit, failed=True)
                        raise
                    except BaseException:
                        if (
                            permit is not None and permit.probe
                        ):  # free its slot before its lease ends
                            await self.host.breakers.record(permit, failed=True)
                        raise
                    if permit is not None:
                        await self.host.breakers.record(permit, failed=False)
                    output = dumps(value, what=f"the result of step {step.name!r}")
                    outcome: tuple[StepStatus, bytes | None, bytes | None] = (
                        StepStatus.COMPLETED,
                        output,
                        None,
                    )
                    break
                except Exception as exc:
                    if policy.should_retry(exc, attempt):
                        self.host.metrics.step_retries.labels(step.name).inc()
                        delay = policy.delay(attempt)
                        log.info(
                            "step retry",
                            tenant=run.tenant_id,
                            run=run.id,
                            step=step.name,
                            attempt=attempt,
                            error=type(exc).__name__,
                            delay=round(delay, 3),
                        )
                        await asyncio.sleep(delay)
                        continue
                    outcome = (StepStatus.FAILED, None, error_info(exc))
                    break
        status, saved, error = outcome
        self.host.metrics.step_seconds.labels(step.name, status.value).observe(
            time.time() - started
        )
        record = StepRecord(
            run_id=run.id,
            seq=seq,
            name=step.name,
            kind=StepKind.STEP,
            status=status,
            output=saved,
            error=error,
            attempts=attempt,
            started_at=started,
            finished_at=time.time(),
        )
        # Committed before the next durable call runs, or with the run's end: workflow code in
        # between has no side effects, so nothing can act on an uncommitted result.
        self._pending = record
        self.checkpoints[seq] = record
        return self._step_result(record, step)

    def _breaker_name(self, step: Step[Any, Any]) -> str | None:
        name = step.options.breaker
        if name is None:
            return None
        return f"{name}@{self.run.tenant_id}" if step.options.breaker_per_tenant else name

    async def _wait_for_breaker(self, refused: CircuitOpenError) -> None:
        """Sleep through a short wait here; release the worker for a long one (the run comes
        back to this step, which has no checkpoint yet, and asks the breaker again)."""
        if refused.retry_after <= BREAKER_INLINE_WAIT:
            await asyncio.sleep(max(refused.retry_after, 0.01))
            return
        log.info(
            "circuit open; step waits",
            tenant=self.run.tenant_id,
            run=self.run.id,
            breaker=refused.name,
            retry_in=round(refused.retry_after, 2),
        )
        await self._suspend(Wait(kind=WaitKind.SLEEP, wake_at=time.time() + refused.retry_after))

    async def _attempt(
        self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if step.options.bulkhead is None:
            return await self._attempt_now(step, args, kwargs)
        bulkheads = self.host.bulkheads
        while True:  # wait for a slot: the calls holding them end soon
            try:
                slot = await bulkheads.take(step.options.bulkhead)
                break
            except BulkheadFullError as full:
                await asyncio.sleep(min(full.retry_after, BULKHEAD_POLL))
        try:
            return await self._attempt_now(step, args, kwargs)
        finally:
            await bulkheads.give_back(slot)

    async def _attempt_now(
        self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call: Awaitable[Any]
        if step.is_async:
            call = step.fn(*args, **kwargs)
        else:
            # to_thread copies the context, so current_step() works in the thread too.
            call = asyncio.to_thread(step.fn, *args, **kwargs)
        timeout = step.options.timeout
        if timeout is None:
            return await call
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await call
        except TimeoutError:
            if scope.expired():
                raise StepTimeoutError(
                    f"step {step.name!r} did not finish within {timeout} s"
                ) from None
            raise

    @staticmethod
    def _step_result(record: StepRecord, step: Step[Any, Any]) -> Any:
        if record.status is StepStatus.COMPLETED:
            return step.codec.decode_return(loads(record.output))
        info = record.error_info or {}
        raise StepFailedError(
            step.name, str(info.get("type")), str(info.get("message")), record.attempts
        )

    # -- sagas -------------------------------------------------------------------------------

    def note_compensable(self) -> None:
        """A saga registered a compensation: the run is marked before its next durable call
        (before any step it covers runs), so a cancel arriving later compensates."""
        if not self.run.compensable:
            self._mark_compensable = True

    async def _persist_compensable(self) -> None:
        if self._mark_compensable:
            await self._io(
                self.store.mark_compensable(self.run.id, lease=self.lease, now=time.time())
            )
            self._mark_compensable = False
            self.run = dataclasses.replace(self.run, compensable=True)

    async def compensate(
        self,
        compensations: Sequence[tuple[Step[Any, Any], tuple[Any, ...], dict[str, Any]]],
        raised: BaseException,
        *,
        pivoted: bool,
    ) -> None:
        """A saga block ended with ``raised``: compensate if it is a failure or a cancel, in
        reverse order, each compensation a durable step; then end the run. Anything else
        (a suspension, a shutdown, the store away) passes through: the run resumes later."""
        cancelled = isinstance(raised, WorkflowCancelled) or (
            isinstance(raised, asyncio.CancelledError) and self._interrupt == "cancel"
        )
        if not cancelled and not isinstance(raised, Exception):
            return
        if isinstance(raised, NonDeterminismError):
            raise SagaNeedsAttention(
                {
                    "type": "NonDeterminismError",
                    "message": f"not compensated, the history does not match: {raised}",
                }
            )
        cause = (
            {"type": "RunCancelledError", "message": "the run was cancelled"}
            if cancelled
            else {"type": type(raised).__name__, "message": str(raised)}
        )
        if pivoted:
            raise SagaNeedsAttention(
                {**cause, "message": f"failed past its pivot: {cause['message']}"}
            )
        self.compensating = True
        try:
            for step, args, kwargs in reversed(compensations):
                try:
                    await self.run_step(step, args, kwargs)
                except StepFailedError as failure:
                    raise SagaNeedsAttention(
                        {
                            "type": "CompensationFailedError",
                            "message": f"compensation {step.name!r} failed: {failure}",
                            "cause": cause,
                        }
                    ) from None
        finally:
            self.compensating = False
        raise SagaCompensated(cause)

    # -- durable waits -----------------------------------------------------------------------

    async def _suspend(self, wait: Wait) -> None:
        """Release the worker until ``wait`` is met; returns if it already is."""
        outcome = await self._io(
            self.store.suspend_run(self.run.id, wait, lease=self.lease, now=time.time())
        )
        if outcome is SuspendOutcome.SUSPENDED:
            raise WorkflowSuspended(wait.wake_at)
        if outcome is SuspendOutcome.CANCEL:
            self.cancel_requested = True
            raise WorkflowCancelled()

    async def sleep(self, seconds: float) -> None:
        await self._flush()
        await self._persist_compensable()
        seq, checkpoint = self._next("sleep", StepKind.SLEEP)
        if checkpoint is None:
            now = time.time()
            wake_at = now + max(0.0, float(seconds))
            await self._record(
                StepRecord(
                    run_id=self.run.id,
                    seq=seq,
                    name="sleep",
                    kind=StepKind.SLEEP,
                    status=StepStatus.COMPLETED,
                    output=dumps(wake_at),
                    error=None,
                    attempts=1,
                    started_at=now,
                    finished_at=now,
                )
            )
        else:
            wake_at = float(loads(checkpoint.output))
        remaining = wake_at - time.time()
        if remaining <= 0:
            return
        if remaining <= INLINE_SLEEP:
            await asyncio.sleep(remaining)
            return
        await self._suspend(Wait(kind=WaitKind.SLEEP, wake_at=wake_at))

    async def wait_for_event(
        self, name: str, timeout: float | None, as_type: type[Any] | None = None
    ) -> Any:
        await self._flush()
        await self._persist_compensable()
        seq, checkpoint = self._next(name, StepKind.EVENT)
        if checkpoint is not None and checkpoint.status is StepStatus.COMPLETED:
            return _event_payload(name, checkpoint.output, as_type)
        deadline = time.time() + timeout if timeout is not None else None
        while True:
            got = await self._io(
                self.store.wait_event(
                    self.run.id, seq, name, deadline, lease=self.lease, now=time.time()
                )
            )
            if got.received:
                return _event_payload(name, got.payload, as_type)
            if got.timed_out:
                return None
            await self._suspend(Wait(kind=WaitKind.EVENT, wake_at=got.deadline, event_name=name))

    async def run_child(
        self, workflow: Workflow[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        await self._flush()
        await self._persist_compensable()
        seq, checkpoint = self._next(workflow.name, StepKind.CHILD)
        child_id = f"{self.run.id}.{seq}"
        if checkpoint is not None and checkpoint.status is not StepStatus.PENDING:
            return self._child_result(
                workflow, child_id, checkpoint.status, checkpoint.output, checkpoint.error
            )
        child = NewRun(
            id=child_id,
            workflow=workflow.name,
            input=encode_input(workflow, args, kwargs),
            parent_id=self.run.id,
            priority=self.run.priority,
            timeout=workflow.workflow_options.timeout,
            max_recoveries=workflow.workflow_options.max_recovery_attempts,
            trace=self.host.tracing.traceparent(),  # the child's deliveries join this trace
        )
        while True:
            state = await self._io(
                self.store.start_child(self.run.id, seq, child, lease=self.lease, now=time.time())
            )
            if state.status in TERMINAL:
                done = (
                    StepStatus.COMPLETED
                    if state.status is RunStatus.COMPLETED
                    else StepStatus.FAILED
                )
                return self._child_result(workflow, child_id, done, state.result, state.error)
            await self.host.publish(self.run.tenant_id, state.wake)
            await self._suspend(Wait(kind=WaitKind.CHILD, wake_at=None, child_id=child_id))

    @staticmethod
    def _child_result(
        workflow: Workflow[Any, Any],
        child_id: str,
        status: StepStatus,
        output: bytes | None,
        error: bytes | None,
    ) -> Any:
        if status is StepStatus.COMPLETED:
            return workflow.codec.decode_return(loads(output))
        info: dict[str, Any] | None = loads(error)
        child_status = (
            "cancelled" if info and info.get("type") == "RunCancelledError" else ("failed")
        )
        raise ChildWorkflowError(child_id, child_status, info)
