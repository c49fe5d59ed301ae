"""One worker process draining a backlog, and the CPU it and its servers spend per run.

    python -m bench.drain [--n 4000] [--rounds 3]

N single-step runs (the peer protocol's task) are submitted and published first, with no
worker running; then one ``tenantflow worker`` process starts, and from its first completed
run to its last the harness measures the drain rate and the CPU time (user + system, from
``/proc``) of the worker process, of all PostgreSQL processes and of Redis, per run. With no
producer competing, this is the worker's own cost: what the group commit, the prepared
statements and the dequeue scripts buy. Linux only (``/proc``); every process on the
machine is counted under its name, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import _common
from bench.peers.tenantflow_pg import app, start_workers, task
from tenantflow import Client, Runtime, Settings

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_cpu(stat: str) -> float:
    """User + system CPU seconds from the text of a ``/proc/<pid>/stat``."""
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        return _stat_cpu(f.read())


def servers_cpu() -> dict[str, float]:
    """CPU seconds of every PostgreSQL and Redis process now alive."""
    out = {"postgres": 0.0, "redis": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        key = "postgres" if name.startswith("postgres") else "redis" if "redis" in name else None
        if key is not None:
            out[key] += _stat_cpu(stat)
    return out


async def submit(settings: Settings, uid: str, n: int) -> None:
    runtime = Runtime(settings)
    try:
        runtime.registry.create("bench")
        tenant = Client(app, runtime=runtime).tenant("bench")
        for _ in range(n):
            await tenant.start(task, uid, time.time(), 1)
        await runtime.outbox.published()
    finally:
        await runtime.close()


def one_round(n: int) -> dict[str, float]:
    from tests.conftest import cleanup_production, production_settings

    with tempfile.TemporaryDirectory() as folder:
        settings = production_settings(Path(folder), log_level="WARNING")
        uid = _common.new_uid()
        procs = []
        try:
            asyncio.run(submit(settings, uid, n))
            procs = start_workers(settings, 1)
            recorder = _common.metrics_client()
            key = f"peerbench:{uid}:done"
            while int(recorder.get(key) or 0) == 0:  # booted and taking runs
                time.sleep(0.001)
            first = int(recorder.get(key) or 0)
            servers, worker, started = servers_cpu(), cpu_seconds(procs[0].pid), time.perf_counter()
            ended = _common.wait_done(uid, n)
            worker_cpu = cpu_seconds(procs[0].pid) - worker
            after = servers_cpu()
            runs = n - first
            return {
                "runs_per_s": round(runs / (ended - started), 1),
                "worker_us_per_run": round(1e6 * worker_cpu / runs, 1),
                "postgres_us_per_run": round(
                    1e6 * (after["postgres"] - servers["postgres"]) / runs, 1
                ),
                "redis_us_per_run": round(1e6 * (after["redis"] - servers["redis"]) / runs, 1),
            }
        finally:
            _common.stop_workers(procs)
            _common.cleanup(uid)
            cleanup_production(settings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        rounds.append(one_round(args.n))
        print(f"  {rounds[-1]}", file=sys.stderr)
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "n": args.n, "median": medians}))


if __name__ == "__main__":
    main()
