"""Three worker processes on one PostgreSQL and one Redis, disturbed in every way at once: one
killed with SIGKILL, one frozen with SIGSTOP past its lease and thawed (its late writes and
acknowledgements must change nothing), and Redis emptied mid-load. Every accepted run completes
exactly once in effect."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow import Client, RunStatus, Runtime, Settings
from tests.apps import durable, effects
from tests.conftest import cleanup_production, production_settings
from tests.integration.test_crash import Workers
from tests.integration.test_outbox import wipe_queue

pytestmark = pytest.mark.slow

RUNS, STEPS = 60, 6
CONCURRENCY = 4  # per worker: the load lasts long enough to be disturbed midway


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    settings = production_settings(
        tmp_path, lease_seconds=1.5, poll_interval=0.02, reconcile_interval=0.5
    )
    # Effects in PostgreSQL (the platform database of this test): a worker frozen inside a
    # SQLite write would hold the file's lock and stall the others' steps.
    assert settings.database_url is not None
    monkeypatch.setenv(effects.ENV, settings.database_url)
    yield settings
    cleanup_production(settings)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(settings, tmp_path)
    yield w
    w.stop_all()


async def test_three_workers_kill_stop_and_flush(runtime: Runtime, workers: Workers) -> None:
    assert effects.applied() == []  # creates the tables before the workers race to
    acme = Client(durable.app, runtime=runtime).tenant("acme")
    globex = Client(durable.app, runtime=runtime).tenant("globex")
    handles = [await (acme if i % 2 else globex).start(durable.ledger, STEPS) for i in range(RUNS)]
    procs = [workers.start(step_seconds=0.2, concurrency=CONCURRENCY) for _ in range(3)]

    async def progress() -> int:
        return len(effects.applied())

    async def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while await progress() < n:
            assert time.monotonic() < deadline, f"only {await progress()} effects after 60 s"
            await asyncio.sleep(0.05)

    await wait_for(20)
    frozen = procs[1]
    procs[0].send_signal(signal.SIGKILL)  # a crash
    frozen.send_signal(signal.SIGSTOP)  # a long pause: its leases lapse meanwhile
    held = await owned_by(runtime, frozen.pid)
    assert held, "the frozen worker held no run"

    async def taken_over() -> bool:
        return not (await owned_by(runtime, frozen.pid)) & held

    deadline = time.monotonic() + 30
    while not await taken_over():  # the others reclaim its messages and claim its runs
        assert time.monotonic() < deadline, "the frozen worker's runs were never taken over"
        await asyncio.sleep(0.05)
    done_before_wipe = await progress()
    assert done_before_wipe < RUNS * STEPS * 4 // 5, done_before_wipe  # mid-load
    await wipe_queue(runtime)  # Redis loses everything mid-load
    frozen.send_signal(signal.SIGCONT)  # back, with stale leases and receipts
    workers.start(step_seconds=0.2, concurrency=CONCURRENCY)  # a replacement for the killed one

    results = [await h.result(timeout=120) for h in handles]
    assert results == [sum(range(STEPS))] * RUNS

    keys = {f"{h.run_id}:{seq}" for h in handles for seq in range(STEPS)}
    assert sorted(effects.applied()) == sorted(keys)  # every step took effect, once
    executions = Counter(effects.counts())
    assert set(executions) == keys
    # At least once: a step in flight during a disturbance may have run twice, no more
    # than once per disturbance.
    assert max(executions.values()) <= 3, executions.most_common(5)
    recoveries = 0
    for h in handles:
        run = await h.describe()
        recoveries += run.recoveries
        assert run.status is RunStatus.COMPLETED
        steps = await h.steps()
        assert [s.seq for s in steps] == list(range(STEPS))
        assert all(s.attempts == 1 for s in steps)
    assert recoveries >= 2, recoveries  # the killed and the frozen worker's runs were taken over
    assert frozen.poll() is None  # the thawed worker lives on, fenced, not crashed
    assert "lease lost" in (workers.tmp_path / "worker1.log").read_text()


async def owned_by(runtime: Runtime, pid: int) -> set[str]:
    """Runs whose lease a worker process holds (its owner id carries its pid)."""
    held: set[str] = set()
    for tenant in ("acme", "globex"):
        for run in await runtime.router.store(tenant).list_runs(
            status=RunStatus.RUNNING, limit=1000
        ):
            owner = await lease_owner(runtime, tenant, run.id)
            if owner is not None and f"-{pid}-" in owner:
                held.add(run.id)
    return held


async def lease_owner(runtime: Runtime, tenant: str, run_id: str) -> str | None:
    from tenantflow.store.sql import SqlRunStore

    store = runtime.router.store(tenant)
    assert isinstance(store, SqlRunStore)
    async with store.db.autocommit() as tx:
        row = await tx.one("SELECT lease_owner FROM runs WHERE id = ?", (run_id,))
    return None if row is None else row[0]
