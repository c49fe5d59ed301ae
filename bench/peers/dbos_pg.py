"""DBOS on PostgreSQL, in the peer protocol (see ``_common``): a durable workflow of one step,
whose body records its start, run from a DBOS queue by separate worker processes.

The run gets a system database of its own, ``peer_dbos_<uid>``, dropped at the end. The harness
creates DBOS's schema (``DBOS.migrate``) and registers the queue with a ``DBOSClient``, then
starts P processes of ``python -m bench.peers.dbos_pg --serve``: each one ``DBOS.launch()``es
and dequeues from the queue. The harness enqueues with ``DBOSClient.enqueue`` (one INSERT of an
ENQUEUED workflow row each); it runs no workflow itself.

DBOS workers find queued work by polling (no LISTEN/NOTIFY on queues): every
``polling_interval_sec`` of the queue, 1 s by default. ``PEERBENCH_DBOS_POLL_S`` sets it (the
default here is DBOS's own, 1.0). Each poll claims every ENQUEUED row (no worker concurrency
limit is set) and hands them to the process's thread pool.

dbos is an optional install, absent when mypy runs in CI (pyproject ignores its missing
imports): it is imported inside functions and its decorators are typed loosely.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, cast

from bench.peers import _common

URL_ENV = "PEERBENCH_DBOS_URL"
POLL_ENV = "PEERBENCH_DBOS_POLL_S"
APP_NAME = "peerbench"
QUEUE_NAME = "peerbench"
WORKFLOW_NAME = "peerbench_workflow"

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def poll_interval() -> float:
    return float(os.environ.get(POLL_ENV, "1.0"))


def serve() -> None:
    """A worker process: launch DBOS with the workflow registered, dequeue until SIGTERM."""
    from dbos import DBOS

    config: Any = {
        "name": APP_NAME,
        "system_database_url": os.environ[URL_ENV],
        "run_admin_server": False,
    }
    DBOS(config=config)

    step = cast(Decorator, DBOS.step(name="peerbench_mark"))
    workflow = cast(Decorator, DBOS.workflow(name=WORKFLOW_NAME))

    nothing_step = cast(Decorator, DBOS.step(name="peerbench_nothing"))

    @step
    def mark(run_uid: str, enqueued_at: float, done: bool) -> None:
        _common.record(run_uid, enqueued_at, done=done)

    @nothing_step
    def nothing(run_uid: str, last: bool) -> None:
        if last:
            _common.mark_done(run_uid)

    @workflow
    def task(run_uid: str, enqueued_at: float, steps: int = 1) -> None:
        mark(run_uid, enqueued_at, steps == 1)
        for i in range(1, steps):
            nothing(run_uid, i == steps - 1)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    DBOS.listen_queues([QUEUE_NAME])
    DBOS.launch()
    try:
        stop.wait()
    finally:
        DBOS.destroy(workflow_completion_timeout_sec=5)


def main() -> None:
    from dbos import DBOS, DBOSClient

    args = _common.parse_args()
    database = f"peer_dbos_{_common.new_uid()}"
    url = _common.create_database(database)
    procs = []
    client: Any = None
    try:
        DBOS.migrate(url)
        client = DBOSClient(system_database_url=url, application_name=APP_NAME)
        client.register_queue(QUEUE_NAME, polling_interval_sec=poll_interval())
        procs = _common.start_workers(
            [_common.python(), "-m", "bench.peers.dbos_pg", "--serve"],
            args.processes,
            env={URL_ENV: url, POLL_ENV: str(poll_interval())},
            count=args.processes,
        )
        _common.wait_idle()
        options: Any = {"queue_name": QUEUE_NAME, "workflow_name": WORKFLOW_NAME}

        def enqueue(run_uid: str, now: float) -> None:
            client.enqueue(options, run_uid, now, args.steps)

        name = "dbos" if args.steps == 1 else f"dbos-{args.steps}-step"
        _common.measure(name, args, enqueue).print()
    finally:
        _common.stop_workers(procs)
        if client is not None:
            client.destroy()
        _common.drop_database(database)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main()
