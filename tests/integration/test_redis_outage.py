"""Redis goes away and comes back empty: submits keep being accepted (durably, in each tenant's
database), workers keep running, and every run completes once Redis is back.

At the default lease, losing Redis's data costs runs seconds, not a lease: workers see the
queue's data set change (``Queue.epoch``) and rebuild it from the databases at once, and a run
executed through the loss finishes under its database lease. Effects are counted in a ledger of
the test's own (``tests.apps.effects``), so a step executed twice would show.

The tests start a redis-server of their own on a free loopback port, so they can kill it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from tenantflow import (
    App,
    Client,
    RunStatus,
    Runtime,
    Settings,
    Worker,
    WorkflowContext,
    current_step,
)
from tenantflow.client import RunHandle
from tenantflow.queue.base import Envelope, Epoch
from tenantflow.queue.keys import GROUP
from tenantflow.queue.redis_streams import RedisStreamsQueue
from tests.apps import durable, effects
from tests.conftest import cleanup_production, production_settings, running_worker
from tests.integration.test_crash import Workers, wait_until
from tests.servers import OwnRedis

pytestmark = pytest.mark.slow
app = App("outage-tests")
FAST = {"lease_seconds": 2.0, "poll_interval": 0.02, "reconcile_interval": 0.5}
# The settings of a production installation left alone: the lease (30 s) and the reconciler's
# interval (5 s) are what a run used to wait for after a loss.
DEFAULT_LEASE = pytest.mark.parametrize("settings", [{}], indirect=True, ids=["default-lease"])
# Runs that progress after a loss must do so within this long of Redis answering again: the
# target is 2 s; the rest is slack for a loaded two-core machine.
RECOVERY_BOUND = 3.0
gates: dict[str, asyncio.Event] = {}  # steps that hold until the test lets them go


@app.step
async def work(i: int) -> int:
    await asyncio.sleep(0.05)
    return i


@app.workflow
async def job(ctx: WorkflowContext, i: int) -> int:
    return await work(i)


@app.step
async def effect(name: str, gate: str | None) -> str:
    effects.record(current_step().idempotency_key, name)
    if gate is not None:
        await gates[gate].wait()
    return name


@app.workflow
async def chain(ctx: WorkflowContext, gate: str | None = None, nap: float = 0.0) -> str:
    """Two effects; the first held by a gate of the test, a durable sleep between them."""
    await effect("first", gate)
    if nap:
        await ctx.sleep(nap)
    await effect("second", None)
    return "done"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, own_redis: OwnRedis
) -> Iterator[Settings]:
    overrides: dict[str, Any] = getattr(request, "param", FAST)
    settings = production_settings(tmp_path, queue_url=own_redis.url, **overrides)
    yield settings
    cleanup_production(settings)


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(effects.ENV, str(tmp_path / "effects.db"))


async def test_runs_survive_redis_dying_and_coming_back_empty(
    runtime: Runtime, own_redis: OwnRedis
) -> None:
    tenant = Client(app, runtime=runtime).tenant("acme")
    async with running_worker(app, runtime) as worker:
        before = [await tenant.start(job, i) for i in range(20)]
        await asyncio.sleep(0.1)
        own_redis.stop(signal.SIGKILL)  # mid-load
        during = [await tenant.start(job, 100 + i) for i in range(10)]  # still accepted
        await asyncio.sleep(1.0)  # the worker keeps running without its queue
        own_redis.start()  # back, empty
        results = [await h.result(timeout=60) for h in before + during]
        assert worker.stopping is False
    assert results == list(range(20)) + [100 + i for i in range(10)]
    assert await tenant.store.count_runs(status=RunStatus.COMPLETED) == 30


# -- losing the data at the default lease ----------------------------------------------------


@contextlib.asynccontextmanager
async def two_workers(runtime: Runtime) -> AsyncIterator[list[Worker]]:
    """Two workers of 4 runs each, in runtimes (queue clients, epochs seen) of their own."""
    async with (
        running_worker(app, runtime, concurrency=4) as first,
        another_worker(runtime) as second,
    ):
        yield [first, second]


@contextlib.asynccontextmanager
async def another_worker(runtime: Runtime) -> AsyncIterator[Worker]:
    other = Runtime(runtime.settings)
    try:
        async with running_worker(app, other, concurrency=4) as worker:
            yield worker
    finally:
        await other.close()


class Runs:
    """Runs of every kind a loss finds: sleeping (their wake-up message in Redis), running
    (their first step held by the gate ``held``, filling the two workers' eight slots; the
    ``napping`` half sleep for ``nap_when_held`` once it opens) and queued (their message
    waiting in the stream)."""

    def __init__(self, runtime: Runtime) -> None:
        self.tenant = Client(app, runtime=runtime).tenant("acme")
        self.sleeping: list[RunHandle[str]] = []
        self.running: list[RunHandle[str]] = []
        self.napping: list[RunHandle[str]] = []
        self.queued: list[RunHandle[str]] = []

    async def start(self, *, nap: float = 3.0, nap_when_held: float = 0.0) -> None:
        gates["held"] = asyncio.Event()
        self.sleeping = [await self.tenant.start(chain, None, nap) for _ in range(4)]
        await self.all_in(self.sleeping, RunStatus.SLEEPING)
        self.running = [await self.tenant.start(chain, "held") for _ in range(4)]
        self.napping = [await self.tenant.start(chain, "held", nap_when_held) for _ in range(4)]
        await self.all_in(self.running + self.napping, RunStatus.RUNNING)
        self.queued = [await self.tenant.start(chain) for _ in range(8)]
        await asyncio.sleep(0.2)  # their messages are in the stream, behind the full slots
        assert {await h.status() for h in self.queued} == {RunStatus.QUEUED}

    async def all_in(self, handles: list[RunHandle[str]], status: RunStatus) -> None:
        async def reached() -> bool:
            return {await h.status() for h in handles} == {status}

        await wait_until(reached, 10, str(status))

    async def wake_at(self) -> float:
        return min([(await h.describe()).wake_at or 0.0 for h in self.sleeping])

    async def progress_after(self, handles: list[RunHandle[str]], since: float) -> float:
        """The latest, over these runs, of the first step each began after ``since``: how
        long after ``since`` every one of them had moved on."""
        latest = 0.0
        for h in handles:
            began = [s.started_at for s in await h.steps() if s.started_at > since]
            assert began, f"run {h.run_id} did not move after the loss"
            latest = max(latest, min(began) - since)
        return latest


async def flushall(server: OwnRedis) -> None:
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


def assert_each_effect_once(runs: int, steps: int) -> None:
    counts = effects.counts()
    assert len(counts) == runs * steps
    assert set(counts.values()) == {1}, {k: n for k, n in counts.items() if n > 1}


def rebuilds(workers: list[Worker]) -> int:
    return sum(w.stats.sweeps.rebuilds for w in workers)


async def test_the_epoch_changes_when_redis_may_have_lost_data(own_redis: OwnRedis) -> None:
    queue = RedisStreamsQueue(own_redis.url, prefix="tf")
    try:
        first = await queue.epoch()
        assert first.new  # nothing before it
        assert await queue.epoch() == Epoch(first.id)
        await flushall(own_redis)
        emptied = await queue.epoch()
        assert emptied.new and emptied.id != first.id
        assert await queue.epoch() == Epoch(emptied.id)
        # There, but made by another server process: restored from a snapshot, or a replica
        # promoted; the last writes before it may be lost.
        restored = emptied.id.split("|")[0] + "|" + "0" * 40
        await queue.redis.set(queue.keys.epoch, restored)
        again = await queue.epoch()
        assert again.new and again.id not in (restored, emptied.id)
    finally:
        await queue.close()


@DEFAULT_LEASE
async def test_a_flushall_costs_runs_seconds_not_a_lease(
    runtime: Runtime, own_redis: OwnRedis, ledger: None
) -> None:
    assert runtime.settings.lease_seconds == 30.0
    runs = Runs(runtime)
    async with two_workers(runtime) as workers:
        await runs.start()
        # Flushed shortly before the sleepers wake: nothing but the loss stops any run from
        # moving on a moment after it.
        await asyncio.sleep(max(0.0, await runs.wake_at() - 0.3 - time.time()))
        before = rebuilds(workers)
        flushed = time.time()
        await flushall(own_redis)
        await asyncio.sleep(0.2)
        gates["held"].set()  # the running runs finish their first step, past their messages
        every = runs.sleeping + runs.running + runs.napping + runs.queued
        assert {await h.result(timeout=20) for h in every} == {"done"}
        took = await runs.progress_after(every, flushed)
        print(f"every run moved on within {took:.2f} s of the FLUSHALL")  # noqa: T201
        assert took <= RECOVERY_BOUND
        assert rebuilds(workers) > before
    assert_each_effect_once(len(every), 2)


@DEFAULT_LEASE
async def test_a_redis_restarted_empty_costs_runs_seconds_not_a_lease(
    runtime: Runtime, own_redis: OwnRedis, ledger: None
) -> None:
    """A one-second outage, Redis back empty: runs in execution finish without waiting for
    Redis at all; queued ones, those submitted meanwhile, and those whose durable sleep began
    while Redis was away move on within seconds of it answering; sleeping ones wake on time."""
    runs = Runs(runtime)
    async with two_workers(runtime):
        await runs.start(nap=3.5, nap_when_held=0.3)
        wake_at = await runs.wake_at()
        own_redis.stop(signal.SIGKILL)
        killed = time.time()
        during = [await runs.tenant.start(chain) for _ in range(4)]  # accepted meanwhile
        gates["held"].set()  # the running runs finish, or go to sleep, with Redis away
        await runs.all_in(runs.running, RunStatus.COMPLETED)
        await runs.all_in(runs.napping, RunStatus.SLEEPING)
        await asyncio.sleep(max(0.0, 1.0 - (time.time() - killed)))
        own_redis.start()
        back = time.time()
        every = runs.sleeping + runs.running + runs.napping + runs.queued + during
        assert {await h.result(timeout=20) for h in every} == {"done"}
        for h in runs.running:
            assert ((await h.describe()).finished_at or 0.0) < back
        took = await runs.progress_after(runs.queued + during + runs.napping, back)
        print(f"runs moved on within {took:.2f} s of Redis answering")  # noqa: T201
        assert took <= RECOVERY_BOUND
        woke = await runs.progress_after(runs.sleeping, back)
        assert woke <= max(wake_at - back, 0.0) + RECOVERY_BOUND
    assert_each_effect_once(len(every), 2)


@DEFAULT_LEASE
async def test_duplicates_after_a_loss_execute_no_step_twice(
    runtime: Runtime, own_redis: OwnRedis, ledger: None
) -> None:
    """After a FLUSHALL, every run's message three times over, on top of the rebuild's (as if
    several processes rebuilt the queue at once), while some runs are still being executed:
    the claims in the database decide, and each step's effect happens once."""
    runs = Runs(runtime)
    async with two_workers(runtime):
        await runs.start(nap=1.0, nap_when_held=0.3)
        await flushall(own_redis)
        every = runs.sleeping + runs.running + runs.napping + runs.queued
        for _ in range(3):
            await runtime.queue.enqueue_many({"acme": [Envelope(h.run_id) for h in every]})
        # A third worker, with free slots, takes every message while the held runs still are.
        async with another_worker(runtime):
            await wait_until(lambda: _all_delivered(runtime, "acme"), 10, "every message taken")
            gates["held"].set()
            assert {await h.result(timeout=20) for h in every} == {"done"}
        assert await runs.tenant.store.count_runs(status=RunStatus.COMPLETED) == len(every)
    assert_each_effect_once(len(every), 2)


