"""tenantflow on PostgreSQL + Redis, in the peer protocol (see ``_common``): a durable
single-step workflow whose step records its start."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

from bench.peers import _common
from tenantflow import App, Client, Runtime, Settings, WorkflowContext

app = App("peer-bench")


@app.step
def mark(run_uid: str, enqueued_at: float, done: bool) -> None:
    _common.record(run_uid, enqueued_at, done=done)


@app.step
def nothing(run_uid: str, last: bool) -> None:
    if last:
        _common.mark_done(run_uid)


@app.workflow
async def task(ctx: WorkflowContext, run_uid: str, enqueued_at: float, steps: int = 1) -> None:
    await mark(run_uid, enqueued_at, steps == 1)
    for i in range(1, steps):
        await nothing(run_uid, i == steps - 1)


def start_workers(settings: Settings, processes: int) -> list[subprocess.Popen[bytes]]:
    """``processes`` tenantflow worker processes serving this module's app."""
    from tests.conftest import settings_env

    argv = [
        _common.python(),
        "-m",
        "tenantflow",
        "worker",
        "--app",
        "bench.peers.tenantflow_pg:app",
    ]
    return _common.start_workers(argv, processes, env=settings_env(settings), count=processes)


def main() -> None:
    from tests.conftest import cleanup_production, production_settings

    args = _common.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = production_settings(Path(folder), log_level="WARNING")
        loop = asyncio.new_event_loop()
        runtime = Runtime(settings)
        runtime.registry.create("bench")
        procs = start_workers(settings, args.processes)
        try:
            _common.wait_idle()
            tenant = Client(app, runtime=runtime).tenant("bench")

            async def enqueue(run_uid: str, now: float) -> None:
                await tenant.start(task, run_uid, now, args.steps)

            name = "tenantflow" if args.steps == 1 else f"tenantflow-{args.steps}-step"
            # Messages follow the commits in the background (the outbox makes that safe).
            _common.measure_async(
                name, args, enqueue, loop, settle=runtime.outbox.published
            ).print()
        finally:
            _common.stop_workers(procs)
            loop.run_until_complete(runtime.close())
            cleanup_production(settings)


if __name__ == "__main__":
    main()
