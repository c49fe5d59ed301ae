"""What a running workflow and a running step can see of themselves."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from tenantflow.engine.executor import Execution
    from tenantflow.sdk.app import Step, Workflow

P = ParamSpec("P")
R = TypeVar("R")

_workflow: ContextVar[WorkflowContext | None] = ContextVar("tenantflow_workflow", default=None)
_step: ContextVar[StepContext | None] = ContextVar("tenantflow_step", default=None)


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """The step being executed. ``idempotency_key`` (``run_id:seq``) is the same on every
    attempt and every recovery of this step: pass it to external systems so that a step that
    runs twice (at least once) takes effect once."""

    tenant_id: str
    run_id: str
    step_name: str
    seq: int
    attempt: int

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.seq}"


class WorkflowContext:
    """Handed to a workflow function as its first argument.

    Workflow code must be deterministic: the same steps, sleeps, waits and children in the same
    order on every replay (see ``docs/determinism.md``). Do side effects in steps.
    """

    def __init__(self, execution: Execution) -> None:
        self._execution = execution
        self.tenant_id: str = execution.run.tenant_id
        self.run_id: str = execution.run.id
        self.workflow_name: str = execution.run.workflow

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the wake-up time is checkpointed and the worker is released; the run
        resumes after ``seconds`` even if every worker restarts meanwhile."""
        await self._execution.sleep(seconds)

    async def wait_for_event(self, name: str, *, timeout: float | None = None) -> Any:
        """Wait durably for an event sent to this run (``handle.send_event(name, payload)``).

        Events are consumed in the order they were sent, one per wait. Returns the payload, or
        ``None`` when ``timeout`` seconds pass first.
        """
        return await self._execution.wait_for_event(name, timeout)

    async def run_child(self, workflow: Workflow[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Start a child workflow in this tenant and wait durably for its result.

        The child's id is derived from this run and the call's position (``{run_id}.{seq}``),
        so a replay finds the same child instead of starting another. A child that fails
        raises :class:`ChildWorkflowError`; cancelling this run cancels the child.
        """
        result: R = await self._execution.run_child(workflow, args, kwargs)
        return result

    async def _run_step(
        self, step: Step[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        result: R = await self._execution.run_step(step, args, kwargs)
        return result


def current_workflow() -> WorkflowContext | None:
    return _workflow.get()


def current_step() -> StepContext:
    """The step being executed (raises ``LookupError`` outside a step)."""
    ctx = _step.get()
    if ctx is None:
        raise LookupError("current_step() is only available inside a step called by a workflow")
    return ctx
