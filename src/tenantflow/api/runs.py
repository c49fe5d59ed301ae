"""The tenant plane over HTTP: runs, workflows, dead letters, the tenant's audit log.

Every route acts on the caller's tenant, taken from the verified token. A run of another
tenant is simply not in this tenant's database: it answers 404, as a missing one does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import WithJsonSchema

from tenantflow.api import problems
from tenantflow.api.deps import (
    AppDep,
    AuditCursor,
    Operator,
    RuntimeDep,
    TenantAdmin,
    Viewer,
    known_query,
    tenant_client,
)
from tenantflow.api.models import (
    PLAIN,
    AuditPage,
    BreakerOut,
    DeadLetterOut,
    RunOut,
    RunPage,
    StartRun,
    WorkflowOut,
)
from tenantflow.api.openapi import JSON_VALUE_REF
from tenantflow.api.routing import StrictJsonRoute
from tenantflow.api.schemas import self_contained
from tenantflow.client import RUN_ID, check_cursor
from tenantflow.errors import (
    NotFoundError,
    RateLimitedError,
    RunNotFoundError,
    WorkflowNotRegisteredError,
)
from tenantflow.platform.access import Principal
from tenantflow.runtime import Runtime
from tenantflow.store.records import RunStatus

RunId = Annotated[str, PathParam(max_length=255, pattern=PLAIN)]

STREAM_POLL_SECONDS = 0.2
STREAM_HEARTBEAT_SECONDS = 15.0
RATE_BURST_SECONDS = 1.0  # a burst may use up to a second's worth of requests at once


async def rate_limit(request: Request, principal: Viewer, runtime: RuntimeDep) -> None:
    """Every tenant-plane request counts against the tenant's rate (its plan's, else the
    installation's default)."""
    assert principal.tenant_id is not None
    rate = runtime.settings.rate_limit_per_second
    license = await runtime.license(principal.tenant_id)
    if license is not None and license.quotas.requests_per_second is not None:
        rate = license.quotas.requests_per_second
    if rate is None:
        return
    limiter = request.app.state.limiter
    wait = await limiter.check(principal.tenant_id, rate, max(1, round(rate * RATE_BURST_SECONDS)))
    if wait is not None:
        raise RateLimitedError(retry_after=wait)


router = APIRouter(
    prefix="/v1",
    tags=["tenant plane"],
    route_class=StrictJsonRoute,
    dependencies=[Depends(rate_limit), Depends(known_query)],
    # known_query refuses a query parameter the route does not take: a 422 on any route; every
    # route reads the tenant's database: a 503 while it is out of reach.
    responses=problems.responses(401, 403, 422, 429, 503),
)


@router.post(
    "/runs",
    status_code=202,
    response_model=RunOut,
    responses=problems.responses(400, 404, 409, 413),
)
async def start_run(
    body: StartRun,
    response: Response,
    principal: Operator,
    runtime: RuntimeDep,
    app: AppDep,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=255, pattern=PLAIN)
    ] = None,
) -> RunOut:
    """Submit a run; 202 Accepted with its ``Location``. The same ``Idempotency-Key`` again
    returns the first run; with another input it is a 409."""
    try:
        workflow = app.get_workflow(body.workflow)
    except WorkflowNotRegisteredError:
        raise NotFoundError(f"no workflow {body.workflow!r}") from None
    # Checked now, so bad input is a 422 and never a run that fails later.
    workflow.codec.check_input(body.args, body.kwargs)
    client = tenant_client(principal, runtime, app)
    bound = workflow.options(idempotency_key=idempotency_key, priority=body.priority)
    handle = await client.start(bound, *body.args, **body.kwargs)
    response.headers["Location"] = f"/v1/runs/{handle.run_id}"
    return RunOut.of(await handle.describe())


@router.get("/runs/{run_id}", response_model=RunOut, responses=problems.responses(404))
async def get_run(run_id: RunId, principal: Viewer, runtime: RuntimeDep, app: AppDep) -> RunOut:
    handle = tenant_client(principal, runtime, app).handle(run_id)
    run = await handle.describe()
    return RunOut.of(run, await handle.steps())