async def _all_delivered(runtime: Runtime, tenant_id: str) -> bool:
    """Whether the tenant's stream holds nothing but messages in flight."""
    queue = runtime.queue
    assert isinstance(queue, RedisStreamsQueue)
    stream = queue.keys.tenant(tenant_id).stream
    try:
        pending = await queue.redis.xpending(stream, GROUP)
    except redis.exceptions.ResponseError:  # NOGROUP: no dequeue has read the stream yet
        return False
    return int(await queue.redis.xlen(stream)) == int(pending["pending"])


@pytest.mark.parametrize("settings", [{**FAST, "lease_seconds": 4.0}], indirect=True)
async def test_a_run_whose_worker_dies_after_a_loss_recovers_at_its_lease(
    runtime: Runtime, own_redis: OwnRedis, ledger: None, tmp_path: Path
) -> None:
    """The rebuild gives a running run a message due when its lease ends: if its worker dies
    after the loss, that delivery recovers the run then, not the reconciler's grace (twice the
    lease) after."""
    workers = Workers(runtime.settings, tmp_path)
    tenant = Client(durable.app, runtime=runtime).tenant("acme")
    try:
        holder = workers.start(step_seconds=60, concurrency=1)
        handle = await tenant.start(durable.many_steps, 1)

        async def running() -> bool:
            return await handle.status() is RunStatus.RUNNING

        async def has_a_message() -> bool:
            return await runtime.queue.live("acme", [handle.run_id]) == {handle.run_id}

        await wait_until(running, 30, "the run claimed")
        await flushall(own_redis)
        await wait_until(has_a_message, 10, "the queue rebuilt")
        holder.kill()
        holder.wait(10)
        killed = time.time()
        workers.start(step_seconds=0.05)  # sees the data set it rebuilt: no rebuild of its own
        assert await handle.result(timeout=30) == 0
        run = await handle.describe()
        took = (run.finished_at or 0.0) - killed
        print(f"recovered {took:.2f} s after its worker died")  # noqa: T201
        assert run.recoveries == 1
        assert took <= runtime.settings.lease_seconds + 3.0  # the grace alone would be 8 s
    finally:
        workers.stop_all()
    assert set(effects.counts().values()) == {1}
