"""One owner per attempt, in a worker process: it never executes one run twice at once (the
store's side, a fence by owner and attempt, is in ``test_store.py``)."""

from __future__ import annotations

import asyncio
import time

from tenantflow import App, Client, Runtime, WorkflowContext
from tenantflow.store.sql import SqlRunStore
from tests.conftest import running_worker

app = App("fencing-tests")


class Held:
    """What the step ``held`` reports and waits for (events of the running test's loop)."""

    def __init__(self) -> None:
        self.executed: list[int] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()


held_by = Held()


@app.step
async def held(i: int) -> int:
    held_by.executed.append(i)
    held_by.entered.set()
    await held_by.release.wait()
    return i


@app.workflow
async def two_steps(ctx: WorkflowContext) -> int:
    return await held(1) + await held(2)


async def test_a_second_delivery_of_a_running_run_is_not_started(runtime: Runtime) -> None:
    """The run's lease lapses in the database while its step still runs here, and another
    message of the run arrives: the worker hands it back rather than claim the run again."""
    global held_by
    held_by = state = Held()
    tenant = Client(app, runtime=runtime).tenant("acme")
    handle = await tenant.start(two_steps)
    store = runtime.router.store("acme")
    assert isinstance(store, SqlRunStore)
    async with running_worker(app, runtime) as worker:
        await asyncio.wait_for(state.entered.wait(), 30)
        async with store.db.autocommit() as tx:  # as if the lease had lapsed meanwhile
            await tx.run("UPDATE runs SET lease_until = 0 WHERE id = ?", (handle.run_id,))
        await runtime.queue.enqueue("acme", handle.run_id)
        deadline = time.monotonic() + 30
        while worker.stats.handed_back < 1 and len(state.executed) < 2:
            assert time.monotonic() < deadline, "the second delivery never came"
            await asyncio.sleep(0.02)
        state.release.set()
        assert await handle.result(timeout=30) == 3
    assert state.executed == [1, 2]  # each step once: one execution
    run = await handle.describe()
    assert run.executions == 1 and run.recoveries == 0
    assert worker.stats.claimed == 1
