"""The fault suite: runs across tenants on worker processes started as a user starts them
(``tenantflow worker``), a PostgreSQL and a Redis of the suite's own behind loopback fault
proxies, one fault per test, and every effect counted in a ledger tenantflow knows nothing
about (tests/fault/app.py). Counted in the terms of Jepsen's queue checker:

- accepted: submissions that returned a run; indeterminate: those that raised (the run may
  or may not exist); lost: accepted runs not completed by the deadline; unexpected: runs that
  completed and were never submitted, or a second run for one submission;
- duplicated effects at a crash point: a step's effect done again after an execution of it in
  a process that was killed or frozen (the one repeat docs/delivery.md allows); duplicated
  elsewhere: any other repeat (must be 0);
- recovery: from the moment the fault ended (the server answers again, the worker died) to
  the moment every run that was unfinished then had moved (a ledger line after it).

Run with ``pytest -m fault tests/fault`` (outside the default run: about four minutes); the
table of counts is printed at the end and written to ``$TENANTFLOW_TEST_FAULT_REPORT`` if set.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tenantflow import Client, RunStatus, Runtime, Settings
from tenantflow.platform.provision import with_database
from tests.fault import app as fault_app
from tests.fault.proxy import FaultProxy
from tests.fault.report import REPORT, Counts
from tests.integration.test_crash import Workers
from tests.servers import OwnPostgres, OwnRedis

pytestmark = pytest.mark.fault

TENANTS = ("alpha", "bravo", "charlie", "delta")
RUNS = 64  # fewer than the workers' 3 x 32 slots: a run that waits, waits for the fault
WORKERS = 3
SLOTS = 32
STEP_SECONDS = 1.0  # a step, 1 s asleep, two steps; submitted over 2 s, so that a fault at
SUBMIT_EVERY = 0.03  # 2 s finds runs in their first step, asleep (a timer in the queue), in a
FAULT_AT = 2.0  # later step


@dataclass
class Servers:
    folder: Path
    pg: OwnPostgres
    redis: OwnRedis
    pg_proxy: FaultProxy
    redis_proxy: FaultProxy

    def ensure_up(self) -> None:
        for proxy in (self.pg_proxy, self.redis_proxy):
            proxy.set("pass")
        if self.pg.proc is None or self.pg.proc.poll() is not None:
            self.pg.start()
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.start()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    # Not under pytest's temporary folder, which the postgres user may not enter.
    with tempfile.TemporaryDirectory() as folder:
        pg = OwnPostgres(Path(folder))
        redis = OwnRedis(Path(folder))
        with pg, redis:
            pg_proxy = FaultProxy(pg.port).start()
            redis_proxy = FaultProxy(redis.port).start()
            try:
                yield Servers(Path(folder), pg, redis, pg_proxy, redis_proxy)
            finally:
                pg_proxy.stop()
                redis_proxy.stop()


@dataclass
class Scenario:
    name: str
    lease_seconds: float
    # Injects the fault; returns when the fault has ended (the server answers again), with
    # the moment it did where the server tells it better than a clock read after the return.
    inject: Callable[[Servers, Workers, set[int]], Awaitable[float | None]]
    recovery_bound: float  # seconds after the fault ended
    settings: dict[str, Any] = field(default_factory=dict)  # of every process
    # Why the recovery bound is not met yet, where it is not: the counts must still be 0.
    not_met: str | None = None


async def kill_worker(s: Servers, w: Workers, faulted: set[int]) -> None:
    victim = w.procs[0]
    faulted.add(victim.pid)
    victim.kill()
    victim.wait(10)


async def freeze_worker(s: Servers, w: Workers, faulted: set[int]) -> None:
    victim = w.procs[0]
    faulted.add(victim.pid)
    victim.send_signal(signal.SIGSTOP)
    await asyncio.sleep(6.0)  # past the 4 s lease: its runs are taken over
    victim.send_signal(signal.SIGCONT)


async def flush_redis(s: Servers, w: Workers, faulted: set[int]) -> None:
    client = aioredis.Redis(port=s.redis.port)
    await client.flushall()
    await client.aclose()


async def restart_redis_empty(s: Servers, w: Workers, faulted: set[int]) -> None:
    s.redis.stop(signal.SIGKILL)
    await asyncio.sleep(1.0)
    s.redis.start()


def restart_postgres(sig: signal.Signals, down: float) -> Callable[..., Awaitable[float]]:
    async def inject(s: Servers, w: Workers, faulted: set[int]) -> float:
        await asyncio.to_thread(s.pg.stop, sig)
        await asyncio.sleep(down)
        await asyncio.to_thread(s.pg.start)
        # Workers may be served before start() has seen the server ready (it polls, from a
        # thread of this busy process): the outage ended when the server says it did.
        return s.pg.ready_at()

    return inject


async def freeze_postgres(s: Servers, w: Workers, faulted: set[int]) -> None:
    s.pg.freeze_all()  # sessions open, never answered: only the clients' own bound ends them
    await asyncio.sleep(6.0)
    s.pg.thaw()


def through_proxy(which: str, mode: str, seconds: float) -> Callable[..., Awaitable[None]]:
    async def inject(s: Servers, w: Workers, faulted: set[int]) -> None:
        proxy = s.pg_proxy if which == "postgres" else s.redis_proxy
        proxy.set(mode, delay=0.05)  # type: ignore[arg-type]
        await asyncio.sleep(seconds)
        proxy.set("pass")

    return inject


DEFAULT_LEASE = Settings().lease_seconds
# A step begun this soon after an outage began counts as in flight when it began: a worker
# learns of the outage at its next call to the database.
IN_FLIGHT_MARGIN = 1.0
SCENARIOS = [
    Scenario("worker kill -9", 4.0, kill_worker, recovery_bound=4.0 + 2.0),
    Scenario("worker SIGSTOP past the lease", 4.0, freeze_worker, recovery_bound=2.0),
    Scenario("Redis FLUSHALL", DEFAULT_LEASE, flush_redis, recovery_bound=2.0),
    Scenario("Redis killed, restarted empty", DEFAULT_LEASE, restart_redis_empty, 2.0),
    Scenario("PostgreSQL restart -m fast", 4.0, restart_postgres(signal.SIGINT, 0.5), 4.0),
    Scenario("PostgreSQL restart -m immediate", 4.0, restart_postgres(signal.SIGQUIT, 0.5), 4.0),
    Scenario("PostgreSQL down past the lease", 4.0, restart_postgres(signal.SIGINT, 6.0), 4.0),
    Scenario(
        "PostgreSQL frozen 6 s, sessions open",
        4.0,
        freeze_postgres,
        4.0,
        settings={"database_timeout_seconds": 2.0},
    ),
    Scenario(
        "PostgreSQL link: 50 ms latency",
        4.0,
        through_proxy("postgres", "latency", 3),
        4.0,
        # Measured 0.98-2.05 s, and once (a full run in CI, 2026-12-03, after the worker's
        # parking of messages for a database that does not answer) 10.07 s. Issue 13.
        not_met="once, a run waited 10 s after the latency ended",
    ),
    Scenario("PostgreSQL link: blackhole 3 s", 4.0, through_proxy("postgres", "blackhole", 3), 4.0),
    Scenario("PostgreSQL link: reset", 4.0, through_proxy("postgres", "reset", 0.2), 4.0),
    Scenario(
        "Redis link: blackhole 3 s", DEFAULT_LEASE, through_proxy("redis", "blackhole", 3), 2.0
    ),
    Scenario(
        "Redis link: reset",
        DEFAULT_LEASE,
        through_proxy("redis", "reset", 0.2),
        2.0,
        # Measured 1.02-1.1 s, and once (a full run in CI, 2026-12-03) 15.8 s: about half a
        # lease, the wait of a message handed back; not reproduced alone (4 runs). Issue 13.
        not_met="once, a run waited about half a lease after the reset",
    ),
]


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
async def installation(
    servers: Servers, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[tuple[Runtime, Workers, Path]]]]:
    servers.ensure_up()
    made: list[tuple[Runtime, Workers]] = []

    async def make(lease: float, **overrides: Any) -> tuple[Runtime, Workers, Path]:
        name = f"f{len(REPORT)}x{os.getpid() % 1000}"
        pg_url = f"postgresql://postgres@{servers.pg_proxy.url_netloc}/postgres"
        settings = Settings(
            home=tmp_path / "home",
            database_url=with_database(pg_url, f"{name}_platform"),
            queue_url=f"redis://{servers.redis_proxy.url_netloc}/0",
            queue_prefix=name,
            tenant_db_prefix=f"{name}_",
            lease_seconds=lease,
            log_level="WARNING",
            **overrides,
        )
        runtime = Runtime(settings)
        for tenant in TENANTS:
            await asyncio.to_thread(runtime.registry.create, tenant)
        workers = Workers(settings, tmp_path)
        ledger = tmp_path / "ledger.jsonl"
        env = {
            fault_app.LEDGER_ENV: str(ledger),
            "TENANTFLOW_TEST_FAULT_STEP_SECONDS": str(STEP_SECONDS),
            "TENANTFLOW_LOG_FORMAT": "json",
            # "worker started" says it serves; each delivery's trail is read where a recovery
            # bound is missed.
            "TENANTFLOW_LOG_LEVEL": "DEBUG",
        }
        for _ in range(WORKERS):
            workers.start(app="tests.fault.app:app", concurrency=SLOTS, env=env)
        made.append((runtime, workers))
        return runtime, workers, ledger

    yield make
    for runtime, workers in made:
        workers.stop_all()
        servers.ensure_up()
        await runtime.close()


@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.name) for s in SCENARIOS])
async def test_fault(
    scenario: Scenario,
    servers: Servers,
    installation: Callable[..., Awaitable[tuple[Runtime, Workers, Path]]],
) -> None:
    runtime, workers, ledger = await installation(scenario.lease_seconds, **scenario.settings)
    client = Client(fault_app.app, runtime=runtime)
    counts = Counts(scenario.name, scenario.lease_seconds)
    accepted: dict[int, str] = {}
    indeterminate: set[int] = set()
    await wait_for_workers(workers, ledger)
    began = time.monotonic()
    for i in range(RUNS):
        tenant = client.tenant(TENANTS[i % len(TENANTS)])
        try:
            accepted[i] = (await tenant.start(fault_app.transfer, 10 * i)).run_id
        except Exception as exc:
            indeterminate.add(i)
            counts.notes.append(f"submit {i}: {type(exc).__name__}")
        await asyncio.sleep(SUBMIT_EVERY)
    await asyncio.sleep(max(0.0, FAULT_AT - (time.monotonic() - began)))

    faulted: set[int] = set()
    started = time.time()
    ended = await scenario.inject(servers, workers, faulted) or time.time()
    # An outage longer than the lease takes the lease of every step then in flight: those
    # steps may run again (docs/delivery.md, "what may repeat"), once each, after the outage.
    lapsed = ended - started > scenario.lease_seconds and not faulted

    deadline = time.monotonic() + max(60.0, 4 * scenario.lease_seconds)
    done: set[str] = set()
    while time.monotonic() < deadline:
        done = await completed_runs(runtime)
        if set(accepted.values()) <= done:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(STEP_SECONDS + 0.5)  # late effects of frozen or stale executions land
    done = await completed_runs(runtime)
    judge(
        counts,
        read_ledger(ledger),
        accepted,
        indeterminate,
        done,
        faulted,
        (started, ended) if lapsed else None,
        ended,
    )
    REPORT.append(counts)
    if counts.recovery_seconds is not None and counts.recovery_seconds > scenario.recovery_bound:
        counts.notes.extend(trail(workers, counts.slowest_run, ended))
    assert counts.lost == 0, counts
    assert counts.unexpected == 0, counts
    assert counts.duplicated_elsewhere == 0, counts
    assert counts.recovery_seconds is not None, counts
    if counts.recovery_seconds > scenario.recovery_bound and scenario.not_met:
        notes = "\n".join(counts.notes)
        pytest.xfail(f"recovery {counts.recovery_seconds} s: {scenario.not_met}\n{notes}")
    assert counts.recovery_seconds <= scenario.recovery_bound, counts


def trail(workers: Workers, run_id: str | None, ended: float) -> list[str]:
    """What the workers logged of the run that recovered last, in seconds from the fault's
    end: the trail to read when a recovery bound is missed."""
    lines = []
    for n in range(len(workers.procs)):
        log = workers.tmp_path / f"worker{n}.log"
        for line in log.read_text().splitlines() if log.exists() else ():
            if run_id and run_id in line:
                entry = json.loads(line) if line.startswith("{") else {"event": line}
                lines.append(f"worker{n}: {entry}")
    return lines or [f"no log line names {run_id}"]


async def wait_for_workers(workers: Workers, ledger: Path) -> None:
    """Until every worker process serves (a log line of each says it started)."""
    deadline = time.monotonic() + 30
    for n, proc in enumerate(workers.procs):
        log = workers.tmp_path / f"worker{n}.log"
        while "worker started" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "a worker did not start"
            await asyncio.sleep(0.1)


async def completed_runs(runtime: Runtime) -> set[str]:
    out: set[str] = set()
    for tenant in TENANTS:
        try:
            store = runtime.router.store(tenant)
            runs = await store.list_runs(status=RunStatus.COMPLETED, limit=1000)
        except Exception:
            continue  # the database is still away: asked again
        out.update(r.id for r in runs)
    return out


def judge(
    counts: Counts,
    ledger: list[dict[str, Any]],
    accepted: dict[int, str],
    indeterminate: set[int],
    completed: set[str],
    faulted: set[int],
    outage: tuple[float, float] | None,
    ended: float,
) -> None:
    counts.accepted = len(accepted)
    counts.indeterminate = len(indeterminate)
    counts.completed = len(completed & set(accepted.values()))
    counts.lost = len(set(accepted.values()) - completed)
    executions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    runs_of: dict[int, set[str]] = defaultdict(set)  # submission -> runs that served it
    for line in ledger:
        executions[line["key"]].append(line)
        runs_of[line["n"] // 10].add(line["key"].rsplit(":", 1)[0])
    for i, runs in runs_of.items():
        expected = {accepted[i]} if i in accepted else set()
        extra = runs - expected
        if i in indeterminate and not expected:
            extra = set(sorted(extra)[1:])  # one run may exist: the submit's answer was lost
        counts.unexpected += len(extra)
        counts.notes.extend(f"unexpected run {r} for submission {i}" for r in extra)
    repeated_runs: set[str] = set()
    for key, lines in executions.items():
        effects = [x for x in lines if x["event"] == "done"]
        if len(effects) <= 1:
            continue
        begins = sorted((x for x in lines if x["event"] == "begin"), key=lambda x: x["t"])
        # Allowed: executions in processes that were killed or frozen, then one more; or one
        # step per run in flight through an outage longer than the lease, then one after it.
        healthy = [x for x in begins if x["pid"] not in faulted]
        run_id = key.rsplit(":", 1)[0]
        interrupted = (
            outage is not None
            and len(begins) == 2
            and begins[0]["t"] < outage[0] + IN_FLIGHT_MARGIN
            and begins[1]["t"] >= outage[1]
            and run_id not in repeated_runs
        )
        if len(healthy) <= 1 or interrupted:
            counts.duplicated_at_crash += len(effects) - 1
            repeated_runs.add(run_id)
        else:
            counts.duplicated_elsewhere += len(effects) - 1
            since = outage[0] if outage is not None else ended
            timeline = [(x["event"], x["pid"], round(x["t"] - since, 2)) for x in lines]
            counts.notes.append(f"{key}: (event, pid, s from the fault) {timeline}")
    # Recovery: every accepted run unfinished when the fault ended has moved since.
    waits: list[tuple[float, str]] = []
    for run_id in accepted.values():
        lines = [x for key, xs in executions.items() if key.startswith(run_id + ":") for x in xs]
        if sum(1 for x in lines if x["event"] == "done" and x["t"] <= ended) >= fault_app.STEPS:
            continue
        after = [x["t"] for x in lines if x["t"] > ended and x["pid"] not in faulted]
        waits.append((min(after) - ended if after else math.inf, run_id))
    counts.recovery_seconds = round(max(waits)[0], 2) if waits else 0.0
    counts.slowest_run = max(waits)[1] if waits else None
