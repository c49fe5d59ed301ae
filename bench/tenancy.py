"""Realistic tenancy: many tenants, hundreds of them active, an API and two worker processes,
on a PostgreSQL and a Redis of the benchmark's own.

    python -m bench.tenancy [--tenants 1000] [--active 300] [--probe-runs 100]

Two installations, measured the same way one after the other: a small one (2 tenants), the
baseline (measured before and after the large one; the ratios are to the mean of the two),
and a large one (``--tenants``, of which ``--active`` submit a run every minute or
so, over HTTP). In each, a tenant with no traffic so far submits ``--probe-runs`` runs one at
a time: their start latency (``started_at - created_at``) is the figure the targets compare.
Also measured in each: PostgreSQL connections of each process (peak and steady, from
``pg_stat_activity`` by ``application_name``), new PostgreSQL sessions per second while idle
(``pg_stat_database.sessions``: in the 30 s after the load, and once no run came for longer
than a tenant stays marked), ``/readyz`` and ``/metrics`` every 2 s for 48 s under the load,
``5xx`` answers, and the workers' RSS. Extra settings for the processes: ``--env NAME=VALUE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from tests.servers import OwnPostgres, OwnRedis, free_port

from tenantflow import Runtime, Settings
from tenantflow.platform.identity import Role
from tenantflow.platform.provision import with_database
from tenantflow.tenant.marks import MARK_CLEAR_SECONDS

ROOT = Path(__file__).parents[1]
METRICS_TOKEN = "bench-metrics-secret"
APP = "bench.noisy:app"  # its one-step `job`, served by the processes
PROCESSES = ("tf-api", "tf-worker-1", "tf-worker-2")


@dataclass
class Phase:
    tenants: int
    active: int
    probe_p50_ms: float = 0.0
    probe_p99_ms: float = 0.0
    connections_peak: dict[str, int] = field(default_factory=dict)
    connections_steady: dict[str, int] = field(default_factory=dict)
    sessions_per_s_after_load: float = 0.0  # the minute after: marked tenants still swept
    idle_sessions_per_s: float = 0.0
    readyz_ms: list[float] = field(default_factory=list)
    metrics_ms: list[float] = field(default_factory=list)
    readyz_max_ms: float = 0.0
    health_not_ok: int = 0  # /readyz or /metrics answers other than 200
    metrics_max_ms: float = 0.0
    server_errors: int = 0
    worker_rss_mb: list[float] = field(default_factory=list)
    setup_s: float = 0.0


class ConnectionWatch(threading.Thread):
    """Counts the cluster's connections per ``application_name`` every 0.2 s."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[dict[str, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._watch()
            except psycopg.OperationalError:  # a server full of connections: try again
                time.sleep(0.2)

    def _watch(self) -> None:
        with psycopg.connect(self.url, autocommit=True, application_name="bench") as conn:
            while not self.stopped.wait(0.2):
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' GROUP BY 1"
                ).fetchall()
                self.samples.append({str(name): int(n) for name, n in rows})

    def peak(self) -> dict[str, int]:
        return {p: max((s.get(p, 0) for s in self.samples), default=0) for p in PROCESSES}

    def steady(self, last: int = 25) -> dict[str, int]:
        tail = self.samples[-last:] or [{}]
        return {p: round(statistics.median(s.get(p, 0) for s in tail)) for p in PROCESSES}


def sessions(url: str) -> int:
    with psycopg.connect(url, autocommit=True, application_name="bench") as conn:
        row = conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
    return int(row[0] or 0) if row else 0


def new_sessions_per_s(url: str, seconds: float) -> float:
    before, t = sessions(url), time.monotonic()
    time.sleep(seconds)
    return round((sessions(url) - before) / (time.monotonic() - t), 2)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Installation:
    """The platform database and tenants of one phase, its processes, and tokens."""

    def __init__(
        self, pg: OwnPostgres, redis: OwnRedis, home: Path, name: str, extra: dict[str, str]
    ) -> None:
        self.settings = Settings(
            home=home,
            database_url=with_database(pg.url, f"{name}_platform"),
            queue_url=redis.url,
            queue_prefix=name,
            tenant_db_prefix=f"{name}_",
            log_level="WARNING",
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
        self.env.update(
            PYTHONPATH=str(ROOT),
            TENANTFLOW_HOME=str(home),
            TENANTFLOW_DATABASE_URL=self.settings.database_url or "",
            TENANTFLOW_QUEUE_URL=redis.url,
            TENANTFLOW_QUEUE_PREFIX=name,
            TENANTFLOW_TENANT_DB_PREFIX=f"{name}_",
            TENANTFLOW_LOG_LEVEL="WARNING",
            TENANTFLOW_METRICS_TOKEN=METRICS_TOKEN,
            **extra,
        )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tokens: dict[str, str] = {}

    def provision(self, tenants: list[str], with_tokens: list[str]) -> None:
        runtime = Runtime(self.settings)
        try:
            for tenant_id in tenants:
                runtime.registry.create(tenant_id)
            platform = runtime.platform
            for tenant_id in with_tokens:
                _, secret = platform.create_api_key("bench", tenant_id, "bench", Role.OPERATOR)
                self.tokens[tenant_id] = platform.token_for_api_key(secret).access_token
        finally:
            asyncio.run(runtime.close())

    def start(self) -> None:
        commands = {
            "tf-api": ["api", "--port", str(self.port)],
            "tf-worker-1": ["worker"],
            "tf-worker-2": ["worker"],
        }
        for name, command in commands.items():
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "tenantflow", *command, "--app", APP],
                env={**self.env, "PGAPPNAME": name},  # libpq names each process's sessions
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_latencies(install: Installation, tenant_id: str, run_ids: list[str]) -> list[float]:
    async def read() -> list[float]:
        runtime = Runtime(install.settings)
        try:
            store = runtime.router.store(tenant_id)
            deadline = time.monotonic() + 120
            while True:
                runs = [await store.get_run(r) for r in run_ids]
                if all(r is not None and r.started_at for r in runs) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            return [1000 * (r.started_at - r.created_at) for r in runs if r and r.started_at]
        finally:
            await runtime.close()

    return asyncio.run(read())


