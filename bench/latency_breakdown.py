"""Where tenantflow's enqueue-to-start latency goes, on PostgreSQL + Redis.

    python -m bench.latency_breakdown [--n 250]

The peer protocol's latency mode (one single-step run every 20 ms to an idle worker process),
with the client side timed in parts: the submit's commit (``start()`` returning), then the
message's publication (``published()`` returning). The rest, up to the step's first line, is
the worker's: woken, dequeue, claim, step. Medians and p99 in milliseconds; the first 50 runs
are warm-up. Then the machine's floor: bare round trips and a durable commit, after the same
idleness (``durable_run_floor_ms``: the sum of the medians a durable run must wait for).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.peers import _common
from bench.peers.tenantflow_pg import app, start_workers, task
from tenantflow import Client, Runtime

WARMUP = 50
PAUSE = 0.02


def quantiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return round(q[49], 2), round(q[98], 2)


async def measure(n: int, folder: Path) -> dict[str, tuple[float, float]]:
    from tests.conftest import cleanup_production, production_settings

    settings = production_settings(folder, log_level="WARNING")
    runtime = Runtime(settings)
    procs = []
    try:
        runtime.registry.create("bench")
        procs = start_workers(settings, 1)
        _common.wait_idle()
        tenant = Client(app, runtime=runtime).tenant("bench")
        uid = _common.new_uid()
        commit: list[float] = []
        publish: list[float] = []
        for _ in range(n + WARMUP):
            t0 = time.time()
            await tenant.start(task, uid, t0, 1)
            t1 = time.time()
            await runtime.outbox.published()
            t2 = time.time()
            commit.append(1000 * (t1 - t0))
            publish.append(1000 * (t2 - t1))
            await asyncio.sleep(PAUSE)
        _common.wait_done(uid, n + WARMUP)
        total = [
            1000 * float(v) for v in _common.metrics_client().lrange(f"peerbench:{uid}:lat", 0, -1)
        ]
        _common.cleanup(uid)
        return {
            "submit_commit_ms": quantiles(commit[WARMUP:]),
            "publish_ms": quantiles(publish[WARMUP:]),
            "enqueue_to_start_ms": quantiles(total[WARMUP:]),
        }
    finally:
        _common.stop_workers(procs)
        await runtime.close()
        cleanup_production(settings)


async def floor(n: int) -> dict[str, tuple[float, float]]:
    """The machine's own round trips after the same 20 ms of idleness, without tenantflow: a
    PostgreSQL round trip, a durable commit (one row, fsync'd), a Redis round trip. A durable
    run cannot start faster than a durable commit, the message's way to the worker through
    Redis, one dequeue from Redis and one claim in PostgreSQL."""
    import psycopg
    import redis.asyncio as aioredis

    pg = await psycopg.AsyncConnection.connect(_common.POSTGRES_URL, autocommit=True)
    rds = aioredis.Redis.from_url(_common.REDIS_URL)
    table = f"bench_floor_{_common.new_uid()}"
    await pg.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, at float8)")
    parts: dict[str, list[float]] = {"pg_round_trip_ms": [], "pg_commit_ms": [], "redis_ms": []}
    try:
        for _ in range(n + WARMUP):
            for name, call in (
                ("pg_round_trip_ms", lambda: pg.execute("SELECT 1")),
                ("pg_commit_ms", lambda: pg.execute(f"INSERT INTO {table} (at) VALUES (1)")),
                ("redis_ms", rds.ping),
            ):
                await asyncio.sleep(PAUSE)
                t0 = time.perf_counter()
                await call()
                parts[name].append(1000 * (time.perf_counter() - t0))
    finally:
        await pg.execute(f"DROP TABLE {table}")
        await pg.close()
        await rds.aclose()
    out = {name: quantiles(values[WARMUP:]) for name, values in parts.items()}
    p50 = {name: q[0] for name, q in out.items()}
    least = p50["pg_commit_ms"] + 2 * p50["redis_ms"] + p50["pg_round_trip_ms"]
    out["durable_run_floor_ms"] = (round(least, 2), float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(measure(args.n, Path(folder)))
    result.update(asyncio.run(floor(args.n)))
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "n": args.n, "p50_p99": result}))


if __name__ == "__main__":
    main()
