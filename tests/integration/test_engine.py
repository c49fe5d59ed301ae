"""The durable engine, in-process, on the embedded backends."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from pydantic import BaseModel

from tenantflow import (
    App,
    ChildWorkflowError,
    Client,
    EventPayloadError,
    InvalidCursorError,
    RetryPolicy,
    RunCancelledError,
    RunFailedError,
    RunFinishedError,
    RunStatus,
    Runtime,
    SerializationError,
    StepFailedError,
    TenantSuspendedError,
    WorkflowContext,
    current_step,
)
from tenantflow.platform.registry import TenantStatus
from tests.conftest import running_worker

app = App("engine-tests")
calls: dict[str, int] = {}
seen_keys: list[str] = []


def bump(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    seen_keys.clear()
    FLAGS.clear()


class Item(BaseModel):
    sku: str
    qty: int


@dataclasses.dataclass
class Box:
    items: list[Item]
    label: str


@app.step
async def pack(item: Item) -> Box:
    bump("pack")
    seen_keys.append(current_step().idempotency_key)
    return Box(items=[item], label=f"box-{item.sku}")


@app.step
def weigh(box: Box) -> float:  # a plain function: runs in a thread
    bump("weigh")
    seen_keys.append(current_step().idempotency_key)
    return 1.5 * sum(i.qty for i in box.items)


@app.workflow
async def ship(ctx: WorkflowContext, item: Item) -> Box:
    box = await pack(item)
    assert isinstance(box, Box) and isinstance(box.items[0], Item)
    weight = await weigh(box)
    return Box(items=box.items, label=f"{box.label}:{weight}")


FLAKY_FAILURES = 2


class Transient(Exception):
    pass


class Fatal(Exception):
    pass


@app.step(
    retry=RetryPolicy(
        max_attempts=5, initial_interval=0.01, max_interval=0.02, non_retryable=(Fatal,)
    )
)
async def flaky(kind: str) -> str:
    bump(f"flaky-{kind}")
    if kind == "fatal":
        raise Fatal("no point retrying")
    if calls[f"flaky-{kind}"] <= FLAKY_FAILURES:
        raise Transient("try again")
    return "ok"


@app.step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01), timeout=0.1)
async def hangs() -> None:
    bump("hangs")
    await asyncio.sleep(10)


@app.workflow
async def retrying(ctx: WorkflowContext, kind: str) -> str:
    return await flaky(kind)


@app.workflow
async def handles_failure(ctx: WorkflowContext) -> str:
    try:
        await flaky("fatal")
    except StepFailedError as exc:
        return f"handled {exc.error_type} after {exc.attempts}"
    return "unreachable"


@app.workflow
async def timing_out(ctx: WorkflowContext) -> None:
    await hangs()


@app.workflow
async def napper(ctx: WorkflowContext, seconds: float) -> float:
    before = await clock()
    await ctx.sleep(seconds)
    return (await clock()) - before


@app.step
async def clock() -> float:
    bump("clock")
    return time.time()


@app.workflow
async def approval(ctx: WorkflowContext, timeout: float | None) -> Any:
    first = await ctx.wait_for_event("approve", timeout=timeout)
    second = await ctx.wait_for_event("approve", timeout=timeout)
    return [first, second]


class Decision(BaseModel):
    approved: bool
    by: str


@app.workflow
async def typed_approval(ctx: WorkflowContext, timeout: float | None) -> list[Any]:
    flag = await ctx.wait_for_event("flag", type=bool, timeout=timeout)
    try:
        decision = await ctx.wait_for_event("decision", type=Decision)
    except EventPayloadError as exc:  # the workflow may handle a payload that does not fit
        return [flag, str(exc)]
    return [flag, type(decision).__name__, decision.approved, decision.by]


@app.workflow
async def kid(ctx: WorkflowContext, n: int) -> int:
    if n < 0:
        raise ValueError("negative")
    return await double(n)


@app.step
async def double(n: int) -> int:
    bump("double")
    return n * 2


@app.workflow
async def parent(ctx: WorkflowContext, n: int) -> list[int]:
    a = await ctx.run_child(kid, n)
    b = await ctx.run_child(kid, n + 1)
    return [a, b]


@app.workflow
async def parent_of_failure(ctx: WorkflowContext) -> str:
    try:
        await ctx.run_child(kid, -1)
    except ChildWorkflowError as exc:
        return exc.status
    return "unreachable"


@app.workflow
async def parent_waits_forever(ctx: WorkflowContext) -> None:
    await ctx.run_child(waits_forever)


@app.workflow
async def waits_forever(ctx: WorkflowContext) -> None:
    await ctx.wait_for_event("never")


STARTED = asyncio.Event


@app.step
async def long_step() -> None:
    bump("long_step started")
    await asyncio.sleep(30)
    bump("long_step finished")


@app.workflow
async def long_running(ctx: WorkflowContext) -> None:
    await double(1)
    await long_step()
    await double(2)


FLAGS: dict[str, bool] = {}


@app.step
async def step_a() -> str:
    return "a"


@app.step
async def step_b() -> str:
    return "b"


@app.workflow
async def changes_its_mind(ctx: WorkflowContext) -> str:
    # Deliberately nondeterministic: reads state outside the workflow.
    first = await (step_b() if FLAGS.get("use_b") else step_a())
    await ctx.sleep(0.3)
    return first


@app.workflow(timeout=0.5)
async def too_slow(ctx: WorkflowContext) -> None:
    await ctx.sleep(5)


@app.workflow
async def returns_a_set(ctx: WorkflowContext) -> Any:
    return {1, 2}


@app.step
async def bad_output() -> Any:
    bump("bad_output")
    return object()


@app.workflow
async def steps_bad_output(ctx: WorkflowContext) -> Any:
    return await bad_output()


# -- tests ---------------------------------------------------------------------------------


async def test_steps_run_once_and_typed_values_round_trip(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(ship, Item(sku="x", qty=2))
        box = await handle.result(timeout=10)
    assert box == Box(items=[Item(sku="x", qty=2)], label="box-x:3.0")
    assert calls == {"pack": 1, "weigh": 1}
    assert seen_keys == [f"{handle.run_id}:0", f"{handle.run_id}:1"]
    steps = await handle.steps()
    assert [(s.seq, s.name, s.status.value, s.attempts) for s in steps] == [
        (0, "pack", "completed", 1),
        (1, "weigh", "completed", 1),
    ]


async def test_retries_with_backoff_then_succeeds(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(retrying, "transient")
        assert await handle.result(timeout=10) == "ok"
    assert calls["flaky-transient"] == FLAKY_FAILURES + 1
    (step,) = await handle.steps()
    assert step.attempts == FLAKY_FAILURES + 1


async def test_non_retryable_error_fails_at_once_and_workflow_can_handle_it(
    runtime: Runtime,
) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(handles_failure)
        assert await handle.result(timeout=10) == "handled Fatal after 1"
        failing = await client.tenant("acme").start(retrying, "fatal")
        with pytest.raises(RunFailedError) as info:
            await failing.result(timeout=10)
    assert info.value.error_type == "StepFailedError"
    assert calls["flaky-fatal"] == 2  # once per workflow, never retried


async def test_step_timeout_is_retried_then_fails(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(timing_out)
        with pytest.raises(RunFailedError, match="StepTimeoutError"):
            await handle.result(timeout=10)
    assert calls["hangs"] == 2
    (step,) = await handle.steps()
    assert step.error_info is not None and step.error_info["type"] == "StepTimeoutError"


async def test_durable_sleep_releases_the_worker(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime, concurrency=1) as worker:
        handle = await client.tenant("acme").start(napper, 0.6)
        await _wait_status(handle, RunStatus.SLEEPING)
        # The only slot is freed while the run sleeps (once the worker has handed the message
        # back, a moment after the run's state is committed).
        deadline = time.monotonic() + 0.3
        while worker._inflight:
            assert time.monotonic() < deadline, "the sleeping run still holds the worker"
            await asyncio.sleep(0.005)
        quick = await client.tenant("acme").start(ship, Item(sku="q", qty=1))
        await quick.result(timeout=5)  # runs during the sleep
        assert await handle.status() is RunStatus.SLEEPING
        slept = await handle.result(timeout=10)
    assert slept >= 0.6
    assert calls["clock"] == 2


async def test_events_are_delivered_in_order_and_wake_the_run(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(approval, None)
        await _wait_status(handle, RunStatus.WAITING)
        await handle.send_event("approve", {"by": "ann"})
        await handle.send_event("approve", {"by": "bob"})
        assert await handle.result(timeout=10) == [{"by": "ann"}, {"by": "bob"}]


async def test_event_sent_before_the_wait_is_not_lost(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    handle = await client.tenant("acme").start(approval, None)
    await handle.send_event("approve", 1)  # before any worker runs it
    await handle.send_event("approve", 2)
    async with running_worker(app, runtime):
        assert await handle.result(timeout=10) == [1, 2]


async def test_wait_for_event_times_out_with_none(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(approval, 0.3)
        assert await handle.result(timeout=10) == [None, None]


async def test_a_typed_wait_validates_the_payload_into_its_type(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    tenant = client.tenant("acme")
    async with running_worker(app, runtime):
        good = await tenant.start(typed_approval, 10.0)
        await good.send_event("flag", "true")  # validated as bool: True
        await _wait_status(good, RunStatus.WAITING)  # the second wait: replayed from here on
        await good.send_event("decision", {"approved": 1, "by": "ann"})
        assert await good.result(timeout=10) == [True, "Decision", True, "ann"]
        bad = await tenant.start(typed_approval, 0.2)  # the flag times out: None
        await bad.send_event("decision", {"approved": "perhaps"})
        assert await bad.result(timeout=10) == [
            None,
            "the payload of event 'decision' does not fit Decision: approved: Input should be "
            "a valid boolean, unable to interpret input (and 1 more)",
        ]


async def test_child_workflows_have_derived_ids_and_return_results(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(parent, 5)
        assert await handle.result(timeout=10) == [10, 12]
        failing = await client.tenant("acme").start(parent_of_failure)
        assert await failing.result(timeout=10) == "failed"
    children = await client.tenant("acme").list_runs(workflow="kid")
    assert {c.id for c in children} == {
        f"{handle.run_id}.0",
        f"{handle.run_id}.1",
        f"{failing.run_id}.0",
    }
    assert all(c.parent_id in (handle.run_id, failing.run_id) for c in children)


async def test_cancel_interrupts_a_running_async_step(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(long_running)
        await _wait_for(lambda: calls.get("long_step started") == 1)
        started = time.monotonic()
        assert await handle.cancel() is RunStatus.RUNNING  # a worker holds it: it stops soon
        with pytest.raises(RunCancelledError):
            await handle.result(timeout=5)
        assert time.monotonic() - started < 3
    assert "long_step finished" not in calls
    assert calls["double"] == 1  # nothing after the cancelled step ran
    assert [s.name for s in await handle.steps()] == ["double"]


async def test_cancel_of_a_waiting_run_is_immediate_and_cascades_to_children(
    runtime: Runtime,
) -> None:
    client = Client(app, runtime=runtime)
    tenant = client.tenant("acme")
    async with running_worker(app, runtime):
        handle = await tenant.start(parent_waits_forever)
        child = tenant.handle(f"{handle.run_id}.0")
        await _wait_status(child, RunStatus.WAITING)
        await _wait_status(handle, RunStatus.WAITING)
        assert await handle.cancel() is RunStatus.CANCELLED
        assert await child.status() is RunStatus.CANCELLED
        queued = await tenant.start(waits_forever)
        assert await queued.cancel() in (RunStatus.CANCELLED, RunStatus.RUNNING)
        with pytest.raises(RunCancelledError):
            await queued.result(timeout=5)


async def test_cancel_is_idempotent_while_cancelling_and_refused_once_ended(
    runtime: Runtime,
) -> None:
    client = Client(app, runtime=runtime)
    tenant = client.tenant("acme")
    async with running_worker(app, runtime):
        handle = await tenant.start(long_running)
        await _wait_for(lambda: calls.get("long_step started") == 1)
        assert await handle.cancel() is RunStatus.RUNNING
        assert await handle.cancel() is RunStatus.RUNNING  # being cancelled: nothing changes
        with pytest.raises(RunCancelledError):
            await handle.result(timeout=5)
        done = await tenant.start(kid, 2)
        assert await done.result(timeout=10) == 4
    for ended, status in ((handle, "cancelled"), (done, "completed")):
        with pytest.raises(RunFinishedError) as refused:
            await ended.cancel()
        assert refused.value.status == status
        assert (
            str(refused.value) == f"run {ended.run_id} has ended ({status}); it cannot be cancelled"
        )
        assert (await ended.describe()).status.value == status  # untouched


async def test_nondeterminism_is_detected_and_names_both_steps(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(changes_its_mind)
        await _wait_status(handle, RunStatus.SLEEPING)
        FLAGS["use_b"] = True  # the "code" changed while the run slept
        with pytest.raises(RunFailedError) as info:
            await handle.result(timeout=10)
    assert info.value.error_type == "NonDeterminismError"
    assert "step_a" in str(info.value) and "step_b" in str(info.value)


async def test_workflow_timeout_fails_the_run(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(too_slow)
        with pytest.raises(RunFailedError) as info:
            await handle.result(timeout=10)
    assert info.value.error_type == "WorkflowTimeoutError"


async def test_values_that_cannot_be_stored_are_clear_errors(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    tenant = client.tenant("acme")
    with pytest.raises(SerializationError, match="input of workflow 'ship'"):
        await tenant.start(ship, {1, 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await tenant.start(ship)  # type: ignore[call-arg]
    assert await tenant.list_runs() == []  # nothing was created
    async with running_worker(app, runtime):
        bad_result = await tenant.start(returns_a_set)
        with pytest.raises(RunFailedError, match="SerializationError"):
            await bad_result.result(timeout=10)
        bad_step = await tenant.start(steps_bad_output)
        with pytest.raises(RunFailedError, match="SerializationError"):
            await bad_step.result(timeout=10)
    assert calls["bad_output"] == 1  # a value that cannot be stored is not retried


async def test_runs_are_listed_by_status_with_a_cursor(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    tenant = client.tenant("acme")
    handles = [await tenant.start(kid, i) for i in range(5)]
    page1 = await tenant.list_runs(status=RunStatus.QUEUED, limit=3)
    page2 = await tenant.list_runs(status=RunStatus.QUEUED, limit=3, before=page1[-1].id)
    ids = [r.id for r in page1 + page2]
    assert ids == [h.run_id for h in reversed(handles)]
    async with running_worker(app, runtime):
        for h in handles:
            await h.result(timeout=10)
    assert await tenant.list_runs(status=RunStatus.QUEUED) == []
    assert len(await tenant.list_runs(status=RunStatus.COMPLETED)) == 5
    with pytest.raises(InvalidCursorError) as refused:
        await tenant.list_runs(before="garbage")
    assert refused.value.issues == (
        ("before", "not a cursor this API gave out: pass the next_cursor of a previous page"),
    )


async def test_each_tenant_sees_only_its_own_runs(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    acme, globex = client.tenant("acme"), client.tenant("globex")
    mine = await acme.start(kid, 1)
    theirs = await globex.start(kid, 2)
    assert [r.id for r in await acme.list_runs()] == [mine.run_id]
    assert [r.id for r in await globex.list_runs()] == [theirs.run_id]
    from tenantflow import RunNotFoundError

    with pytest.raises(RunNotFoundError):
        await globex.handle(mine.run_id).status()
    assert runtime.registry.get("acme").database_url != runtime.registry.get("globex").database_url


async def test_a_suspended_tenant_takes_no_new_runs(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    runtime.registry.set_status("globex", TenantStatus.SUSPENDED)
    with pytest.raises(TenantSuspendedError):
        await client.tenant("globex").start(kid, 1)


# -- helpers -------------------------------------------------------------------------------


async def _wait_status(handle: Any, status: RunStatus, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (await handle._tenant.store.get_run(handle.run_id)) is None:
        assert time.monotonic() < deadline, "the run was never created"
        await asyncio.sleep(0.01)
    while (current := await handle.status()) is not status:
        assert not current.terminal, f"run ended {current} while waiting for {status}"
        assert time.monotonic() < deadline, f"still {current}, expected {status}"
        await asyncio.sleep(0.01)


async def _wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_run_no_worker_can_execute_is_dead_lettered_with_its_reason(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's app has a workflow this worker's app lacks: the run is given back for a
    worker that has it, and once every delivery has found none, parked with its reason instead
    of going round for ever."""
    from tenantflow.worker import worker as worker_module
    from tenantflow.worker.maintenance import Maintenance

    monkeypatch.setattr(worker_module, "UNREGISTERED_RETRY_SECONDS", 0.05)
    queue = runtime.queue
    queue.max_deliveries = 3
    tenant = Client(app, runtime=runtime).tenant("acme")
    handle = await tenant.start(kid, 4)
    reason = "workflow 'kid' is not registered in this worker's app 'old-worker'"
    async with running_worker(App("old-worker"), runtime):
        await _wait_for_async(lambda: queue.dead_letters("acme"))
    (dead,) = await queue.dead_letters("acme")
    assert (dead.run_id, dead.deliveries, dead.reason, dead.parked) == (
        handle.run_id,
        3,
        reason,
        True,
    )
    run = await handle.describe()
    assert run.status is RunStatus.QUEUED
    assert run.stuck_reason == (
        f"{reason}; dead-lettered after 3 deliveries: replay the dead letter once a worker has "
        "the workflow"
    )
    # The reconciler finds it stalled, but parked: it does not send it round again.
    maintenance = Maintenance(runtime, "test-reconciler")
    maintenance.grace = 0.0
    await _wait_for_async(lambda: _ran(maintenance))
    assert maintenance.totals.reenqueued == 0
    assert await queue.live("acme", [handle.run_id]) == {handle.run_id}
    # Once a worker has the workflow, replaying the dead letter runs it.
    await queue.replay_dead_letter("acme", dead.id)
    async with running_worker(app, runtime):
        assert await handle.result(timeout=10) == 8
    assert (await handle.describe()).stuck_reason is None
    assert await queue.dead_letters("acme") == []


