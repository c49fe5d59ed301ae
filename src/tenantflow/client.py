"""Starting workflows and following runs: the client side of tenantflow."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from tenantflow.engine.steps import encode_input
from tenantflow.errors import (
    InvalidCursorError,
    Issue,
    NotEntitledError,
    ResultTimeoutError,
    RunCancelledError,
    RunFailedError,
    RunNotFoundError,
    TenantSuspendedError,
)
from tenantflow.platform.registry import TenantStatus, check_tenant_id
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App, Workflow
from tenantflow.serde import dumps, loads
from tenantflow.settings import Settings
from tenantflow.store.base import RunStore
from tenantflow.store.records import NewRun, RunRecord, RunStatus, StepRecord
from tenantflow.telemetry.tracing import set_attributes
from tenantflow.tenant.marks import MARK_SLOW_SUBMIT_SECONDS

P = ParamSpec("P")
R = TypeVar("R")


# A run id as new_run_id makes it, or a child's: its parent's id and the call's position.
RUN_ID = re.compile(r"[0-9a-f]{32}(\.[0-9]+)*")
CURSOR_EXPECTED = "not a cursor this API gave out: pass the next_cursor of a previous page"

_last_id_time = [0, 0]  # (milliseconds, counter) of the last id made by this process


def new_run_id() -> str:
    """A time-ordered id, like UUIDv7 (RFC 9562, with a counter): 48 bits of milliseconds, a
    16-bit counter within the millisecond, 64 random bits. Ids made by one process sort in
    the order they were made, which the cursor pagination relies on."""
    millis = time.time_ns() // 1_000_000
    last_millis, counter = _last_id_time
    if millis <= last_millis:
        millis, counter = last_millis, counter + 1
        if counter > 0xFFFF:  # 65,536 ids in one millisecond: borrow the next millisecond
            millis, counter = millis + 1, 0
    else:
        counter = 0
    _last_id_time[:] = [millis, counter]
    return f"{millis:012x}{counter:04x}{uuid.uuid4().hex[:16]}"


def check_cursor(cursor: str | None, loc: str = "before") -> None:
    """A cursor of the run list is the id of the last run of a page (``next_cursor``): any
    other value raises ``InvalidCursorError`` rather than answer a first page."""
    if cursor is not None and not RUN_ID.fullmatch(cursor):
        raise InvalidCursorError(issues=[Issue(loc, CURSOR_EXPECTED)])


class Client:
    """Entry point for starting and following runs. Scope it to one tenant with ``tenant()``;
    no method takes two tenants."""

    def __init__(
        self, app: App, settings: Settings | None = None, *, runtime: Runtime | None = None
    ) -> None:
        self.app = app
        self._own_runtime = runtime is None
        self.runtime = runtime or Runtime(settings)

    def tenant(self, tenant_id: str) -> TenantClient:
        """This client scoped to ``tenant_id``: every run it starts or reads is that tenant's
        (``InvalidTenantIdError`` for an id that cannot name a tenant)."""
        return TenantClient(self, check_tenant_id(tenant_id))

    async def close(self) -> None:
        """Close the runtime this client opened (one it was given stays open)."""
        if self._own_runtime:
            await self.runtime.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class TenantClient:
    """A client scoped to one tenant (``Client.tenant``): starts its runs, finds and lists
    them."""

    def __init__(self, client: Client, tenant_id: str) -> None:
        self.client = client
        self.tenant_id = tenant_id

    @property
    def store(self) -> RunStore:
        """The tenant's run store, through the router."""
        return self.client.runtime.router.store(self.tenant_id)

    async def start(
        self, workflow: Workflow[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> RunHandle[R]:
        """Submit a run and return at once. With ``workflow.options(idempotency_key=...)``, a
        second start with the same key returns the first run (and a different input is an
        ``IdempotencyConflictError``)."""
        runtime = self.client.runtime
        if (await runtime.router.tenant_async(self.tenant_id)).status is not TenantStatus.ACTIVE:
            raise TenantSuspendedError(f"tenant {self.tenant_id!r} is suspended")
        quota = None
        license = await runtime.license(self.tenant_id)
        if license is not None:
            if not license.entitles(workflow.name):
                raise NotEntitledError(f"the tenant's plan does not include {workflow.name!r}")
            quota = license.quotas.runs_per_month
        payload = encode_input(workflow, args, kwargs)
        options = workflow.start_options
        # Before the run exists: sweeps must know the tenant has work (see ``note_work``).
        await runtime.marks.note(self.tenant_id)
        marked = time.monotonic()
        tracing = runtime.tracing
        with tracing.span(
            f"submit {workflow.name}",
            kind="producer",
            attributes={"tenantflow.tenant": self.tenant_id, "tenantflow.workflow": workflow.name},
        ) as span:
            new = NewRun(
                id=new_run_id(),
                workflow=workflow.name,
                input=payload,
                idempotency_key=options.idempotency_key,
                priority=options.priority,
                timeout=workflow.workflow_options.timeout,
                max_recoveries=workflow.workflow_options.max_recovery_attempts,
                trace=tracing.traceparent(),  # the run's deliveries join this span's trace
            )
            run, created, outbox = await self.store.create_run(
                new, now=time.time(), monthly_quota=quota
            )
            set_attributes(span, {"tenantflow.run": run.id, "tenantflow.created": created})
        if created:
            runtime.metrics.submitted(workflow.name, self.tenant_id)
            if time.monotonic() - marked > MARK_SLOW_SUBMIT_SECONDS:
                # The mark relied on may have been dropped by a sweep meanwhile.
                await runtime.marks.note(self.tenant_id, again=True)
        runtime.outbox.publish_soon(self.tenant_id, outbox)  # committed: the message may follow
        return RunHandle(self, run.id, workflow)

    def handle(self, run_id: str) -> RunHandle[Any]:
        """A handle to the run ``run_id`` of this tenant (not checked until it is used: a run
        of another tenant is as missing as one that does not exist)."""
        return RunHandle(self, run_id, None)

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        """Newest first; ``before`` is the id of the last run of the previous page."""
        check_cursor(before)
        return await self.store.list_runs(
            status=status, workflow=workflow, limit=limit, before=before
        )


class RunHandle(Generic[R]):
    """A run of one tenant: its status, its result, and control over it."""

    def __init__(
        self, tenant: TenantClient, run_id: str, workflow: Workflow[Any, R] | None
    ) -> None:
        self._tenant = tenant
        self.run_id = run_id
        self.tenant_id = tenant.tenant_id
        self._workflow = workflow

    async def describe(self) -> RunRecord:
        """The run as stored now (``RunNotFoundError`` if this tenant has no such run)."""
        run = await self._tenant.store.get_run(self.run_id)
        if run is None:
            raise RunNotFoundError(f"no run {self.run_id} in this tenant")
        return run

    async def status(self) -> RunStatus:
        """The run's status now."""
        return (await self.describe()).status

    async def steps(self) -> list[StepRecord]:
        """The run's checkpoints, in the order the workflow made them."""
        return await self._tenant.store.get_steps(self.run_id)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the run to end; return its result or raise ``RunFailedError``
        (``RunCancelledError`` if it was cancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            run = await self.describe()
            if run.status.terminal:
                return self._outcome(run)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeoutError(
                    f"run {self.run_id} is still {run.status.value} after {timeout} s"
                )
            pause = delay if deadline is None else min(delay, deadline - time.monotonic())
            await asyncio.sleep(max(pause, 0.0))
            delay = min(delay * 1.5, 0.25)

    def _outcome(self, run: RunRecord) -> R:
        if run.status is RunStatus.COMPLETED:
            value = loads(run.result)
            if self._workflow is not None:
                value = self._workflow.codec.decode_return(value)
            result: R = value
            return result
        info = run.error_info or {}
        message = f"run {run.id} {run.status.value}: {info.get('type')}: {info.get('message')}"
        if run.status is RunStatus.CANCELLED:
            raise RunCancelledError(message, status=run.status.value, error_type=info.get("type"))
        raise RunFailedError(message, status=run.status.value, error_type=info.get("type"))

    async def cancel(self) -> RunStatus:
        """Request cancellation; returns the run's status after the request. A run that no
        worker holds is cancelled at once; a running one stops at its next step boundary (a
        running async step is interrupted). A saga is woken to run its compensations first,
        and ends ``compensated``.

        As in Temporal, a cancellation already requested is not requested again: cancelling a
        run that is being cancelled (``cancel_requested``, not yet ended) changes nothing and
        returns its status. A run that has ended (``completed``, ``failed``, ``cancelled``,
        ``compensated``, ``needs_attention``) raises ``RunFinishedError`` (HTTP 409), as
        sending it an event does: the caller learns that the cancel took no effect, say
        because the run completed first. (Temporal's server answers that case with a silent
        success; a cancel that raced a completion would then go unnoticed.) So a retried
        cancel of a run that no worker held, which the first request ended at once, gets the
        409 with the status ``cancelled``."""
        run, finished = await self._tenant.store.request_cancel(self.run_id, now=time.time())
        await self._tenant.client.runtime.outbox.publish(self.tenant_id, finished.wake)
        return run.status

    async def send_event(self, name: str, payload: Any = None) -> None:
        """Deliver an event to the run's ``ctx.wait_for_event(name)``."""
        data = dumps(payload, what=f"the payload of event {name!r}")
        finished = await self._tenant.store.send_event(self.run_id, name, data, now=time.time())
        await self._tenant.client.runtime.outbox.publish(self.tenant_id, finished.wake)
