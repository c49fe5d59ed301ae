"""Production backends against the field, same machine, same run.

    python -m bench.production [--rounds 2] [--n 2000] [--producers 8] [--systems ...]

For every system (modules in ``bench/peers``, one protocol: see ``bench/peers/_common.py``):
end-to-end no-op task rate with 1 and 2 worker processes (one producer enqueueing in a loop),
and with 1 worker process and ``--producers`` concurrent producers (8: an API server serving
concurrent requests), and enqueue-to-start latency on idle workers (1 and 2 processes); for the
durable-workflow systems (tenantflow, DBOS) also 5-step workflows in steps per second.
Rounds are interleaved (every system once per round) and medians reported. Then
the machine's own limits in the same run: ``redis-benchmark`` (XADD, unpipelined) and
``pgbench`` (simple-update transactions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = [
    "tenantflow_pg",
    "celery_redis",
    "dramatiq_redis",
    "arq_redis",
    "taskiq_redis",
    "dbos_pg",
    "procrastinate_pg",
]
WORKFLOW_SYSTEMS = {"tenantflow_pg", "dbos_pg"}


def run_peer(module: str, *extra: str) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", f"bench.peers.{module}", *extra]
    try:
        out = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        print(f"  {module} {' '.join(extra)}: timed out", file=sys.stderr)
        return None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"  {module} {' '.join(extra)}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    print(f"  {module} {' '.join(extra)}: {result}", file=sys.stderr)
    return result


def redis_benchmark() -> float | None:
    key = "tfbench_xadd"  # no colon: the output is "XADD <key> * f v: N requests per second"
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            "6379",
            "-n",
            "200000",
            "-q",
            "XADD",
            key,
            "*",
            "f",
            "v",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "del", key], capture_output=True)
    match = re.search(r"XADD[^:]*: ([\d.]+) requests per second", out.stdout.replace("\r", "\n"))
    return float(match.group(1)) if match else None


def pgbench(seconds: int = 15) -> float | None:
    db = "tf_pgbench"
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    subprocess.run(["dropdb", "--if-exists", db], env=env, capture_output=True)
    subprocess.run(["createdb", db], env=env, capture_output=True, check=True)
    try:
        subprocess.run(
            ["pgbench", "-i", "-s", "4", "-q", db], env=env, capture_output=True, check=True
        )
        out = subprocess.run(
            ["pgbench", "-N", "-c", "8", "-j", "2", "-T", str(seconds), "-n", db],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        match = re.search(r"tps = ([\d.]+)", out.stdout)
        return float(match.group(1)) if match else None
    finally:
        subprocess.run(["dropdb", "--if-exists", db], env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--producers",
        type=int,
        default=8,
        help="concurrent producers of the extra throughput figure (one worker process)",
    )
    args = parser.parse_args()
    systems = args.systems.split(",")
    samples: dict[str, list[dict[str, Any]]] = {}

    def add(key: str, result: dict[str, Any] | None) -> None:
        if result is not None:
            samples.setdefault(key, []).append(result)

    def throughput(system: str, n: int, processes: int, *extra: str) -> dict[str, Any] | None:
        return run_peer(
            system, "--mode", "throughput", "--n", str(n), "--processes", str(processes), *extra
        )

    for round_no in range(args.rounds):
        print(f"round {round_no + 1}", file=sys.stderr)
        for system in systems:
            for processes in (1, 2):
                add(f"{system}/throughput/{processes}", throughput(system, args.n, processes))
            add(
                f"{system}/throughput/1/p{args.producers}",
                throughput(system, args.n, 1, "--producers", str(args.producers)),
            )
            for processes in (1, 2):
                add(
                    f"{system}/latency/{processes}",
                    run_peer(system, "--mode", "latency", "--processes", str(processes)),
                )
            if system in WORKFLOW_SYSTEMS:
                add(f"{system}/steps5/1", throughput(system, args.n // 4, 1, "--steps", "5"))
    limits = {"redis_xadd_per_s": redis_benchmark(), "pgbench_tps": pgbench()}

    def median(key: str, field: str) -> float | None:
        values = [s[field] for s in samples.get(key, []) if s.get(field) is not None]
        return round(statistics.median(values), 2) if values else None

    table = {
        system: {
            "rate_1": median(f"{system}/throughput/1", "rate"),
            "rate_2": median(f"{system}/throughput/2", "rate"),
            f"rate_1_producers_{args.producers}": median(
                f"{system}/throughput/1/p{args.producers}", "rate"
            ),
            "latency_p50_ms": median(f"{system}/latency/1", "p50_ms"),
            "latency_p99_ms": median(f"{system}/latency/1", "p99_ms"),
            "latency_2_p50_ms": median(f"{system}/latency/2", "p50_ms"),
            "latency_2_p99_ms": median(f"{system}/latency/2", "p99_ms"),
            "steps5_per_s": median(f"{system}/steps5/1", "rate"),
        }
        for system in systems
    }
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "rounds": args.rounds,
                "n": args.n,
                "systems": table,
                "limits": limits,
                "samples": samples,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