async def _ran(maintenance: Any) -> bool:
    report = await maintenance.run_once()
    return bool(report.ran)


async def _wait_for_async(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_duplicate_delivery_executes_once(runtime: Runtime) -> None:
    client = Client(app, runtime=runtime)
    handle = await client.tenant("acme").start(ship, Item(sku="d", qty=1))
    for _ in range(3):  # the same run delivered four times, before and during execution
        await runtime.queue.enqueue("acme", handle.run_id)
    async with running_worker(app, runtime):
        await handle.result(timeout=10)
        await runtime.queue.enqueue("acme", handle.run_id)  # and once after it ended

        async def drained() -> bool:
            return await runtime.queue.depth("acme") == 0

        deadline = time.monotonic() + 10
        while not await drained():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    assert calls == {"pack": 1, "weigh": 1}
    assert (await handle.describe()).executions == 1


async def test_a_store_failure_is_retried_not_taken_for_the_workflows_failure(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tenantflow.store.sql import SqlRunStore

    real_finish = SqlRunStore.finish_run
    failures = [ConnectionError("database went away")]

    async def flaky_finish(self: SqlRunStore, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real_finish(self, *args, **kwargs)

    monkeypatch.setattr(SqlRunStore, "finish_run", flaky_finish)
    client = Client(app, runtime=runtime)
    async with running_worker(app, runtime):
        handle = await client.tenant("acme").start(ship, Item(sku="s", qty=1))
        box = await handle.result(timeout=20)
    assert box.label == "box-s:1.5"
    assert failures == []  # the failure happened, and the run still completed
    assert (await handle.describe()).status is RunStatus.COMPLETED


async def test_a_stopping_worker_waits_for_its_platform_read_in_flight(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker reads the platform (tenants, licenses) in a thread every second. Stopped in
    the middle of such a read, it returns only once the read is over, so that closing the
    runtime right after closes every platform connection (one given back later would be
    left open)."""
    listing = runtime.registry.list
    state = {"inside": 0, "reads": 0}

    def slow_list() -> Any:
        state["inside"] += 1
        try:
            time.sleep(0.5)
            return listing()
        finally:
            state["inside"] -= 1
            state["reads"] += 1

    monkeypatch.setattr(runtime.registry, "list", slow_list)
    async with running_worker(app, runtime):
        # The first read is at start; the next, a second later, is the one interrupted.
        deadline = time.monotonic() + 10
        while state["reads"] < 1 or state["inside"] == 0:
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.01)
    assert state["inside"] == 0  # no read left running when the worker is done
