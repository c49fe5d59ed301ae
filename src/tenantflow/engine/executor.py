"""Executes one claimed run: replays the workflow function from its checkpoints, runs new
steps, and commits each step's result before the workflow moves on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from tenantflow.backends import unavailable
from tenantflow.errors import (
    CircuitOpenError,
    NonDeterminismError,
    StepFailedError,
    StoreUnavailableError,
    WorkflowCancelled,
    WorkflowSuspended,
    WorkflowTimeoutError,
)
from tenantflow.sdk.context import StepContext, WorkflowContext, in_step, in_workflow
from tenantflow.serde import dumps, loads
from tenantflow.store.base import LeaseLost, RunStore
from tenantflow.store.records import (
    Lease,
    RunRecord,
    RunStatus,
    StepKind,
    StepRecord,
    StepStatus,
    Wait,
    WaitKind,
)

if TYPE_CHECKING:
    from tenantflow.sdk.app import Step, Workflow

from tenantflow.engine.outcomes import (
    ExecutionHost,
    Outcome,
    OutcomeKind,
    SagaCompensated,
    SagaNeedsAttention,
    StoreUnavailable,
    WorkflowReleased,
    error_info,
)
from tenantflow.engine.steps import (
    NotAdmitted,
    attempt,
    breaker_name,
    step_result,
)
from tenantflow.engine.waits import DurableWaits

log = structlog.get_logger(__name__)
T = TypeVar("T")

BREAKER_INLINE_WAIT = 2.0  # an open breaker's wait this short is spent holding the run
# While the database is away: how often a run tries again to renew its lease before a step, or
# to commit a step's checkpoint.
LEASE_RETRY_SECONDS = 0.5


class Execution(DurableWaits):
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
            return step_result(checkpoint, step)
        await self._persist_compensable()
        started = time.time()
        status, saved, error, attempts = await self._attempts(step, args, kwargs, seq)
        self.host.metrics.step_seconds.labels(step.name, status.value).observe(
            time.time() - started
        )
        record = StepRecord(
            run_id=self.run.id,
            seq=seq,
            name=step.name,
            kind=StepKind.STEP,
            status=status,
            output=saved,
            error=error,
            attempts=attempts,
            started_at=started,
            finished_at=time.time(),
        )
        # Committed before the next durable call runs, or with the run's end: workflow code in
        # between has no side effects, so nothing can act on an uncommitted result.
        self._pending = record
        self.checkpoints[seq] = record
        return step_result(record, step)

    async def _attempts(
        self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any], seq: int
    ) -> tuple[StepStatus, bytes | None, bytes | None, int]:
        """Attempts of a step until one succeeds or its retry policy gives up: the status,
        the result or the error, and the number of attempts."""
        run = self.run
        attempts = 0
        breaker = breaker_name(step, run.tenant_id)
        while True:
            await self._hold_lease()
            context = StepContext(
                tenant_id=run.tenant_id,
                run_id=run.id,
                step_name=step.name,
                seq=seq,
                attempt=attempts + 1,
            )
            try:
                with in_step(context):
                    value = await attempt(
                        step,
                        args,
                        kwargs,
                        self.host,
                        context,
                        workflow=run.workflow,
                        breaker=breaker,
                        compensating=self.compensating,
                    )
                output = dumps(value, what=f"the result of step {step.name!r}")
                return StepStatus.COMPLETED, output, None, attempts + 1
            except NotAdmitted as refused:
                # The dependency is known to be down: wait (durably, if long) instead of using
                # up this step's retries on calls bound to fail.
                await self._wait_for_breaker(refused.error)
            except Exception as exc:
                attempts += 1
                if not await self._retrying(step, exc, attempts):
                    return StepStatus.FAILED, None, error_info(exc), attempts

    async def _retrying(self, step: Step[Any, Any], exc: Exception, attempts: int) -> bool:
        """Whether the step's retry policy tries again after ``exc``; if so, after its delay."""
        if not step.options.retry.should_retry(exc, attempts):
            return False
        self.host.metrics.step_retries.labels(step.name).inc()
        delay = step.options.retry.delay(attempts)
        log.info(
            "step retry",
            tenant=self.run.tenant_id,
            run=self.run.id,
            step=step.name,
            attempt=attempts,
            error=type(exc).__name__,
            delay=round(delay, 3),
        )
        await asyncio.sleep(delay)
        return True

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
