"""Noisy neighbour: tenant A has a flood of runs queued, and while a worker is busy with it
tenant B submits a few. Fair scheduling must finish B's runs long before A's backlog, and keep
B's start latency near what it is on an idle system.

    python -m bench.noisy [--a-runs 20000] [--b-runs 100] [--rounds 1] [--worker-process]

Each round measures B alone on an idle system (the baseline), then B under A's flood, with
fresh tenants; figures are medians over the rounds. With ``--worker-process`` the worker is a
``tenantflow worker`` process of its own, as in production, so that B's submits do not share
an event loop with A's runs. B's start latency (``started_at - created_at``) is split into the
submit (until ``start()`` returned) and the rest (publish, dispatch and claim).

Needs the PostgreSQL and Redis of this machine (TENANTFLOW_TEST_POSTGRES_URL,
TENANTFLOW_TEST_REDIS_URL); creates and drops its own databases and keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.conftest import running_worker, settings_env

from tenantflow import App, Client, RunStatus, Runtime, Settings, WorkflowContext
from tenantflow.client import new_run_id
from tenantflow.engine.steps import encode_input
from tenantflow.queue.base import Envelope
from tenantflow.store.queries import Q
from tenantflow.store.sql import SqlRunStore

ROOT = Path(__file__).parents[1]
app = App("noisy")
A_SERVED_FIRST = 100  # B arrives once the worker has completed this many of A's runs
CONCURRENCY = 32


@app.step
async def noop(i: int) -> int:
    return i


@app.workflow
async def job(ctx: WorkflowContext, i: int) -> int:
    return await noop(i)


@dataclass
class Burst:
    """B's runs of one phase: start latency, and the part of it spent in ``start()``."""

    p50_ms: float
    p99_ms: float
    submit_p50_ms: float
    after_submit_p50_ms: float


@dataclass
class Round:
    idle: Burst
    loaded: Burst
    a_completed_when_b_done: int
    b_seconds: float


@dataclass
class NoisyReport:
    a_backlog: int
    b_runs: int
    worker_process: bool
    a_completed_when_b_done: int
    b_seconds: float
    idle_p50_ms: float
    idle_p99_ms: float
    loaded_p50_ms: float
    loaded_p99_ms: float
    ratio_p50: float
    ratio_p99: float
    rounds: list[Round] = field(default_factory=list)


def _quantile(values: list[float], q: int) -> float:
    return round(statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1], 2)


async def burst(client: Client, tenant_id: str, n: int, interval: float = 0.0) -> Burst:
    """``n`` runs started one after the other, ``interval`` seconds apart, as a small
    tenant's requests come."""
    tenant = client.tenant(tenant_id)
    returned: dict[str, float] = {}
    submits: list[float] = []
    for i in range(n):
        if i and interval:
            await asyncio.sleep(interval)
        began = time.time()
        handle = await tenant.start(job, i)
        returned[handle.run_id] = time.time()
        submits.append(1000 * (returned[handle.run_id] - began))
    await wait_all(client, tenant_id, n)
    runs = await tenant.list_runs(limit=n)
    waits = [1000 * (r.started_at - r.created_at) for r in runs if r.started_at]
    after = [1000 * (r.started_at - returned[r.id]) for r in runs if r.started_at]
    return Burst(
        p50_ms=_quantile(waits, 50),
        p99_ms=_quantile(waits, 99),
        submit_p50_ms=_quantile(submits, 50),
        after_submit_p50_ms=_quantile(after, 50),
    )


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
        await tx.many(Q["insert_run"], rows)
    await runtime.marks.note(tenant_id)
    # In batches, so that the backlog is there before a running worker has served much of it.
    for i in range(0, n, 1000):
        await runtime.queue.enqueue_many({tenant_id: [Envelope(r[0]) for r in rows[i : i + 1000]]})


async def completed(runtime: Runtime, tenant_id: str) -> int:
    return await runtime.router.store(tenant_id).count_runs(status=RunStatus.COMPLETED)


