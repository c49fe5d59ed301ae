"""Celery 5 on its Redis broker, in the peer protocol (see ``_common``): a no-op task that
records its start.

Configuration: Celery's defaults except ``task_acks_late=True`` (the message is acknowledged
after the task ran, the nearest to a durable run) and no result backend (``ignore_result``).
The broker is Redis database 1, flushed before and after a run. Workers:
``celery -A bench.peers.celery_redis worker --pool prefork --concurrency P --loglevel WARNING``.

Celery ships no type hints, and CI does not install it: it is imported through ``importlib``
so that the module type-checks either way, and its objects are ``Any``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from bench.peers import _common

BROKER_DB = 1
BROKER_URL = f"{_common.REDIS_URL.rsplit('/', 1)[0]}/{BROKER_DB}"
TASK_NAME = "peerbench.noop"


def noop(run_uid: str, enqueued_at: float) -> None:
    _common.record(run_uid, enqueued_at)


def _make_app() -> Any:
    celery = importlib.import_module("celery")
    app = celery.Celery("peerbench", broker=BROKER_URL, set_as_current=True)
    app.conf.task_acks_late = True
    app.conf.task_ignore_result = True
    app.conf.broker_connection_retry_on_startup = True  # the default; silences its warning
    return app


# Module level, so that ``celery -A bench.peers.celery_redis`` finds ``app`` and the task.
app: Any = _make_app()
task: Any = app.task(name=TASK_NAME, ignore_result=True, acks_late=True)(noop)


def flush_broker() -> None:
    _common.flush_redis_db(BROKER_DB)


def main() -> None:
    args = _common.parse_args()
    flush_broker()  # leftovers of an interrupted run would be consumed during this one
    celery_bin = str(Path(sys.executable).parent / "celery")
    procs = _common.start_workers(
        [
            celery_bin,
            "-A",
            "bench.peers.celery_redis",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(args.processes),
            "--loglevel",
            "WARNING",
        ],
        args.processes,
    )
    try:
        _common.wait_idle()

        def enqueue(run_uid: str, now: float) -> None:
            task.delay(run_uid, now)

        _common.measure("celery", args, enqueue).print()
    finally:
        _common.stop_workers(procs)
        app.close()
        flush_broker()


if __name__ == "__main__":
    main()