@router.get("/runs", response_model=RunPage)
async def list_runs(
    principal: Viewer,
    runtime: RuntimeDep,
    app: AppDep,
    status: RunStatus | None = None,
    workflow: Annotated[str | None, Query(max_length=255, pattern=PLAIN)] = None,
    # The pattern is published, and checked by check_cursor for its clearer message.
    cursor: Annotated[
        str | None, Query(max_length=255, json_schema_extra={"pattern": f"^{RUN_ID.pattern}$"})
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> RunPage:
    """Newest first. ``next_cursor`` is the cursor of the next page, None on the last; a
    cursor this API did not give out is a 422."""
    check_cursor(cursor, "query.cursor")
    client = tenant_client(principal, runtime, app)
    runs = await client.list_runs(status=status, workflow=workflow, limit=limit + 1, before=cursor)
    page = runs[:limit]
    return RunPage(
        runs=[RunOut.of(r) for r in page],
        next_cursor=page[-1].id if len(runs) > limit else None,
    )


@router.post(
    "/runs/{run_id}/cancel",
    status_code=202,
    response_model=RunOut,
    responses=problems.responses(404, 409, 413),
)
async def cancel_run(
    run_id: RunId, principal: Operator, runtime: RuntimeDep, app: AppDep
) -> RunOut:
    """Request cancellation (see ``RunHandle.cancel``): asked again while the run is being
    cancelled, nothing changes; a run that has ended answers 409 ``run-finished``."""
    handle = tenant_client(principal, runtime, app).handle(run_id)
    await handle.cancel()
    await _audit(runtime, principal, "run.cancelled", run_id)
    return RunOut.of(await handle.describe())


@router.post(
    "/runs/{run_id}/events/{name}",
    status_code=202,
    responses=problems.responses(400, 404, 409, 413),
)
async def send_event(
    run_id: RunId,
    name: Annotated[str, PathParam(max_length=255, pattern=PLAIN)],
    principal: Operator,
    runtime: RuntimeDep,
    app: AppDep,
    payload: Annotated[Any, Body(), WithJsonSchema({"$ref": JSON_VALUE_REF})] = None,
) -> dict[str, str]:
    """Deliver an event (the JSON body) to the run's ``ctx.wait_for_event(name)``."""
    await tenant_client(principal, runtime, app).handle(run_id).send_event(name, payload)
    return {"run_id": run_id, "event": name}


class EventStream(StreamingResponse):
    """Server-sent events; as the route's ``response_class``, the document names the type."""

    media_type = "text/event-stream"


@router.get(
    "/runs/{run_id}/stream",
    response_class=EventStream,
    responses=problems.responses(404),
)
async def stream_run(
    run_id: RunId, request: Request, principal: Viewer, runtime: RuntimeDep, app: AppDep
) -> EventStream:
    """Server-sent events as the run changes: ``run`` (its state) and ``step`` (each new
    checkpoint), until it ends."""
    handle = tenant_client(principal, runtime, app).handle(run_id)
    first = await handle.describe()  # 404 before the stream starts

    async def events() -> AsyncIterator[bytes]:
        seen_steps: set[tuple[int, str]] = set()
        last: tuple[str, float] | None = None
        beat = time.monotonic()
        run = first
        while True:
            for step in await handle.steps():
                key = (step.seq, step.status.value)
                if key not in seen_steps:
                    seen_steps.add(key)
                    yield _sse("step", _dump(RunOut.of(run, [step]).steps or []))
            state = (run.status.value, run.updated_at)
            if state != last:
                last = state
                yield _sse("run", _dump(RunOut.of(run)))
                beat = time.monotonic()
            if run.status.terminal:
                return
            if time.monotonic() - beat > STREAM_HEARTBEAT_SECONDS:
                yield b": keep-alive\n\n"
                beat = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(STREAM_POLL_SECONDS)
            try:
                run = await handle.describe()
            except RunNotFoundError:
                return

    return EventStream(events(), headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _dump(value: Any) -> bytes:
    if isinstance(value, list):
        return orjson.dumps([v.model_dump(mode="json") for v in value])
    return orjson.dumps(value.model_dump(mode="json"))


def _sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


@router.get("/workflows", response_model=list[WorkflowOut])
async def list_workflows(principal: Viewer, app: AppDep) -> list[WorkflowOut]:
    """The registered workflows, with the JSON Schemas of their input and result."""
    out = []
    for w in sorted(app.workflows.values(), key=lambda w: w.name):
        described = self_contained(w)
        out.append(
            WorkflowOut(
                name=w.name,
                parameters=list(w.codec.param_names),
                input_schema=described.input,
                output_schema=described.output,
            )
        )
    return out


@router.get("/breakers", response_model=list[BreakerOut])
async def list_breakers(principal: Viewer, runtime: RuntimeDep, app: AppDep) -> list[BreakerOut]:
    """The circuit breakers this tenant's workflows go through: the shared ones, and the
    tenant's own (``name@tenant``), with their state and window."""
    names = set()
    for step in app.steps.values():
        if step.options.breaker is not None:
            own = step.options.breaker_per_tenant
            names.add(
                f"{step.options.breaker}@{principal.tenant_id}" if own else step.options.breaker
            )
    out = []
    for name in sorted(names):
        s = await runtime.breakers.status(name)
        out.append(
            BreakerOut(
                name=s.name,
                state=s.state.value,
                calls=s.calls,
                failure_rate=s.failure_rate,
                slow_call_rate=s.slow_call_rate,
                retry_after=round(s.retry_after, 3),
            )
        )
    return out


@router.get("/dead-letters", response_model=list[DeadLetterOut])
async def list_dead_letters(
    principal: Viewer,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeadLetterOut]:
    assert principal.tenant_id is not None
    letters = await runtime.queue.dead_letters(principal.tenant_id, limit=limit)
    return [DeadLetterOut.of(d) for d in letters]


@router.post(
    "/dead-letters/{dead_letter_id}/replay",
    status_code=202,
    responses=problems.responses(404, 413),
)
async def replay_dead_letter(
    dead_letter_id: Annotated[str, PathParam(max_length=64, pattern=PLAIN)],
    principal: Operator,
    runtime: RuntimeDep,
) -> dict[str, str]:
    assert principal.tenant_id is not None
    await runtime.queue.replay_dead_letter(principal.tenant_id, dead_letter_id)
    await _audit(runtime, principal, "dead_letter.replayed", dead_letter_id)
    return {"replayed": dead_letter_id}


@router.get("/audit", response_model=AuditPage)
async def tenant_audit(
    principal: TenantAdmin,
    runtime: RuntimeDep,
    action: Annotated[str | None, Query(max_length=64, pattern=PLAIN)] = None,
    cursor: AuditCursor = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditPage:
    entries = await asyncio.to_thread(
        runtime.platform.audit.query,
        tenant_id=principal.tenant_id,
        action=action,
        after=cursor,
        limit=limit,
    )
    return AuditPage.of(entries, limit)


async def _audit(runtime: Runtime, principal: Principal, action: str, target: str) -> None:
    await asyncio.to_thread(
        runtime.platform.audit.record,
        action,
        actor=principal.subject,
        tenant_id=principal.tenant_id,
        target=target,
    )