async def wait_all(client: Client, tenant_id: str, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while await completed(client.runtime, tenant_id) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tenant_id}: runs still unfinished after {timeout} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def worker_process(settings: Settings, folder: Path, concurrency: int) -> AsyncIterator[None]:
    """``tenantflow worker`` serving this module's app, stopped with SIGTERM at the end."""
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    env["TENANTFLOW_LOG_LEVEL"] = "WARNING"
    command = [sys.executable, "-m", "tenantflow", "worker", "--app", "bench.noisy:app"]
    with (folder / "worker.log").open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--concurrency", str(concurrency)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_noisy(
    settings: Settings,
    *,
    a_runs: int,
    b_runs: int,
    rounds: int = 1,
    separate_worker: bool = False,
    folder: Path | None = None,
    concurrency: int = CONCURRENCY,
    b_interval: float = 0.0,
) -> NoisyReport:
    runtime = Runtime(settings)
    names = [(f"idle-{r}", f"tenant-a-{r}", f"tenant-b-{r}") for r in range(rounds)]
    for tenants in [("warm-up",), *names]:
        for tenant in tenants:
            runtime.registry.ensure(tenant)
    client = Client(app, runtime=runtime)
    results: list[Round] = []
    try:
        if separate_worker:
            assert folder is not None, "a worker process needs a folder for its log"
            serving = worker_process(settings, folder, concurrency)
        else:
            serving = running_worker(app, runtime, concurrency=concurrency)  # type: ignore[assignment]
        async with serving:
            await burst(client, "warm-up", 2)  # the worker is up and serving
            for r, (idle_tenant, a, b) in enumerate(names):
                idle = await burst(client, idle_tenant, b_runs, b_interval)
                # A's backlog is queued; once the worker is busy with it, B submits the
                # same burst as its idle twin did.
                await flood(runtime, a, a_runs)
                while await completed(runtime, a) < A_SERVED_FIRST:
                    await asyncio.sleep(0.005)
                started = time.monotonic()
                loaded = await burst(client, b, b_runs, b_interval)
                b_seconds = time.monotonic() - started
                a_done = await completed(runtime, a)
                results.append(Round(idle, loaded, a_done, round(b_seconds, 2)))
                if r + 1 < rounds:  # the next round's baseline is on an idle system again
                    await wait_all(client, a, a_runs, timeout=600)
    finally:
        await runtime.close()

    def median(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    idle_p50 = median([x.idle.p50_ms for x in results])
    idle_p99 = median([x.idle.p99_ms for x in results])
    loaded_p50 = median([x.loaded.p50_ms for x in results])
    loaded_p99 = median([x.loaded.p99_ms for x in results])
    return NoisyReport(
        a_backlog=a_runs,
        b_runs=b_runs,
        worker_process=separate_worker,
        a_completed_when_b_done=round(
            statistics.median(x.a_completed_when_b_done for x in results)
        ),
        b_seconds=median([x.b_seconds for x in results]),
        idle_p50_ms=idle_p50,
        idle_p99_ms=idle_p99,
        loaded_p50_ms=loaded_p50,
        loaded_p99_ms=loaded_p99,
        ratio_p50=median([x.loaded.p50_ms / x.idle.p50_ms for x in results]),
        ratio_p99=median([x.loaded.p99_ms / x.idle.p99_ms for x in results]),
        rounds=results,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a-runs", type=int, default=20_000)
    parser.add_argument("--b-runs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--b-interval-ms", type=float, default=0.0)
    parser.add_argument(
        "--worker-process", action="store_true", help="serve from a `tenantflow worker` process"
    )
    args = parser.parse_args()
    from tests.conftest import cleanup_production, production_settings

    with tempfile.TemporaryDirectory() as folder:
        settings = production_settings(Path(folder), log_level="WARNING")
        from tenantflow.telemetry.logging import configure_logging

        configure_logging("WARNING")
        try:
            report = asyncio.run(
                run_noisy(
                    settings,
                    a_runs=args.a_runs,
                    b_runs=args.b_runs,
                    rounds=args.rounds,
                    separate_worker=args.worker_process,
                    concurrency=args.concurrency,
                    b_interval=args.b_interval_ms / 1000,
                    folder=Path(folder),
                )
            )
        finally:
            cleanup_production(settings)
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
