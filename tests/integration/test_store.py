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
    Wait,
    WaitKind,
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
    assert first.lease is not None
    with pytest.raises(LeaseLost):
        await store.record_step(checkpoint("r1", 0), lease=first.lease)


def checkpoint(run_id: str, seq: int) -> StepRecord:
    """A completed step's checkpoint."""
    now = time.time()
    return StepRecord(
        run_id=run_id,
        seq=seq,
        name="s",
        kind=StepKind.STEP,
        status=StepStatus.COMPLETED,
        output=b"1",
        error=None,
        attempts=1,
        started_at=now,
        finished_at=now,
    )


async def test_an_older_attempt_of_the_same_owner_cannot_write(runtime: Runtime) -> None:
    """The same worker process claims a run twice (its first claim's lease lapsed: a claim
    that waited for the database, a delivery that came back): the first attempt is fenced
    off from every write, though its owner is the run's owner."""
    store = runtime.router.store("acme")
    now = time.time()
    await store.create_run(
        NewRun(id="r3", workflow="noop", input=b'{"args":[],"kwargs":{}}'), now=now
    )
    old = await store.claim_run("r3", owner="w", now=now, lease=1)
    new = await store.claim_run("r3", owner="w", now=now + 2, lease=30)
    assert old.lease is not None and new.lease is not None and new.recovered
    assert new.lease.owner == old.lease.owner == "w"
    assert new.lease.attempt == old.lease.attempt + 1

    with pytest.raises(LeaseLost):
        await store.record_step(checkpoint("r3", 0), lease=old.lease)
    with pytest.raises(LeaseLost):
        await store.mark_compensable("r3", lease=old.lease, now=time.time())
    with pytest.raises(LeaseLost):
        await store.suspend_run(
            "r3", Wait(kind=WaitKind.SLEEP, wake_at=now + 60), lease=old.lease, now=time.time()
        )
    with pytest.raises(LeaseLost):
        await store.finish_run(
            "r3",
            RunStatus.COMPLETED,
            result=b"1",
            error=None,
            lease=old.lease,
            now=time.time(),
            step=checkpoint("r3", 0),
        )
    await store.release_run("r3", lease=old.lease, now=time.time())  # changes nothing
    _, lost = await store.renew_leases({"r3": old.lease}, until=time.time() + 60)
    assert lost == {"r3"}
    run = await store.get_run("r3")
    assert run is not None and run.status is RunStatus.RUNNING and not run.compensable
    assert await store.get_steps("r3") == []

    # The current attempt writes, renews and ends the run.
    assert await store.record_step(checkpoint("r3", 0), lease=new.lease) is False
    assert await store.renew_leases({"r3": new.lease}, until=time.time() + 60) == (set(), set())
    await store.finish_run(
        "r3", RunStatus.COMPLETED, result=b"2", error=None, lease=new.lease, now=time.time()
    )
    assert [s.seq for s in await store.get_steps("r3")] == [0]
    assert (await store.get_run("r3")).status is RunStatus.COMPLETED  # type: ignore[union-attr]


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
