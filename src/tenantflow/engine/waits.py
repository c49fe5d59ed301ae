"""The durable waits of a workflow: sleeps, events and child runs. Each is a checkpoint at
its position; while it is not met, the run is suspended and the worker released."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tenantflow.engine.outcomes import ExecutionHost
from tenantflow.engine.steps import encode_input, event_payload
from tenantflow.errors import ChildWorkflowError, WorkflowCancelled, WorkflowSuspended
from tenantflow.serde import dumps, loads
from tenantflow.store.base import RunStore
from tenantflow.store.records import (
    TERMINAL,
    Lease,
    NewRun,
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
    from tenantflow.sdk.app import Workflow

T = TypeVar("T")

# A sleep this close to its end is finished in place rather than by releasing the worker.
INLINE_SLEEP = 0.05


class Run(Protocol):
    """What the waits use of the execution they are part of (``Execution``)."""

    run: RunRecord
    store: RunStore
    lease: Lease
    host: ExecutionHost
    cancel_requested: bool

    async def _flush(self) -> None: ...

    async def _persist_compensable(self) -> None: ...

    def _next(self, name: str, kind: StepKind) -> tuple[int, StepRecord | None]: ...

    async def _io(self, call: Awaitable[T]) -> T: ...

    async def _record(self, step: StepRecord) -> None: ...

    async def _suspend(self, wait: Wait) -> None: ...


class DurableWaits:
    """Mixed into ``Execution``."""

    async def _suspend(self: Run, wait: Wait) -> None:
        """Release the worker until ``wait`` is met; returns if it already is."""
        outcome = await self._io(
            self.store.suspend_run(self.run.id, wait, lease=self.lease, now=time.time())
        )
        if outcome is SuspendOutcome.SUSPENDED:
            raise WorkflowSuspended(wait.wake_at)
        if outcome is SuspendOutcome.CANCEL:
            self.cancel_requested = True
            raise WorkflowCancelled()

    async def sleep(self: Run, seconds: float) -> None:
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
        self: Run, name: str, timeout: float | None, as_type: type[Any] | None = None
    ) -> Any:
        await self._flush()
        await self._persist_compensable()
        seq, checkpoint = self._next(name, StepKind.EVENT)
        if checkpoint is not None and checkpoint.status is StepStatus.COMPLETED:
            return event_payload(name, checkpoint.output, as_type)
        deadline = time.time() + timeout if timeout is not None else None
        while True:
            got = await self._io(
                self.store.wait_event(
                    self.run.id, seq, name, deadline, lease=self.lease, now=time.time()
                )
            )
            if got.received:
                return event_payload(name, got.payload, as_type)
            if got.timed_out:
                return None
            await self._suspend(Wait(kind=WaitKind.EVENT, wake_at=got.deadline, event_name=name))

    async def run_child(
        self: Run, workflow: Workflow[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        await self._flush()
        await self._persist_compensable()
        seq, checkpoint = self._next(workflow.name, StepKind.CHILD)
        child_id = f"{self.run.id}.{seq}"
        if checkpoint is not None and checkpoint.status is not StepStatus.PENDING:
            return child_result(
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
                return child_result(workflow, child_id, done, state.result, state.error)
            await self.host.publish(self.run.tenant_id, state.wake)
            await self._suspend(Wait(kind=WaitKind.CHILD, wake_at=None, child_id=child_id))


def child_result(
    workflow: Workflow[Any, Any],
    child_id: str,
    status: StepStatus,
    output: bytes | None,
    error: bytes | None,
) -> Any:
    if status is StepStatus.COMPLETED:
        return workflow.codec.decode_return(loads(output))
    info: dict[str, Any] | None = loads(error)
    child_status = "cancelled" if info and info.get("type") == "RunCancelledError" else ("failed")
    raise ChildWorkflowError(child_id, child_status, info)
