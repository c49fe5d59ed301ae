"""Worker bookkeeping on Redis Streams, where message ids are unique per tenant only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow import App, Client, RunStatus, Runtime, Settings, WorkflowContext
from tenantflow.queue.redis_streams import RedisStreamsQueue
from tests.conftest import cleanup_production, production_settings, running_worker

app = App("worker-redis-tests")
release = asyncio.Event()


@app.step
async def hold() -> None:
    await release.wait()


@app.workflow
async def held(ctx: WorkflowContext) -> None:
    await hold()


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = production_settings(tmp_path)
    yield settings
    cleanup_production(settings)


async def test_same_message_id_in_two_tenants_is_two_runs_in_flight(runtime: Runtime) -> None:
    queue = runtime.queue
    assert isinstance(queue, RedisStreamsQueue)
    release.clear()
    runs = {}
    for tenant in ("acme", "globex"):
        handle = await Client(app, runtime=runtime).tenant(tenant).start(held)
        runs[tenant] = handle
    await runtime.outbox.published()  # the messages are sent in the background: not after the DEL
    # Replace each tenant's message by one with the same explicit stream id in both streams
    # (two XADDs in the same millisecond get the same id anyway).
    for tenant, handle in runs.items():
        keys = queue.keys.tenant(tenant)
        await queue.redis.delete(keys.stream)
        await queue.redis.xadd(keys.stream, {"run": handle.run_id, "p": 0, "d": 0}, id="1-1")
    async with running_worker(app, runtime) as worker:
        deadline = time.monotonic() + 10
        while len(worker._inflight) < 2:
            assert time.monotonic() < deadline, worker._inflight
            await asyncio.sleep(0.01)
        assert {message.tenant_id for message in worker._inflight} == {"acme", "globex"}
        release.set()
        for handle in runs.values():
            await handle.result(timeout=10)
    for handle in runs.values():
        assert await handle.status() is RunStatus.COMPLETED
