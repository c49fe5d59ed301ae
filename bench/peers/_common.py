"""Shared by the peer benchmarks: one measurement protocol for every system.

Every system runs the same no-op task, which records into Redis (db 15, keys under a run
uid) the moment it started and the moment it was enqueued (passed as an argument):

- throughput: P worker processes are started and left to go idle; then the harness enqueues N
  tasks from one process as fast as the library's client allows, and the clock runs from the
  first enqueue to the N-th completion recorded (end to end);
- latency: the same idle workers; the harness enqueues one task every 20 ms, 200 times;
  enqueue-to-start latency is (start time - enqueue time) of each, p50 and p99.

With ``--steps K`` (durable-workflow systems: tenantflow, DBOS) each workflow runs K steps
and records at its first; ``rate`` then counts steps per second (N workflows x K / time).

Each measurement is preceded by a warm-up of 50 tasks, not timed.

With ``--producers K`` the throughput phase enqueues from K concurrent producers in the one
process (K threads calling a blocking client, K coroutines awaiting an async one), N/K tasks
each: an API server submitting for concurrent requests, rather than one loop. A client's own
connection pool may let fewer than K of them talk to its server at once (the library's
default pool, as an application would have it).

A module runs as ``python -m bench.peers.<system> --mode throughput|latency --n N
--processes P`` and prints one JSON line: {"system", "mode", "n", "processes", "rate",
"p50_ms", "p99_ms"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

REDIS_URL = os.environ.get("TENANTFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "TENANTFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
METRICS_DB = 15
WARMUP_TASKS = 50
LATENCY_TASKS = 200
LATENCY_PAUSE = 0.02  # the recorder's Redis database, apart from the brokers' keys
ROOT = Path(__file__).resolve().parents[2]


def metrics_client() -> redis.Redis:
    base = REDIS_URL.rsplit("/", 1)[0]
    return redis.Redis.from_url(f"{base}/{METRICS_DB}")


def record(run_uid: str, enqueued_at: float, *, done: bool = True) -> None:
    """Call at the start of the task body: stores the enqueue-to-start latency (and counts the
    task done, unless ``done=False``: then call ``mark_done`` at its end)."""
    started = time.time()
    client = _recorder()
    pipe = client.pipeline(transaction=False)
    pipe.rpush(f"peerbench:{run_uid}:lat", started - enqueued_at)
    if done:
        pipe.incr(f"peerbench:{run_uid}:done")
    pipe.execute()


def mark_done(run_uid: str) -> None:
    _recorder().incr(f"peerbench:{run_uid}:done")


_client: redis.Redis | None = None


def _recorder() -> redis.Redis:
    global _client
    if _client is None:
        _client = metrics_client()
    return _client


@dataclass
class Result:
    system: str
    mode: str
    n: int
    processes: int
    rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    # Throughput mode: how fast the producer enqueued (tasks/s), which tells whether the
    # producer or the workers set ``rate``.
    send_rate: float | None = None
    producers: int = 1

    def print(self) -> None:
        print(json.dumps(self.__dict__))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=1, help="steps per workflow (durable-workflow systems only)"
    )
    parser.add_argument(
        "--producers",
        type=_positive,
        default=1,
        help="throughput mode: enqueue from this many concurrent producers of one process "
        "(threads for a blocking client, coroutines for an async one), as an API server "
        "serving concurrent requests does",
    )
    return parser.parse_args()


def new_uid() -> str:
    return uuid.uuid4().hex[:12]


def wait_done(run_uid: str, n: int, timeout: float = 300) -> float:
    """Block until ``n`` completions were recorded; returns the time of the last check."""
    client = metrics_client()
    deadline = time.monotonic() + timeout
    key = f"peerbench:{run_uid}:done"
    while int(client.get(key) or 0) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{int(client.get(key) or 0)}/{n} done after {timeout} s")
        time.sleep(0.002)
    return time.perf_counter()


def latencies_ms(run_uid: str) -> tuple[float, float]:
    client = metrics_client()
    values = sorted(1000 * float(v) for v in client.lrange(f"peerbench:{run_uid}:lat", 0, -1))
    q = statistics.quantiles(values, n=100, method="inclusive")
    return round(q[49], 2), round(q[98], 2)


def cleanup(run_uid: str) -> None:
    client = metrics_client()
    client.delete(f"peerbench:{run_uid}:lat", f"peerbench:{run_uid}:done")


def start_workers(
    argv: Sequence[str],
    processes: int,
    env: dict[str, str] | None = None,
    count: int = 1,
    cwd: Path | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` copies of a worker command (stdout/stderr discarded)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return [
        subprocess.Popen(
            list(argv),
            env=full_env,
            cwd=cwd or ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


# (run uid, how many, pause between, concurrent producers) -> sent
Send = Callable[[str, int, float, int], None]


def shares(count: int, producers: int) -> list[int]:
    """``count`` tasks split over ``producers`` as evenly as possible."""
    return [count // producers + (1 if i < count % producers else 0) for i in range(producers)]


def measure(
    system: str,
    args: argparse.Namespace,
    enqueue: Callable[[str, float], Any],
    warm: Callable[[], None] | None = None,
) -> Result:
    """Run the protocol with workers already started: ``enqueue(run_uid, now)`` sends one
    task that calls ``record(run_uid, now)``."""

    def send_one_by_one(uid: str, count: int, pause: float) -> None:
        for _ in range(count):
            enqueue(uid, time.time())
            if pause:
                time.sleep(pause)

    def send(uid: str, count: int, pause: float, producers: int) -> None:
        if producers == 1:
            send_one_by_one(uid, count, pause)
            return
        errors: list[BaseException] = []

        def producer(share: int) -> None:
            try:
                send_one_by_one(uid, share, pause)
            except BaseException as exc:  # re-raised below, not left to time out the wait
                errors.append(exc)

        threads = [
            threading.Thread(target=producer, args=(share,)) for share in shares(count, producers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    if warm is not None:
        warm()
    return _protocol(system, args, send)


def measure_async(
    system: str,
    args: argparse.Namespace,
    enqueue: Callable[[str, float], Awaitable[Any]],
    loop: asyncio.AbstractEventLoop,
    *,
    settle: Callable[[], Awaitable[Any]] | None = None,
) -> Result:
    """``measure`` for a library whose client is async: each phase's enqueue loop runs as one
    coroutine on ``loop``, as an asyncio application would drive the client. The loop stops
    between phases, which a running application's never does: ``settle`` lets a client
    finish the work it does in the background (inside the timed phase)."""

    async def one_by_one(uid: str, count: int, pause: float) -> None:
        for _ in range(count):
            await enqueue(uid, time.time())
            if pause:
                await asyncio.sleep(pause)

    async def sender(uid: str, count: int, pause: float, producers: int) -> None:
        await asyncio.gather(*(one_by_one(uid, share, pause) for share in shares(count, producers)))
        if settle is not None:
            await settle()

    def send(uid: str, count: int, pause: float, producers: int) -> None:
        loop.run_until_complete(sender(uid, count, pause, producers))

    return _protocol(system, args, send)


def _protocol(system: str, args: argparse.Namespace, send: Send) -> Result:
    # Warm-up, the same for every system: connections opened, code paths and caches hot.
    warm_uid = new_uid()
    try:
        # As many producers as the timed phase will have: their connections open here.
        send(warm_uid, WARMUP_TASKS, 0.0, args.producers if args.mode == "throughput" else 1)
        wait_done(warm_uid, WARMUP_TASKS, timeout=120)
    finally:
        cleanup(warm_uid)
    uid = new_uid()
    try:
        if args.mode == "throughput":
            started = time.perf_counter()
            send(uid, args.n, 0.0, args.producers)
            sent = time.perf_counter()
            done = wait_done(uid, args.n)
            rate = args.n * getattr(args, "steps", 1) / (done - started)
            p50, p99 = latencies_ms(uid)
            send_rate = round(args.n / (sent - started), 1)
            return Result(
                system,
                args.mode,
                args.n,
                args.processes,
                round(rate, 1),
                p50,
                p99,
                send_rate,
                args.producers,
            )
        send(uid, LATENCY_TASKS, LATENCY_PAUSE, 1)
        wait_done(uid, LATENCY_TASKS)
        p50, p99 = latencies_ms(uid)
        return Result(system, args.mode, LATENCY_TASKS, args.processes, None, p50, p99)
    finally:
        cleanup(uid)


def flush_redis_db(db: int) -> None:
    """Delete every key of one broker database, never the tenantflow (0) or metrics one."""
    assert db not in (0, METRICS_DB)
    base = REDIS_URL.rsplit("/", 1)[0]
    client = redis.Redis.from_url(f"{base}/{db}")
    try:
        client.flushdb()
    finally:
        client.close()


def create_database(name: str) -> str:
    """A fresh PostgreSQL database of this benchmark's own; returns its URL."""
    import psycopg
    from psycopg import sql

    from tenantflow.platform.provision import with_database

    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(POSTGRES_URL, name)


def drop_database(name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def wait_idle(seconds: float = 3.0) -> None:
    """Let freshly started workers finish booting."""
    time.sleep(seconds)


def python() -> str:
    return sys.executable
