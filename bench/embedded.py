"""Embedded-default throughput: tenantflow on SQLite against DBOS on SQLite, same machine, same run.

    python -m bench.embedded [--rounds 3] [--one 2000] [--five 600]

Each measurement runs in a fresh subprocess (DBOS keeps global state) and in a fresh folder.
Both sides run in one process: the client submits every run at once, a worker in the same
process executes them, and the clock stops when the last run has completed. Figures:

- one-step: workflows with one no-op step, completed per second;
- five-step: workflows with five no-op steps, steps completed per second.

tenantflow is measured twice: with its default (WAL, synchronous=NORMAL: commits survive a
crash of the process) and with synchronous=FULL (an fsync per commit, as DBOS's SQLite
defaults do). The median of the rounds is reported, with the ratio to DBOS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


# -- tenantflow ----------------------------------------------------------------------------


def run_tenantflow(kind: str, n: int, synchronous: str) -> float:
    from tenantflow import App, Client, Runtime, Settings, Worker, WorkflowContext

    app = App("bench")

    @app.step
    async def noop(i: int) -> int:
        return i

    @app.workflow
    async def one(ctx: WorkflowContext, i: int) -> int:
        return await noop(i)

    @app.workflow
    async def five(ctx: WorkflowContext, i: int) -> int:
        for _ in range(5):
            await noop(i)
        return i

    workflow = one if kind == "one" else five

    async def main() -> float:
        settings = Settings(
            home=Path(os.getcwd()) / ".tenantflow",
            log_level="WARNING",
            sqlite_synchronous="FULL" if synchronous == "FULL" else "NORMAL",
        )
        from tenantflow.telemetry.logging import configure_logging

        configure_logging("WARNING")
        runtime = Runtime(settings)
        runtime.registry.ensure("bench")
        tenant = Client(app, runtime=runtime).tenant("bench")
        worker = Worker(app, runtime, concurrency=100)
        task = asyncio.create_task(worker.run())
        started = time.perf_counter()
        handles = [await tenant.start(workflow, i) for i in range(n)]
        for h in handles:
            await h.result(timeout=600)
        elapsed = time.perf_counter() - started
        worker.stop()
        await task
        await runtime.close()
        return elapsed

    return asyncio.run(main())


# -- DBOS ----------------------------------------------------------------------------------


def run_dbos(kind: str, n: int) -> float:
    from dbos import DBOS

    config: Any = {
        "name": "bench",
        "system_database_url": "sqlite:///dbos_bench.sqlite",
        "run_admin_server": False,
    }
    DBOS(config=config)

    # Typed loosely on purpose: dbos is an optional install, absent when mypy runs in CI.
    step = cast(Decorator, DBOS.step())
    workflow_ = cast(Decorator, DBOS.workflow())

    @step
    def noop(i: int) -> Any:
        return i

    @workflow_
    def one(i: int) -> Any:
        return noop(i)

    @workflow_
    def five(i: int) -> Any:
        for _ in range(5):
            noop(i)
        return i

    DBOS.launch()
    workflow = one if kind == "one" else five
    started = time.perf_counter()
    handles = [DBOS.start_workflow(workflow, i) for i in range(n)]
    for h in handles:
        h.get_result()
    elapsed = time.perf_counter() - started
    DBOS.destroy()
    return elapsed


# -- driver --------------------------------------------------------------------------------


def measure(system: str, kind: str, n: int) -> float:
    """Run one measurement in a fresh subprocess and folder; returns seconds."""
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-m", "bench.embedded", "--child", system, kind, str(n)],
            cwd=folder,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{system} {kind} failed:\n{out.stderr[-3000:]}")
        return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def child(system: str, kind: str, n: int) -> None:
    if system == "dbos":
        seconds = run_dbos(kind, n)
    else:
        seconds = run_tenantflow(kind, n, "FULL" if system == "tenantflow-full" else "NORMAL")
    print(json.dumps({"seconds": seconds}))


SYSTEMS = ("tenantflow", "tenantflow-full", "dbos")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=int, default=2000, help="one-step workflows per round")
    parser.add_argument("--five", type=int, default=600, help="five-step workflows per round")
    parser.add_argument("--child", nargs=3, metavar=("SYSTEM", "KIND", "N"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return

    rates: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.rounds):
        for kind, n, per in (("one", args.one, 1), ("five", args.five, 5)):
            for system in SYSTEMS:  # interleaved, so drifts of the machine hit all alike
                seconds = measure(system, kind, n)
                rate = n * per / seconds
                rates.setdefault((system, kind), []).append(rate)
                print(f"round {round_no + 1}: {system:16} {kind:4} {rate:9.1f}/s", file=sys.stderr)

    med = {key: statistics.median(v) for key, v in rates.items()}
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "rounds": args.rounds,
        "n": {"one": args.one, "five": args.five},
        "median": {f"{s}/{k}": round(r, 1) for (s, k), r in med.items()},
    }
    print(json.dumps(result, indent=2))
    print()
    print(
        "| figure | tenantflow (NORMAL) | tenantflow (FULL) | DBOS (SQLite) | ratio NORMAL | "
        "ratio FULL |"
    )
    print("|---|---|---|---|---|---|")
    for kind, label in (("one", "one-step workflows/s"), ("five", "steps/s (5-step workflows)")):
        tf, tff, db = med[("tenantflow", kind)], med[("tenantflow-full", kind)], med[("dbos", kind)]
        print(
            f"| {label} | {tf:,.0f} | {tff:,.0f} | {db:,.0f} | {tf / db:.1f}x | {tff / db:.1f}x |"
        )


if __name__ == "__main__":
    main()
