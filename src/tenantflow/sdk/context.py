"""What a running workflow and a running step can see of themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from tenantflow.errors import ConfigError

if TYPE_CHECKING:
    from tenantflow.sdk.app import Step, Workflow
    from tenantflow.store.records import RunRecord

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_workflow: ContextVar[WorkflowContext | None] = ContextVar("tenantflow_workflow", default=None)
_step: ContextVar[StepContext | None] = ContextVar("tenantflow_step", default=None)


class Execution(Protocol):
    """What a workflow's context asks of the engine executing the run (the engine's
    ``Execution`` is one): the SDK states the contract, the engine fulfils it."""

    run: RunRecord

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for_event(self, name: str, timeout: float | None, type: Any) -> Any: ...

    async def run_child(
        self, workflow: Workflow[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...

    async def run_step(
        self, step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...

    def note_compensable(self) -> None: ...

    async def compensate(
        self,
        compensations: list[tuple[Step[Any, Any], tuple[Any, ...], dict[str, Any]]],
        cause: BaseException,
        *,
        pivoted: bool,
    ) -> None: ...


@contextmanager
def in_workflow(ctx: WorkflowContext) -> Iterator[None]:
    """The engine's way in: inside the block, ``current_workflow()`` answers ``ctx``."""
    token = _workflow.set(ctx)
    try:
        yield
    finally:
        _workflow.reset(token)


@contextmanager
def in_step(ctx: StepContext) -> Iterator[None]:
    """Inside the block (an attempt of a step), ``current_step()`` answers ``ctx``."""
    token = _step.set(ctx)
    try:
        yield
    finally:
        _step.reset(token)


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

    @overload
    async def wait_for_event(self, name: str, *, timeout: float | None = None) -> Any: ...

    @overload
    async def wait_for_event(self, name: str, *, type: type[T], timeout: None = None) -> T: ...

    @overload
    async def wait_for_event(
        self, name: str, *, type: type[T], timeout: float | None
    ) -> T | None: ...

    async def wait_for_event(
        self, name: str, *, type: type[Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Wait durably for an event sent to this run (``handle.send_event(name, payload)``).

        Events are consumed in the order they were sent, one per wait. Returns the payload, or
        ``None`` when ``timeout`` seconds pass first.

        With ``type`` (a class: ``bool``, a Pydantic model, a dataclass...), the payload is
        validated into it, as a step's arguments are decoded from their annotations, and the
        type checker knows the result: ``type=bool`` gives a ``bool``, or ``bool | None`` with
        a ``timeout``. A payload that does not fit raises :class:`EventPayloadError` here (the
        workflow may catch it; the event is consumed either way). Without ``type`` the payload
        is the plain JSON value (``Any``). (Temporal's Python SDK decodes by the annotations of
        a signal handler; DBOS's ``recv`` returns ``Any``.)
        """
        return await self._execution.wait_for_event(name, timeout, type)

    async def run_child(self, workflow: Workflow[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Start a child workflow in this tenant and wait durably for its result.

        The child's id is derived from this run and the call's position (``{run_id}.{seq}``),
        so a replay finds the same child instead of starting another. A child that fails
        raises :class:`ChildWorkflowError`; cancelling this run cancels the child.
        """
        result: R = await self._execution.run_child(workflow, args, kwargs)
        return result

    def saga(self) -> Saga:
        """A saga: ``async with ctx.saga() as saga:``. Register each step's compensation
        *before* the step (``saga.compensate(refund, order)``), so that a step whose outcome
        is unknown (it timed out, the worker died) is compensated too; compensations must
        treat "nothing to undo" as success. If the block fails or the run is cancelled, the
        compensations registered so far run in reverse order, each a durable, retried step,
        and the run ends ``compensated`` (or ``needs_attention`` if one fails after its
        retries). ``await saga.pivot(step, ...)`` runs the point of no return: past it,
        nothing is compensated and a failure ends the run ``needs_attention``."""
        return Saga(self._execution)

    async def _run_step(
        self, step: Step[Any, R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> R:
        result: R = await self._execution.run_step(step, args, kwargs)
        return result


class Saga:
    """See :meth:`WorkflowContext.saga`."""

    def __init__(self, execution: Execution) -> None:
        self._execution = execution
        self._compensations: list[tuple[Step[Any, Any], tuple[Any, ...], dict[str, Any]]] = []
        self._pivoted = False

    def compensate(self, step: Step[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        """Register ``step(*args, **kwargs)`` as the undoing of what comes next."""
        if self._pivoted:
            raise ConfigError("a saga registers no compensation past its pivot")
        self._compensations.append((step, args, kwargs))
        self._execution.note_compensable()

    async def pivot(self, step: Step[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the saga's pivot: if it fails, what came before is compensated; once it has
        succeeded, the saga only goes forward."""
        result: R = await self._execution.run_step(step, args, kwargs)
        self._pivoted = True
        return result

    async def __aenter__(self) -> Saga:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            await self._execution.compensate(self._compensations, exc, pivoted=self._pivoted)


def current_workflow() -> WorkflowContext | None:
    return _workflow.get()


def current_step() -> StepContext:
    """The step being executed (raises ``LookupError`` outside a step)."""
    ctx = _step.get()
    if ctx is None:
        raise LookupError("current_step() is only available inside a step called by a workflow")
    return ctx
