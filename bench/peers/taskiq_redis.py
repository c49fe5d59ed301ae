"""taskiq with taskiq-redis's ``RedisStreamBroker``, in the peer protocol (see ``_common``): a
plain task (no result backend) whose body records its start.

Workers: ``taskiq worker bench.peers.taskiq_redis:broker --workers P``. The broker keeps its
stream in Redis db 4, which this module owns: it is flushed before and after a run (``FLUSHDB``
on db 4 only).

taskiq is an optional install, absent when mypy runs in CI: it is imported at run time through
``importlib``, and ``broker`` is built on first access (the module ``__getattr__``), so that
importing this module or type-checking it needs no taskiq.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.peers import _common

BROKER_DB = 4
QUEUE_NAME = "peerbench"
TASK_NAME = "peerbench.mark"


def broker_url() -> str:
    base = _common.REDIS_URL.rsplit("/", 1)[0]
    return f"{base}/{BROKER_DB}"


def mark(run_uid: str, enqueued_at: float) -> None:
    _common.record(run_uid, enqueued_at)


@functools.cache
def _build() -> tuple[Any, Any]:
    """The broker and the task registered on it (the same in the harness and the workers)."""
    taskiq_redis = importlib.import_module("taskiq_redis")
    broker = taskiq_redis.RedisStreamBroker(broker_url(), queue_name=QUEUE_NAME)
    task = broker.task(task_name=TASK_NAME)(mark)
    return broker, task


def __getattr__(name: str) -> Any:
    if name == "broker":
        return _build()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def flush_broker_db() -> None:
    client = redis.Redis.from_url(broker_url())
    try:
        client.flushdb()
    finally:
        client.close()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``); empty once it has gone."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def stop_taskiq(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop ``taskiq worker``: its process manager relays SIGTERM to the worker processes as
    SIGINT, but an idle worker on RedisStreamBroker then never exits (its prefetcher stops, the
    broker's listen loop goes on), and the manager waits for it. So the manager is told to shut
    down, and its worker processes, which this harness started through it, are then killed by
    pid once the run is over."""
    children = [c for p in procs for c in _children(p.pid)]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    time.sleep(1.5)  # the manager acts on signals once a second
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _common.stop_workers(procs)


def main() -> None:
    args = _common.parse_args()
    flush_broker_db()
    broker, task = _build()
    loop = asyncio.new_event_loop()
    procs = _common.start_workers(
        [
            _common.python(),
            "-m",
            "taskiq",
            "worker",
            "bench.peers.taskiq_redis:broker",
            "--workers",
            str(args.processes),
        ],
        args.processes,
    )
    started = False
    try:
        _common.wait_idle()
        loop.run_until_complete(broker.startup())
        started = True

        async def enqueue(run_uid: str, now: float) -> None:
            await task.kiq(run_uid, now)

        _common.measure_async("taskiq", args, enqueue, loop).print()
    finally:
        stop_taskiq(procs)
        if started:
            loop.run_until_complete(broker.shutdown())
        loop.close()
        flush_broker_db()


if __name__ == "__main__":
    main()