def timed(client: httpx.Client, path: str, token: str | None = None) -> tuple[float, int]:
    """Milliseconds to answer ``path`` (-1: no answer within two minutes), and the status."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    t = time.perf_counter()
    try:
        status = client.get(path, headers=headers, timeout=120).status_code
    except httpx.TimeoutException:
        return -1.0, 0
    return round(1000 * (time.perf_counter() - t), 1), status


def run_phase(
    pg: OwnPostgres,
    redis: OwnRedis,
    home: Path,
    *,
    name: str,
    tenants: int,
    active: int,
    probe_runs: int,
    extra: dict[str, str],
) -> Phase:
    install = Installation(pg, redis, home / name, name, extra)
    phase = Phase(tenants=tenants, active=active)
    ids = [f"t{i:04d}" for i in range(tenants)]
    probe, busy = ids[-1], ids[:active]
    started = time.monotonic()
    install.provision(ids, with_tokens=[*busy, probe])
    phase.setup_s = round(time.monotonic() - started, 1)
    watch = ConnectionWatch(pg.url)
    watch.start()
    install.start()
    errors = 0
    stop_load = threading.Event()
    client = httpx.Client(base_url=install.base, timeout=60)

    def submit(tenant_id: str, i: int) -> str | None:
        nonlocal errors
        answer = client.post(
            "/v1/runs",
            json={"workflow": "job", "args": [i]},
            headers={"Authorization": f"Bearer {install.tokens[tenant_id]}"},
        )
        if answer.status_code >= 500:
            errors += 1
            return None
        return str(answer.json()["id"])

    def load() -> None:
        # Every active tenant once at first, then about one run per active tenant a minute.
        for n, tenant_id in enumerate(busy):
            submit(tenant_id, n)
        while not stop_load.wait(60 / max(1, active) if active else 1.0):
            if busy:
                submit(random.choice(busy), 0)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(5 if active else 1)  # the active tenants' first runs are in flight or done
    probe_ids = []
    for i in range(probe_runs):
        run_id = submit(probe, i)
        if run_id:
            probe_ids.append(run_id)
        time.sleep(0.05)
    until = time.monotonic() + 48  # three background surveys, under the load
    while time.monotonic() < until:
        for path, token, into in (
            ("/readyz", None, phase.readyz_ms),
            ("/metrics", METRICS_TOKEN, phase.metrics_ms),
        ):
            ms, status = timed(client, path, token)
            into.append(ms)
            phase.health_not_ok += status != 200
        time.sleep(2)
    phase.readyz_max_ms, phase.metrics_max_ms = max(phase.readyz_ms), max(phase.metrics_ms)
    stop_load.set()
    loader.join(120)
    phase.connections_peak = watch.peak()
    phase.connections_steady = watch.steady()
    time.sleep(10)  # the load's last runs finish
    phase.sessions_per_s_after_load = new_sessions_per_s(pg.url, 30)
    # Idle: no run for longer than a tenant keeps its mark (MARK_CLEAR_SECONDS) and a sweep.
    time.sleep(max(0.0, MARK_CLEAR_SECONDS + 15 - 40))
    phase.idle_sessions_per_s = new_sessions_per_s(pg.url, 30)
    phase.worker_rss_mb = [rss_mb(install.procs[p].pid) for p in ("tf-worker-1", "tf-worker-2")]
    watch.stopped.set()
    install.stop()
    client.close()
    latencies = sorted(start_latencies(install, probe, probe_ids))
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    phase.probe_p50_ms, phase.probe_p99_ms = round(q[49], 2), round(q[98], 2)
    phase.server_errors = errors
    return phase


def _report_death(pg: OwnPostgres, home: Path) -> None:
    """A benchmark's server that stops on its own says why (its log) before the figures fail."""
    while pg.proc is not None and pg.proc.poll() is None:
        time.sleep(1)
    if pg.proc is not None:
        print((home / "postgres.log").read_text()[-3000:], file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--active", type=int, default=300)
    parser.add_argument("--probe-runs", type=int, default=100)
    parser.add_argument("--max-connections", type=int, default=2000)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the processes")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    report: dict[str, Any] = {"settings": extra}
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        pg_settings = {"max_connections": str(args.max_connections), "shared_buffers": "128MB"}
        with OwnPostgres(home, settings=pg_settings) as pg, OwnRedis(home) as redis:
            watchdog = threading.Thread(target=_report_death, args=(pg, home), daemon=True)
            watchdog.start()
            # The small installation is measured before and after the large one: load that
            # comes or goes on the machine meanwhile then weighs on both sides of the ratio.
            phases = (("small", 2, 0), ("large", args.tenants, args.active), ("small-after", 2, 0))
            for label, tenants, active in phases:
                phase = run_phase(
                    pg,
                    redis,
                    home,
                    name=label.replace("-", "_"),
                    tenants=tenants,
                    active=active,
                    probe_runs=args.probe_runs,
                    extra=extra,
                )
                report[label] = asdict(phase)
                print(json.dumps({label: report[label]}), flush=True)
    large = report["large"]
    report["ratios"] = {  # to the mean of the two small phases
        q: round(large[q] / statistics.fmean(report[p][q] for p in ("small", "small-after")), 2)
        for q in ("probe_p50_ms", "probe_p99_ms")
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
