"""Transactional outbox, relay and reconciler: a run accepted is never lost, whatever the queue
loses."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy

from tenantflow import App, Client, RunStatus, Runtime, WorkflowContext
from tenantflow.client import new_run_id
from tenantflow.engine.steps import encode_input
from tenantflow.store.records import NewRun
from tenantflow.store.sql import SqlRunStore
from tenantflow.worker import maintenance
from tenantflow.worker.maintenance import Maintenance
from tests.conftest import running_worker

app = App("outbox-tests")


@app.step
async def add(a: int, b: int) -> int:
    return a + b


@app.workflow
async def adder(ctx: WorkflowContext, a: int) -> int:
    return await add(a, 1)


async def test_a_crash_between_commit_and_publish_loses_nothing(runtime: Runtime) -> None:
    store = runtime.router.store("acme")
    # Mark the tenant's work and commit the run with its outbox record, as a submit does,
    # then "crash": never publish.
    await runtime.marks.note("acme")
    run, created, outbox = await store.create_run(
        NewRun(id=new_run_id(), workflow="adder", input=encode_input(adder, (41,), {})),
        now=time.time(),
    )
    assert created and len(outbox) == 1
    assert await runtime.queue.depth("acme") == 0
    async with running_worker(app, runtime):
        handle = Client(app, runtime=runtime).tenant("acme").handle(run.id)
        assert await handle.result(timeout=30) == 42
    # The relay published the record; its deletion is batched (every 50 ms): wait for it.
    deadline = time.monotonic() + 5
    while await store.pending_outbox(older_than=time.time() + 60):
        assert time.monotonic() < deadline, "the published outbox record was never cleaned"
        await asyncio.sleep(0.05)


async def test_a_rolled_back_submit_publishes_nothing(runtime: Runtime) -> None:
    store = runtime.router.store("acme")
    assert isinstance(store, SqlRunStore)
    # The outbox insert fails inside the submit's transaction (a trigger raises).
    async with store.db.transaction() as tx:
        if store.db.dialect == "sqlite":
            await tx.run(
                "CREATE TRIGGER fail BEFORE INSERT ON outbox "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        else:
            await tx.run(
                "CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$"
            )
            await tx.run(
                "CREATE TRIGGER fail BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION fail()"
            )
    tenant = Client(app, runtime=runtime).tenant("acme")
    with pytest.raises(Exception, match="disk full"):
        await tenant.start(adder, 1)
    assert await tenant.list_runs() == []  # the run was rolled back with its outbox record
    assert await runtime.queue.depth("acme") == 0


async def test_runs_survive_the_queue_losing_everything(runtime: Runtime) -> None:
    tenant = Client(app, runtime=runtime).tenant("acme")
    handles = [await tenant.start(adder, i) for i in range(20)]
    await runtime.outbox.published()  # messages follow the commits in the background
    assert await runtime.queue.depth("acme") == 20
    await wipe_queue(runtime)
    assert await runtime.queue.depth("acme") == 0
    async with running_worker(app, runtime) as worker:
        results = [await h.result(timeout=60) for h in handles]
    assert results == [i + 1 for i in range(20)]
    # Their outbox records published again, or the runs found without a message: either way
    # from the database, whatever was left of their records when the worker looked.
    assert worker.stats.relayed + worker.stats.reenqueued >= 20
    assert await tenant.list_runs(status=RunStatus.COMPLETED, limit=100) != []


async def test_a_tenant_keeps_its_mark_while_a_run_is_unfinished(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sweeps visit only tenants marked with work; a mark due to go stays while the tenant has
    an unfinished run, so a run whose message the queue lost is still found. Then it goes."""
    monkeypatch.setattr(maintenance, "MARK_CLEAR_SECONDS", 0.0)  # every mark is due at once
    tenant = Client(app, runtime=runtime).tenant("acme")
    handle = await tenant.start(adder, 1)
    await runtime.outbox.published()
    await wipe_queue(runtime)
    sweeps = Maintenance(runtime, "test")
    report = await sweeps.run_once()
    assert report.ran and report.tenants == 1 and report.cleared == 0  # globex: not visited
    assert [t for t, _ in runtime.registry.active_tenants()] == ["acme"]
    async with running_worker(app, runtime):
        assert await handle.result(timeout=60) == 2
    deadline = time.monotonic() + 10
    while runtime.registry.active_tenants():
        assert time.monotonic() < deadline, "the mark of a tenant with nothing left stayed"
        await sweeps.run_once()  # the worker's lock may hold it off for a moment
        await asyncio.sleep(0.2)
    assert (await sweeps.run_once()).tenants == 0


async def test_a_mark_that_failed_is_made_later(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The platform database away at submit: the run is accepted and the mark follows."""
    monkeypatch.setattr("tenantflow.tenant.marks.MARK_RETRY_SECONDS", 0.05)
    mark = runtime.registry.mark_active
    failures = iter([True, True])

    def flaky(tenant_id: str, now: float) -> None:
        if next(failures, False):
            raise sqlalchemy.exc.OperationalError("mark", {}, ConnectionError("platform away"))
        mark(tenant_id, now)

    monkeypatch.setattr(runtime.registry, "mark_active", flaky)
    await Client(app, runtime=runtime).tenant("acme").start(adder, 1)
    deadline = time.monotonic() + 5
    while not runtime.registry.active_tenants():
        assert time.monotonic() < deadline, "the failed mark was never made"
        await asyncio.sleep(0.05)
    assert [t for t, _ in runtime.registry.active_tenants()] == ["acme"]


async def wipe_queue(runtime: Runtime) -> None:
    """What ``FLUSHALL`` does to this test's queue (its own keys only)."""
    from tenantflow.queue.redis_streams import RedisStreamsQueue
    from tenantflow.queue.sqlite import SqliteQueue

    queue = runtime.queue
    if isinstance(queue, RedisStreamsQueue):
        keys = [k async for k in queue.redis.scan_iter(match=f"{queue.keys.prefix}:*")]
        if keys:
            await queue.redis.delete(*keys)
    else:
        assert isinstance(queue, SqliteQueue)
        queue._conn.execute("DELETE FROM messages")
