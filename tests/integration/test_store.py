"""The tenant run store: idempotent submission, claims, leases and fencing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tenantflow import App, Client, IdempotencyConflictError, Runtime, WorkflowContext
from tenantflow.store.base import LeaseLost
from tenantflow.store.records import (
    ClaimOutcome,
    NewRun,
    RunStatus,
    StepKind,
    StepRecord,
    StepStatus,
)

app = App("store-tests")


@app.workflow(max_recovery_attempts=2)
async def noop(ctx: WorkflowContext, n: int) -> int:
    return n


async def test_same_key_under_20_concurrent_submits_makes_one_run(runtime: Runtime) -> None:
    settings = runtime.settings
    barrier = threading.Barrier(20)
    results: list[str | BaseException] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        async def go() -> str:
            # Each thread has its own runtime: separate connections, truly concurrent.
            client = Client(app, settings)
            try:
                barrier.wait()
                handle = await client.tenant("acme").start(
                    noop.options(idempotency_key="order-42"), 7
                )
                return handle.run_id
            finally:
                await client.close()

        try:
            outcome: str | BaseException = asyncio.run(go())
        except BaseException as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    def submit_all() -> None:
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    await asyncio.to_thread(submit_all)
    assert len(results) == 20
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    runs = await runtime.router.store("acme").list_runs()
    assert [r.idempotency_key for r in runs] == ["order-42"]
    assert await runtime.queue.depth("acme") == 1  # enqueued once


async def test_same_key_with_another_input_is_a_conflict(runtime: Runtime) -> None:
    tenant = Client(app, runtime=runtime).tenant("acme")
    first = await tenant.start(noop.options(idempotency_key="k"), 1)
    again = await tenant.start(noop.options(idempotency_key="k"), 1)
    assert again.run_id == first.run_id
    with pytest.raises(IdempotencyConflictError, match="different workflow or input"):
        await tenant.start(noop.options(idempotency_key="k"), 2)
    # Keys are per tenant: another tenant may use the same one.
    other = (
        await Client(app, runtime=runtime)
        .tenant("globex")
        .start(noop.options(idempotency_key="k"), 2)
    )
    assert other.run_id != first.run_id


async def test_claim_defers_duplicates_and_fences_a_late_worker(runtime: Runtime) -> None:
    store = runtime.router.store("acme")
    now = time.time()
    run, created, _ = await store.create_run(
        NewRun(id="r1", workflow="noop", input=b'{"args":[1],"kwargs":{}}', max_recoveries=2),
        now=now,
    )
    assert created and run.status is RunStatus.QUEUED
    first = await store.claim_run("r1", owner="a", now=now, lease=5)
    assert first.outcome is ClaimOutcome.CLAIMED and first.run is not None
    duplicate = await store.claim_run("r1", owner="b", now=now + 1, lease=5)
    # A second delivery while a is alive waits for a's lease to end (a may die).
    assert duplicate.outcome is ClaimOutcome.DEFER and duplicate.not_before == now + 5
    # a's lease expires: b recovers the run, and a can no longer write to it.
    recovered = await store.claim_run("r1", owner="b", now=now + 6, lease=5)
    assert recovered.outcome is ClaimOutcome.CLAIMED
    assert recovered.run is not None and recovered.run.recoveries == 1
    step = StepRecord(
        run_id="r1",
        seq=0,
        name="s",
        kind=StepKind.STEP,
        status=StepStatus.COMPLETED,
        output=b"1",
        error=None,
        attempts=1,
        started_at=now,
        finished_at=now,
    )
    with pytest.raises(LeaseLost):
        await store.record_step(step, owner="a")


async def test_a_run_recovered_too_often_fails(runtime: Runtime) -> None:
    store = runtime.router.store("acme")
    now = time.time()
    await store.create_run(
        NewRun(id="r2", workflow="noop", input=b'{"args":[1],"kwargs":{}}', max_recoveries=2),
        now=now,
    )
    t = now
    outcomes = []
    for _ in range(4):  # the first claim, then one per "crash"
        claim = await store.claim_run("r2", owner="w", now=t, lease=1)
        outcomes.append(claim.outcome)
        t += 2
    assert outcomes == [ClaimOutcome.CLAIMED] * 3 + [ClaimOutcome.EXHAUSTED]
    run = await store.get_run("r2")
    assert run is not None and run.status is RunStatus.FAILED
    assert run.error_info is not None
    assert run.error_info["type"] == "MaxRecoveryAttemptsExceededError"
