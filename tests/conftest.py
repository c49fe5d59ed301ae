from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tenantflow import App, Runtime, Settings, Worker


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", lease_seconds=2.0, poll_interval=0.02, shutdown_grace_seconds=2.0
    )


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    rt.registry.create("acme")
    rt.registry.create("globex")
    yield rt
    await rt.close()


@contextlib.asynccontextmanager
async def running_worker(
    app: App, runtime: Runtime, *, concurrency: int | None = None
) -> AsyncIterator[Worker]:
    """A worker on the test's event loop, stopped (gracefully) at the end of the block."""
    worker = Worker(app, runtime, concurrency=concurrency)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
