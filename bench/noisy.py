"""Noisy neighbour: tenant A has a flood of runs queued, and while a worker is busy with it
tenant B submits a few. Fair scheduling must finish B's runs long before A's backlog, and keep
B's start latency near what it is on an idle system.

    python -m bench.noisy [--a-runs 20000] [--b-runs 100]

Needs the PostgreSQL and Redis of this machine (TENANTFLOW_TEST_POSTGRES_URL,
TENANTFLOW_TEST_REDIS_URL); creates and drops its own databases and keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.conftest import running_worker

from tenantflow import App, Client, RunStatus, Runtime, Settings, WorkflowContext
from tenantflow.engine.executor import encode_input
from tenantflow.sdk.client import new_run_id
from tenantflow.store.records import RunRecord
from tenantflow.store.sql import SQL_INSERT_RUN, SqlRunStore

app = App("noisy")
A_SERVED_FIRST = 100  # B arrives once the worker has completed this many of A's runs


@app.step
async def noop(i: int) -> int:
    return i


@app.workflow
async def job(ctx: WorkflowContext, i: int) -> int:
    return await noop(i)


@dataclass
class NoisyReport:
    a_backlog: int
    b_runs: int
    a_completed_when_b_done: int
    b_seconds: float
    idle_p50_ms: float
    idle_p99_ms: float
    loaded_p50_ms: float
    loaded_p99_ms: float


def _percentiles(runs: list[RunRecord]) -> tuple[float, float]:
    waits = sorted(1000 * (r.started_at - r.created_at) for r in runs if r.started_at)
    q = statistics.quantiles(waits, n=100, method="inclusive")
    return round(q[49], 2), round(q[98], 2)


async def flood(runtime: Runtime, tenant_id: str, n: int) -> None:
    """Queue ``n`` runs fast: one multi-row insert, then pipelined enqueues."""
    store = runtime.router.store(tenant_id)
    assert isinstance(store, SqlRunStore)
    now = time.time()
    rows = [
        (
            new_run_id(),
            job.name,
            encode_input(job, (i,), {}),
            None,
            None,
            0,
            None,
            10,
            now,
            now,
            None,
        )
        for i in range(n)
    ]
    async with store.db.transaction() as tx:
        await tx.many(SQL_INSERT_RUN, rows)
    for row in rows:
        await runtime.queue.enqueue(tenant_id, row[0])


async def wait_all(client: Client, tenant_id: str, n: int, timeout: float = 120) -> None:
    store = client.runtime.router.store(tenant_id)
    deadline = time.monotonic() + timeout
    while await store.count_runs(status=RunStatus.COMPLETED) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tenant_id}: runs still unfinished after {timeout} s")
        await asyncio.sleep(0.02)


async def run_noisy(
    settings: Settings, *, a_runs: int, b_runs: int, concurrency: int = 32
) -> NoisyReport:
    runtime = Runtime(settings)
    for tenant in ("tenant-a", "tenant-b", "tenant-b-idle"):
        runtime.registry.ensure(tenant)
    client = Client(app, runtime=runtime)
    try:
        # B alone, on an idle system: the baseline.
        async with running_worker(app, runtime, concurrency=concurrency):
            idle = client.tenant("tenant-b-idle")
            for i in range(b_runs):
                await idle.start(job, i)
            await wait_all(client, "tenant-b-idle", b_runs)
        idle_runs = await idle.list_runs(limit=1000)

        # A's backlog is queued; then the worker starts, and once it is busy with A (its
        # view of the active tenants taken without B), B submits the same burst.
        await flood(runtime, "tenant-a", a_runs)
        async with running_worker(app, runtime, concurrency=concurrency):
            a_store = runtime.router.store("tenant-a")
            while await a_store.count_runs(status=RunStatus.COMPLETED) < A_SERVED_FIRST:
                await asyncio.sleep(0.005)
            b = client.tenant("tenant-b")
            started = time.monotonic()
            for i in range(b_runs):
                await b.start(job, i)
            await wait_all(client, "tenant-b", b_runs)
            b_seconds = time.monotonic() - started
            a_done = await runtime.router.store("tenant-a").count_runs(status=RunStatus.COMPLETED)
        loaded_runs = await b.list_runs(limit=1000)
    finally:
        await runtime.close()
    idle_p50, idle_p99 = _percentiles(idle_runs)
    loaded_p50, loaded_p99 = _percentiles(loaded_runs)
    return NoisyReport(
        a_backlog=a_runs,
        b_runs=b_runs,
        a_completed_when_b_done=a_done,
        b_seconds=round(b_seconds, 2),
        idle_p50_ms=idle_p50,
        idle_p99_ms=idle_p99,
        loaded_p50_ms=loaded_p50,
        loaded_p99_ms=loaded_p99,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a-runs", type=int, default=20_000)
    parser.add_argument("--b-runs", type=int, default=100)
    args = parser.parse_args()
    from tests.conftest import cleanup_production, production_settings

    with tempfile.TemporaryDirectory() as folder:
        settings = production_settings(Path(folder), log_level="WARNING")
        from tenantflow.telemetry.logging import configure_logging

        configure_logging("WARNING")
        try:
            report = asyncio.run(run_noisy(settings, a_runs=args.a_runs, b_runs=args.b_runs))
        finally:
            cleanup_production(settings)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
