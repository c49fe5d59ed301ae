"""One circuit breaker for four worker processes, on PostgreSQL + Redis (on the embedded default
each process has breakers of its own, by design): a dependency on loopback fails, and the
breaker opens once the failure rate is reached counting every process's calls; while it is
open no call reaches the dependency; after the wait, no more than the configured number of
probes reach it in total; the successful probes close it and every run completes. And when
the workers holding the half-open probes are killed (``kill -9``), their probes' slots come
back when the probes' leases end: the breaker closes and every run completes."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tenantflow import Client, Runtime, Settings
from tenantflow.resilience.breaker import BreakerState
from tests.apps import breaking
from tests.commands import free_port
from tests.conftest import cleanup_production, production_settings
from tests.integration.test_crash import Workers

pytestmark = pytest.mark.slow

PROBE_SECONDS = 0.5  # a healthy call takes this long, so probes are in flight together
WORKERS = 4
CONCURRENCY = 2  # per process: at most 8 calls in flight at once
RUNS = 40
# After the dead probes' leases end: a waiting step asks again within a second, and its probe
# (healed: 0.05 s) answers; with time to spare for a loaded machine.
RECOVERY_MARGIN = 2.5


@dataclass
class Dependency:
    """What the dependency saw: (receipt time, caller pid) per call; fails until healed.
    While ``hanging``, a call gets no answer until ``released``."""

    healthy: bool = False
    hanging: bool = False
    seconds: float = PROBE_SECONDS  # a healthy call takes this long
    released: threading.Event = field(default_factory=threading.Event)
    calls: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def between(self, start: float, end: float) -> list[tuple[float, int]]:
        with self.lock:
            return [c for c in self.calls if start <= c[0] < end]


@pytest.fixture
def dependency() -> Iterator[tuple[Dependency, str]]:
    seen = Dependency()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with seen.lock:
                seen.calls.append((time.time(), int(self.headers["x-caller"])))
                healthy, hanging, seconds = seen.healthy, seen.hanging, seen.seconds
            if hanging:
                seen.released.wait(60)
            elif healthy:
                time.sleep(seconds)
            try:
                self.send_response(200 if healthy else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:  # the caller was killed while its call hung
                pass

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield seen, f"http://127.0.0.1:{server.server_address[1]}/"
    seen.released.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = production_settings(tmp_path, lease_seconds=5.0, poll_interval=0.02)
    yield settings
    cleanup_production(settings)


async def state_becomes(runtime: Runtime, state: BreakerState, timeout: float) -> float:
    """Poll the breaker until it is in ``state``; returns its seconds until a probe."""
    deadline = time.monotonic() + timeout
    while True:
        status = await runtime.breakers.status("dependency")
        if status.state is state:
            return status.retry_after
        assert time.monotonic() < deadline, f"the breaker stayed {status.state}"
        await asyncio.sleep(0.01)


async def test_four_worker_processes_share_one_breaker(
    settings: Settings, tmp_path: Path, dependency: tuple[Dependency, str]
) -> None:
    seen, url = dependency
    config = breaking.CONFIG
    runtime = Runtime(settings)
    runtime.breakers.configure("dependency", config)
    workers = Workers(settings, tmp_path)
    try:
        runtime.registry.create("acme")
        for _ in range(WORKERS):
            workers.start(
                app="tests.apps.breaking:app",
                concurrency=CONCURRENCY,
                env={breaking.URL_ENV: url},
            )
        tenant = Client(breaking.app, runtime=runtime).tenant("acme")
        handles = [await tenant.start(breaking.use_dependency, n) for n in range(RUNS)]

        # Failing: the breaker opens after minimum_calls failures in all, not per process.
        retry_after = await state_becomes(runtime, BreakerState.OPEN, timeout=60)
        opened_seen = time.time()
        probe_at = opened_seen + retry_after  # when the breaker lets probes through
        seen.healthy = True
        await asyncio.sleep(0.3)  # calls already in flight when it opened land
        failing = seen.between(0, opened_seen + 0.3)
        in_flight = WORKERS * CONCURRENCY
        assert config.minimum_calls <= len(failing) <= config.minimum_calls + in_flight, failing
        assert len({pid for _, pid in failing}) >= 3  # counted across processes

        # Open: nothing reaches the dependency until the wait is over.
        await asyncio.sleep(max(0.0, probe_at - time.time()) + PROBE_SECONDS * 0.8)
        assert seen.between(opened_seen + 0.3, probe_at - 0.05) == []

        # Half-open: the first probes are in flight for PROBE_SECONDS; until one of them
        # answers nothing can close the breaker, so every call in that time is a probe.
        after_wait = seen.between(probe_at - 0.05, time.time())
        assert after_wait, "no probe reached the dependency"
        first = after_wait[0][0]
        probes = seen.between(first, first + PROBE_SECONDS * 0.9)
        assert 1 <= len(probes) <= config.half_open_calls, probes

        # The probes succeeded: closed, and every run completes.
        await state_becomes(runtime, BreakerState.CLOSED, timeout=30)
        for n, handle in enumerate(handles):
            assert await handle.result(timeout=60) == n
        assert (await runtime.breakers.status("dependency")).state is BreakerState.CLOSED
    finally:
        workers.stop_all()
        await runtime.close()


async def test_killed_probes_free_their_slots_when_their_leases_end(
    settings: Settings, tmp_path: Path, dependency: tuple[Dependency, str]
) -> None:
    """The half-open probes hang in the dependency and their workers are killed with
    ``kill -9``: nothing answers for them, so until their leases end (probe_timeout plus the
    margin) no other call is let through; then the surviving workers take the slots, the
    healed dependency answers, the breaker closes, and all 60 runs complete."""
    seen, url = dependency
    config = breaking.CONFIG
    runs = 60
    runtime = Runtime(settings)
    runtime.breakers.configure("dependency", config)
    workers = Workers(settings, tmp_path)
    try:
        runtime.registry.create("acme")
        by_pid = {
            proc.pid: proc
            for proc in (
                workers.start(
                    app="tests.apps.breaking:app",
                    concurrency=CONCURRENCY,
                    env={breaking.URL_ENV: url},
                )
                for _ in range(WORKERS)
            )
        }
        tenant = Client(breaking.app, runtime=runtime).tenant("acme")
        handles = [await tenant.start(breaking.use_dependency, n) for n in range(runs)]

        # Failing until the breaker opens; then every call hangs: only probes can come.
        await state_becomes(runtime, BreakerState.OPEN, timeout=60)
        await asyncio.sleep(0.3)  # the calls in flight when it opened land (and fail)
        seen.hanging = True
        hung_from = time.time()
        deadline = time.monotonic() + config.wait_open + 10
        while len(probes := seen.between(hung_from, time.time())) < config.half_open_calls:
            assert time.monotonic() < deadline, f"probes seen: {probes}"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        probes = seen.between(hung_from, time.time())
        assert len(probes) == config.half_open_calls, probes  # the slots are all taken

        # Kill the workers holding the probes; heal the dependency (and make it quick).
        holders = {pid for _, pid in probes}
        assert holders <= by_pid.keys() and len(holders) < WORKERS
        for pid in holders:
            by_pid[pid].send_signal(signal.SIGKILL)
        for pid in holders:
            assert by_pid[pid].wait(10) == -signal.SIGKILL
        killed_at = time.time()
        seen.seconds, seen.healthy, seen.hanging = 0.05, True, False
        seen.released.set()
        assert (await runtime.breakers.status("dependency")).state is BreakerState.HALF_OPEN

        # The dead probes hold their slots until their leases end, and not for ever.
        first_lease_ends = min(at for at, _ in probes) + config.probe_lease
        last_lease_ends = max(at for at, _ in probes) + config.probe_lease
        bound = last_lease_ends + RECOVERY_MARGIN
        await state_becomes(runtime, BreakerState.CLOSED, timeout=max(0.1, bound - time.time()))
        assert seen.between(killed_at, first_lease_ends - 0.2) == []

        # Every run completes: the killed workers' own runs once their run leases end.
        deadline = time.monotonic() + settings.lease_seconds + 20
        for n, handle in enumerate(handles):
            assert await handle.result(timeout=max(0.1, deadline - time.monotonic())) == n
        assert (await runtime.breakers.status("dependency")).state is BreakerState.CLOSED
    finally:
        workers.stop_all()
        await runtime.close()
