"""Redis goes away and comes back empty: submits keep being accepted (durably, in each tenant's
database), workers keep running, and every run completes once Redis is back.

The test starts a redis-server of its own on a free loopback port, so it can kill it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow import App, Client, RunStatus, Runtime, Settings, WorkflowContext
from tests.conftest import cleanup_production, production_settings, running_worker
from tests.servers import OwnRedis

pytestmark = pytest.mark.slow
app = App("outage-tests")


@app.step
async def work(i: int) -> int:
    await asyncio.sleep(0.05)
    return i


@app.workflow
async def job(ctx: WorkflowContext, i: int) -> int:
    return await work(i)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def settings(tmp_path: Path, own_redis: OwnRedis) -> Iterator[Settings]:
    settings = production_settings(
        tmp_path,
        queue_url=own_redis.url,
        lease_seconds=2.0,
        poll_interval=0.02,
        reconcile_interval=0.5,
    )
    yield settings
    cleanup_production(settings)


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
