"""Crash safety, proven by crashing: worker subprocesses killed with SIGKILL or stopped with
SIGTERM mid-run, side effects counted in a table."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow import Client, RunStatus, Runtime, Settings
from tenantflow.store.records import StepStatus
from tests.apps import durable, effects
from tests.conftest import cleanup_production, production_settings, settings_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv(effects.ENV, str(tmp_path / "effects.db"))
    if backend == "embedded":
        yield Settings(home=tmp_path / "home", lease_seconds=1.5, poll_interval=0.02)
        return
    settings = production_settings(tmp_path, lease_seconds=1.5, poll_interval=0.02)
    yield settings
    cleanup_production(settings)


class Workers:
    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        *,
        step_seconds: float = 0.15,
        grace: float = 5.0,
        concurrency: int = 8,
        app: str = "tests.apps.durable:app",
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **settings_env(self.settings),
            "PYTHONPATH": str(ROOT),
            "TENANTFLOW_SHUTDOWN_GRACE_SECONDS": str(grace),
            "TENANTFLOW_TEST_STEP_SECONDS": str(step_seconds),
            "TENANTFLOW_LOG_FORMAT": "json",
            **(env or {}),
        }
        with (self.tmp_path / f"worker{len(self.procs)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tenantflow",
                    "worker",
                    "--app",
                    app,
                    "--concurrency",
                    str(concurrency),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(settings, tmp_path)
    yield w
    w.stop_all()


async def wait_until(predicate: object, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_kill_9_mid_run_resumes_without_rerunning_committed_steps(
    runtime: Runtime, workers: Workers
) -> None:
    tenant = Client(durable.app, runtime=runtime).tenant("acme")
    store = tenant.store
    handles = [await tenant.start(durable.many_steps, 8) for _ in range(4)]

    async def committed() -> dict[str, set[int]]:
        out = {}
        for h in handles:
            out[h.run_id] = {
                s.seq for s in await store.get_steps(h.run_id) if s.status is StepStatus.COMPLETED
            }
        return out

    async def some_run_is_midway() -> bool:
        return any(2 <= len(seqs) < 8 for seqs in (await committed()).values())

    first = workers.start()
    await wait_until(some_run_is_midway, what="a run with committed steps")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    before_kill = await committed()
    unfinished = [h for h in handles if not (await h.status()).terminal]
    assert unfinished, "the kill came too late to interrupt a run"

    workers.start()
    results = [await h.result(timeout=60) for h in handles]
    assert results == [sum(range(8))] * 4

    counts = effects.counts()
    for run_id, seqs in before_kill.items():
        for seq in seqs:  # committed before the kill: never ran again
            assert counts[f"{run_id}:{seq}"] == 1, (run_id, seq)
    for h in handles:
        for seq in range(8):
            assert counts.get(f"{h.run_id}:{seq}", 0) >= 1
    # At most the one step in flight per interrupted run ran twice (at least once).
    assert sum(counts.values()) <= 4 * 8 + len(unfinished)
    for h in unfinished:
        run = await h.describe()
        assert run.status is RunStatus.COMPLETED and run.recoveries >= 1


async def test_durable_sleep_survives_a_worker_restart(runtime: Runtime, workers: Workers) -> None:
    tenant = Client(durable.app, runtime=runtime).tenant("acme")
    handle = await tenant.start(durable.sleeper, 1.5)
    first = workers.start()

    async def sleeping() -> bool:
        return await handle.status() is RunStatus.SLEEPING

    await wait_until(sleeping, what="the run to sleep")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    workers.start()
    assert await handle.result(timeout=30) == "awake"
    steps = await handle.steps()
    sleep_step = steps[1]
    assert sleep_step.kind.value == "sleep"
    assert steps[2].started_at >= sleep_step.started_at + 1.5
    counts = effects.counts()
    assert counts == {f"{handle.run_id}:0": 1, f"{handle.run_id}:2": 1}


async def test_sigterm_lets_the_running_step_finish_then_gives_the_run_back(
    runtime: Runtime, workers: Workers
) -> None:
    tenant = Client(durable.app, runtime=runtime).tenant("acme")
    handle = await tenant.start(durable.many_steps, 3)
    first = workers.start(step_seconds=1.0, grace=5.0)

    async def running() -> bool:
        return await handle.status() is RunStatus.RUNNING

    await wait_until(running, what="the run to start")
    await asyncio.sleep(0.3)  # inside step 0
    first.send_signal(signal.SIGTERM)
    assert first.wait(10) == 0
    steps = await handle.steps()
    assert [s.seq for s in steps] == [0]  # the step in flight finished and was committed
    assert await handle.status() is RunStatus.QUEUED  # given back, not left leased
    workers.start(step_seconds=0.05)
    assert await handle.result(timeout=30) == 0 + 1 + 2
    assert set(effects.counts().values()) == {1}


async def test_sigterm_past_the_grace_period_releases_the_run(
    runtime: Runtime, workers: Workers
) -> None:
    tenant = Client(durable.app, runtime=runtime).tenant("acme")
    handle = await tenant.start(durable.mixed)
    first = workers.start(step_seconds=3.0, grace=0.3)

    async def running() -> bool:
        return await handle.status() is RunStatus.RUNNING

    await wait_until(running, what="the run to start")
    await asyncio.sleep(0.2)
    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    first.wait(15)
    # The blocking step's thread cannot be interrupted; the process still exits promptly.
    assert time.monotonic() - started < 5
    assert await handle.status() is RunStatus.QUEUED
    assert await handle.steps() == []
    workers.start(step_seconds=0.05)
    assert await handle.result(timeout=30) == 10 + 2
