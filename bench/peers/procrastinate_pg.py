"""procrastinate 3 (``PsycopgConnector``) on PostgreSQL, in the peer protocol (see ``_common``):
a plain (sync) task whose body records its start.

The run gets a database of its own, ``peer_procrastinate_<uid>``, holding procrastinate's
schema; it is dropped at the end. Workers: ``procrastinate --app=bench.peers.procrastinate_pg.app
worker --concurrency 10``, started P times (one process each, LISTEN/NOTIFY on). The harness
defers with the synchronous ``task.defer(...)`` (a psycopg connection pool, one INSERT each).

procrastinate is an optional install, absent when mypy runs in CI: it is imported at run time
through ``importlib``, and ``app`` is built on first access (the module ``__getattr__``) from
the DSN in ``PEERBENCH_PROCRASTINATE_DSN``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

from bench.peers import _common

DSN_ENV = "PEERBENCH_PROCRASTINATE_DSN"
CONCURRENCY = 10
TASK_NAME = "peerbench.mark"


def mark(run_uid: str, enqueued_at: float) -> None:
    _common.record(run_uid, enqueued_at)


@functools.cache
def _build() -> tuple[Any, Any]:
    """The app and the task registered on it (the same in the harness and the workers)."""
    procrastinate = importlib.import_module("procrastinate")
    connector = procrastinate.PsycopgConnector(conninfo=os.environ[DSN_ENV])
    app = procrastinate.App(connector=connector)
    task = app.task(name=TASK_NAME)(mark)
    return app, task


def __getattr__(name: str) -> Any:
    if name == "app":
        return _build()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    args = _common.parse_args()
    database = f"peer_procrastinate_{_common.new_uid()}"
    dsn = _common.create_database(database)
    procs = []
    app: Any = None
    try:
        os.environ[DSN_ENV] = dsn
        # Built through the module's import name, as in the workers (procrastinate warns of an
        # app made in ``__main__``).
        from bench.peers import procrastinate_pg

        app, task = procrastinate_pg._build()
        app.open()
        app.schema_manager.apply_schema()
        procs = _common.start_workers(
            [
                _common.python(),
                "-m",
                "procrastinate",
                "--app=bench.peers.procrastinate_pg.app",
                "worker",
                f"--concurrency={CONCURRENCY}",
            ],
            args.processes,
            env={DSN_ENV: dsn},
            count=args.processes,
        )
        _common.wait_idle()

        def enqueue(run_uid: str, now: float) -> None:
            task.defer(run_uid=run_uid, enqueued_at=now)

        _common.measure("procrastinate", args, enqueue).print()
    finally:
        _common.stop_workers(procs)
        if app is not None:
            app.close()
        _common.drop_database(database)


if __name__ == "__main__":
    main()
