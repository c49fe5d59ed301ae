"""Nothing tenantflow itself calls waits forever: a Redis that hangs (SIGSTOP) fails each
command within its timeout and a worker goes on; a PostgreSQL statement stuck behind a lock
ends at the statement timeout; and a process frozen in the middle of a transaction loses its
session (and its locks) instead of holding every other worker up."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis.exceptions

from tenantflow import Client, Runtime, Settings
from tenantflow.queue.redis_streams import RedisStreamsQueue
from tenantflow.store.db import PostgresDatabase
from tenantflow.store.sql import SqlRunStore
from tests.apps import api as workflows
from tests.conftest import cleanup_production, production_settings, running_worker
from tests.integration.test_redis_outage import own_redis
from tests.servers import OwnRedis

__all__ = ["own_redis"]  # a fixture, used by name
pytestmark = pytest.mark.slow
TIMEOUT = 0.5


@pytest.fixture
def settings(tmp_path: Path, own_redis: OwnRedis) -> Iterator[Settings]:
    settings = production_settings(
        tmp_path,
        queue_url=own_redis.url,
        redis_timeout_seconds=TIMEOUT,
        database_timeout_seconds=1.0,
        poll_interval=0.02,
    )
    yield settings
    cleanup_production(settings)


async def test_a_hung_redis_fails_each_call_within_the_timeout(
    settings: Settings, own_redis: OwnRedis
) -> None:
    queue = RedisStreamsQueue(own_redis.url, prefix="hang", timeout=TIMEOUT)
    assert own_redis.proc is not None
    try:
        await queue.enqueue("t", "r1")
        own_redis.proc.send_signal(signal.SIGSTOP)  # alive, listening, never answering
        for call in (queue.depth("t"), queue.dequeue("c", 1, 5.0), queue.enqueue("t", "r2")):
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await call
            assert time.monotonic() - started < TIMEOUT + 1.0
        started = time.monotonic()
        await queue.wait(0.1)  # a blocking wait on a hung server returns too
        assert time.monotonic() - started < TIMEOUT + 1.5
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        await queue.close()


async def test_a_worker_outlives_a_hung_redis(settings: Settings, own_redis: OwnRedis) -> None:
    runtime = Runtime(settings)
    assert own_redis.proc is not None
    try:
        runtime.registry.create("acme")
        tenant = Client(workflows.app, runtime=runtime).tenant("acme")
        async with running_worker(workflows.app, runtime) as worker:
            assert await (await tenant.start(workflows.greet, "a")).result(timeout=30)
            own_redis.proc.send_signal(signal.SIGSTOP)
            late = await tenant.start(workflows.greet, "b")  # committed; its message waits
            await asyncio.sleep(3 * TIMEOUT)
            own_redis.proc.send_signal(signal.SIGCONT)
            assert await late.result(timeout=30) == "hello b"
            assert not worker.stopping
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        await runtime.close()


async def test_postgresql_sessions_never_wait_forever(settings: Settings) -> None:
    runtime = Runtime(settings)
    try:
        runtime.registry.create("acme")
        handle = (
            await Client(workflows.app, runtime=runtime).tenant("acme").start(workflows.greet, "x")
        )
        store = runtime.router.store("acme")
        assert isinstance(store, SqlRunStore) and isinstance(store.db, PostgresDatabase)
        db = store.db

        # A statement that runs too long ends at the statement timeout.
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            async with db.autocommit() as tx:
                await tx.one("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 3

        # A holder frozen mid-transaction, with the run's row locked: its session ends after
        # the idle timeout and another session's write goes through, instead of waiting on.
        frozen = asyncio.Event()

        async def freeze_holding_the_lock() -> None:
            async with db.transaction() as tx:
                await tx.one("SELECT id FROM runs WHERE id = ? FOR UPDATE", (handle.run_id,))
                frozen.set()
                await asyncio.sleep(10)  # the process stops answering here

        holder = asyncio.create_task(freeze_holding_the_lock())
        await frozen.wait()
        started = time.monotonic()
        async with db.autocommit() as tx:
            changed = await tx.run("UPDATE runs SET priority = 7 WHERE id = ?", (handle.run_id,))
        assert changed == 1
        assert time.monotonic() - started < 5
        holder.cancel()
        with pytest.raises((asyncio.CancelledError, psycopg.Error)):
            await holder
    finally:
        await runtime.close()
