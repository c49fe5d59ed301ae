"""A step's attempt, composed of the pieces it goes through, outermost first: the circuit
breaker (``Breakers.call``), a trace span, the bulkhead (``Bulkheads.call``, waiting for a
slot), the timeout; and the encodings of a step's inputs and results."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from tenantflow.engine.outcomes import ExecutionHost
from tenantflow.errors import (
    CircuitOpenError,
    EventPayloadError,
    StepFailedError,
    StepTimeoutError,
    summarize,
)
from tenantflow.sdk.context import StepContext
from tenantflow.serde import adapter_for, dumps, issues_of, loads
from tenantflow.store.records import StepRecord, StepStatus

if TYPE_CHECKING:
    from tenantflow.sdk.app import Step, Workflow


class NotAdmitted(Exception):
    """The step's breaker refused the attempt before it began (not a failure of the step, so
    no retry is spent on it); ``error`` says how long it stays open."""

    def __init__(self, error: CircuitOpenError) -> None:
        super().__init__(str(error))
        self.error = error


async def attempt(
    step: Step[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    host: ExecutionHost,
    context: StepContext,
    *,
    workflow: str,
    breaker: str | None,
    compensating: bool,
) -> Any:
    """One attempt of ``step``; ``NotAdmitted`` if its breaker is open."""
    began = False

    async def traced() -> Any:
        nonlocal began
        began = True
        attributes: dict[str, str | int | float | bool] = {
            "tenantflow.tenant": context.tenant_id,
            "tenantflow.run": context.run_id,
            "tenantflow.workflow": workflow,
            "tenantflow.step": step.name,
            "tenantflow.seq": context.seq,
            "tenantflow.attempt": context.attempt,
            "tenantflow.compensation": compensating,
        }
        kind = "compensate" if compensating else "step"
        with host.tracing.span(f"{kind} {step.name}", attributes=attributes):
            name = step.options.bulkhead
            if name is None:
                return await timed(step, args, kwargs)
            # No bound on the wait: the calls holding the slots end soon.
            return await host.bulkheads.call(name, lambda: timed(step, args, kwargs), wait=math.inf)

    if breaker is None:
        return await traced()
    try:
        return await host.breakers.call(breaker, traced)
    except CircuitOpenError as refused:
        if began:  # raised by the step itself: its failure
            raise
        raise NotAdmitted(refused) from None


async def timed(step: Step[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The step's function, within its timeout (``StepTimeoutError`` past it)."""
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


def breaker_name(step: Step[Any, Any], tenant_id: str) -> str | None:
    name = step.options.breaker
    if name is None:
        return None
    return f"{name}@{tenant_id}" if step.options.breaker_per_tenant else name


def step_result(record: StepRecord, step: Step[Any, Any]) -> Any:
    """What a checkpointed step returns to the workflow (or raises, if it failed)."""
    if record.status is StepStatus.COMPLETED:
        return step.codec.decode_return(loads(record.output))
    info = record.error_info or {}
    raise StepFailedError(
        step.name, str(info.get("type")), str(info.get("message")), record.attempts
    )


def encode_input(
    workflow: Workflow[Any, Any], args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
) -> bytes:
    """Check the arguments against the workflow's signature and encode them as JSON."""
    workflow.codec.signature.bind(None, *args, **kwargs)  # TypeError on a wrong call
    return dumps(
        {"args": list(args), "kwargs": kwargs}, what=f"the input of workflow {workflow.name!r}"
    )


def event_payload(name: str, payload: bytes | None, as_type: type[Any] | None) -> Any:
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
