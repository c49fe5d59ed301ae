"""arq on Redis, in the peer protocol (see ``_common``): a no-op job that records its start.

Configuration: arq's defaults except ``max_jobs=100`` (default 10) and ``keep_result=0``: no
job result is stored, as Celery runs with ``ignore_result`` and Dramatiq without a result
backend (arq's default keeps each result for an hour, one more Redis write per job). The queue
lives in Redis database 3, flushed before and after a run. arq runs one asyncio worker per process:
P processes are P copies of ``arq bench.peers.arq_redis.WorkerSettings``.

arq's workers poll the queue (a sorted set) every ``poll_delay``, 0.5 s by default, which sets
its enqueue-to-start latency (uniform over 0 to 0.5 s when idle). The default is kept;
``PEERBENCH_ARQ_POLL_DELAY=<seconds>`` overrides it, for a sensitivity run only.

Jobs are enqueued with ``await pool.enqueue_job(...)`` from one persistent event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

# arq (both imports) is not installed in CI, which has the test extras only; where it is, it
# is typed (py.typed) and the ignores are unused.
from arq import create_pool  # type: ignore[import-not-found, unused-ignore]
from arq.connections import RedisSettings  # type: ignore[import-not-found, unused-ignore]

from bench.peers import _common

BROKER_DB = 3
BROKER_URL = f"{_common.REDIS_URL.rsplit('/', 1)[0]}/{BROKER_DB}"
REDIS_SETTINGS = RedisSettings.from_dsn(BROKER_URL)


async def noop(ctx: dict[Any, Any], run_uid: str, enqueued_at: float) -> None:
    _common.record(run_uid, enqueued_at)


class WorkerSettings:
    """Read by the ``arq`` worker command."""

    functions: ClassVar[list[Callable[..., Any]]] = [noop]
    redis_settings = REDIS_SETTINGS
    max_jobs = 100
    keep_result = 0
    poll_delay = float(os.environ.get("PEERBENCH_ARQ_POLL_DELAY", "0.5"))  # arq's default: 0.5


def flush_broker() -> None:
    _common.flush_redis_db(BROKER_DB)


def main() -> None:
    args = _common.parse_args()
    flush_broker()  # leftovers of an interrupted run would be consumed during this one
    arq_bin = str(Path(sys.executable).parent / "arq")
    procs = _common.start_workers(
        [arq_bin, "bench.peers.arq_redis.WorkerSettings"], args.processes, count=args.processes
    )
    loop = asyncio.new_event_loop()
    try:
        pool = loop.run_until_complete(create_pool(REDIS_SETTINGS))
        try:
            _common.wait_idle()

            async def enqueue(run_uid: str, now: float) -> None:
                await pool.enqueue_job("noop", run_uid, now)

            _common.measure_async("arq", args, enqueue, loop).print()
        finally:
            loop.run_until_complete(pool.aclose())
    finally:
        _common.stop_workers(procs)
        loop.close()
        flush_broker()


if __name__ == "__main__":
    main()
