"""One circuit breaker for four worker processes, on PostgreSQL + Redis (on the embedded default
each process has breakers of its own, by design): a dependency on loopback fails, and the
breaker opens once the failure rate is reached counting every process's calls; while it is
open no call reaches the dependency; after the wait, no more than the configured number of
probes reach it in total; the successful probes close it and every run completes."""

from __future__ import annotations

import asyncio
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


@dataclass
class Dependency:
    """What the dependency saw: (receipt time, caller pid) per call; fails until healed."""

    healthy: bool = False
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
                healthy = seen.healthy
            if healthy:
                time.sleep(PROBE_SECONDS)
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield seen, f"http://127.0.0.1:{server.server_address[1]}/"
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
