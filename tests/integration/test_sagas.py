"""Sagas on both backends: failures before and after each step, an ambiguous timeout, a
failure past the pivot, a compensation that fails, a cancel while waiting; and many sagas at
once with the ledger's invariant (money is neither made nor lost), in one process and through
worker processes one of which is killed."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tenantflow import Client, RunHandle, Runtime, Settings
from tenantflow.errors import RunFailedError
from tenantflow.store.records import RunStatus
from tests.apps import effects, sagas
from tests.conftest import running_worker
from tests.integration.test_crash import Workers

OUTCOMES = {
    "": RunStatus.COMPLETED,
    "debit-before": RunStatus.COMPENSATED,
    "debit-after": RunStatus.COMPENSATED,
    "credit-before": RunStatus.COMPENSATED,
    "credit-after": RunStatus.COMPENSATED,
    "credit-timeout": RunStatus.COMPENSATED,
    "notify": RunStatus.COMPENSATED,
    "after-pivot": RunStatus.NEEDS_ATTENTION,
    "undo-credit-late": RunStatus.NEEDS_ATTENTION,
}


@pytest.fixture(autouse=True)
def ledger(
    runtime: Runtime, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The ledger in the effects database: SQLite, or the test's PostgreSQL platform database
    (created by ``runtime``)."""
    monkeypatch.setenv(effects.ENV, settings.database_url or str(tmp_path / "effects.db"))
    sagas.create_ledger()
    yield


def balances() -> dict[str, int]:
    rows = effects.execute("SELECT account, SUM(delta) FROM ledger GROUP BY account")
    return {str(a): int(s) for a, s in rows}


def entries(transfer_id: str) -> set[str]:
    rows = effects.execute("SELECT key FROM ledger WHERE key LIKE ?", (f"{transfer_id}:%",))
    return {str(r[0]).split(":", 1)[1] for r in rows}


async def test_each_failure_ends_in_the_right_state(runtime: Runtime) -> None:
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    handles = {
        fail: await tenant.start(sagas.transfer, f"t-{fail or 'ok'}", "alice", "bob", 10, fail)
        for fail in OUTCOMES
    }
    async with running_worker(sagas.app, runtime):
        for fail, handle in handles.items():
            if OUTCOMES[fail] is RunStatus.COMPLETED:
                assert await handle.result(timeout=30) == "done"
            else:
                with pytest.raises(RunFailedError) as failed:
                    await handle.result(timeout=30)
                assert failed.value.status == OUTCOMES[fail].value, fail
    expected_entries = {
        "": {"debit", "credit"},
        "debit-before": set(),
        "debit-after": {"debit", "undo-debit"},
        "credit-before": {"debit", "undo-debit"},
        "credit-after": {"debit", "credit", "undo-debit", "undo-credit"},
        "credit-timeout": {"debit", "credit", "undo-debit", "undo-credit"},
        "notify": {"debit", "credit", "undo-debit", "undo-credit"},
        "after-pivot": {"debit", "credit"},
        "undo-credit-late": {"debit", "credit"},
    }
    for fail, expected in expected_entries.items():
        assert entries(f"t-{fail or 'ok'}") == expected, fail
    assert sum(balances().values()) == 0  # money is neither made nor lost
    # The compensated runs say why they compensated; needs_attention says what went wrong.
    notify = await handles["notify"].describe()
    assert notify.error_info is not None and notify.error_info["type"] == "StepFailedError"
    stuck = await handles["undo-credit-late"].describe()
    assert stuck.error_info is not None
    assert stuck.error_info["type"] == "CompensationFailedError"
    steps = [(s.name, s.status.value) for s in await handles["credit-after"].steps()]
    assert steps == [
        ("debit", "completed"),
        ("credit", "failed"),
        ("undo_credit", "completed"),
        ("undo_debit", "completed"),
    ]


async def test_cancelling_a_waiting_saga_compensates(runtime: Runtime) -> None:
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    async with running_worker(sagas.app, runtime):
        handle = await tenant.start(sagas.transfer, "t-cancel", "alice", "bob", 25, "wait")
        for _ in range(300):
            if await handle.status() is RunStatus.WAITING:
                break
            await asyncio.sleep(0.02)
        assert await handle.status() is RunStatus.WAITING
        assert entries("t-cancel") == {"debit", "credit"}
        await handle.cancel()
        with pytest.raises(RunFailedError) as failed:
            await handle.result(timeout=30)
    assert failed.value.status == "compensated"
    assert entries("t-cancel") == {"debit", "credit", "undo-debit", "undo-credit"}
    assert balances() == {"alice": 0, "bob": 0}


async def test_cancelling_a_running_step_compensates_it(runtime: Runtime) -> None:
    """A cancel interrupts the running (async) step; its outcome is unknown, so its
    compensation, registered before it, runs."""
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    async with running_worker(sagas.app, runtime):
        handle = await tenant.start(sagas.transfer, "t-run", "alice", "bob", 4, "debit-slow")
        for _ in range(300):
            if entries("t-run"):
                break
            await asyncio.sleep(0.02)
        assert entries("t-run") == {"debit"}
        assert await handle.cancel() is RunStatus.RUNNING
        with pytest.raises(RunFailedError) as failed:
            await handle.result(timeout=30)
    assert failed.value.status == "compensated"
    assert entries("t-run") == {"debit", "undo-debit"}
    assert [(s.name, s.status.value) for s in await handle.steps()] == [("undo_debit", "completed")]


async def test_a_slow_compensation_is_not_cut_short_by_the_cancel(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker keeps seeing the run's cancel request while it compensates; the
    compensations must still run to the end."""
    monkeypatch.setattr(sagas, "UNDO_SECONDS", 1.2)  # longer than the cancel polling
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    async with running_worker(sagas.app, runtime):
        handle = await tenant.start(sagas.transfer, "t-slow", "alice", "bob", 3, "wait")
        for _ in range(300):
            if await handle.status() is RunStatus.WAITING:
                break
            await asyncio.sleep(0.02)
        await handle.cancel()
        with pytest.raises(RunFailedError) as failed:
            await handle.result(timeout=30)
    assert failed.value.status == "compensated"
    assert entries("t-slow") == {"debit", "credit", "undo-debit", "undo-credit"}


Transfer = tuple[str, str, str, int, str]  # id, from, to, amount, failure mode


def mixed_transfers(prefix: str, n: int = 210) -> list[Transfer]:
    """``n`` transfers over seven accounts, every failure mode in turn."""
    modes = list(OUTCOMES)
    accounts = [f"acct{i}" for i in range(7)]
    return [
        (
            f"{prefix}{i}",
            accounts[i % 7],
            accounts[(i * 3 + 1) % 7],
            1 + i % 13,
            modes[i % len(modes)],
        )
        for i in range(n)
    ]


async def assert_each_ends_right(plan: list[Transfer], handles: list[RunHandle[str]]) -> None:
    """Every saga ends in its mode's state, the balances sum to zero, and every compensated
    saga undid each entry it applied."""
    statuses: Counter[RunStatus] = Counter()
    for (tid, _, _, _, fail), handle in zip(plan, handles, strict=True):
        try:
            await handle.result(timeout=120)
            status = RunStatus.COMPLETED
        except RunFailedError as failed:
            status = RunStatus(failed.status)
        assert status is OUTCOMES[fail], (tid, fail, status)
        statuses[status] += 1
    assert sum(statuses.values()) == len(plan)
    assert sum(balances().values()) == 0
    for tid, _, _, _, fail in plan:
        keys = entries(tid)
        if OUTCOMES[fail] is RunStatus.COMPENSATED:
            assert {k for k in keys if not k.startswith("undo-")} <= {
                k.removeprefix("undo-") for k in keys if k.startswith("undo-")
            }, (tid, keys)


async def test_many_sagas_keep_the_ledger_balanced(runtime: Runtime) -> None:
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    plan = mixed_transfers("m")
    handles = [await tenant.start(sagas.transfer, *p) for p in plan]
    async with running_worker(sagas.app, runtime, concurrency=64):
        await assert_each_ends_right(plan, handles)
    assert set(effects.counts().values()) == {1}  # each compensation ran once here


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(settings, tmp_path)
    yield w
    w.stop_all()


async def test_a_worker_killed_mid_compensation(runtime: Runtime, workers: Workers) -> None:
    """kill -9 while the second compensation runs: another worker resumes the compensation
    without running the first one again, and each takes effect once."""
    slow_undo = {"TENANTFLOW_TEST_UNDO_SECONDS": "1.5"}
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    handle = await tenant.start(sagas.transfer, "t-kill", "alice", "bob", 5, "credit-after")
    first = workers.start(app="tests.apps.sagas:app", env=slow_undo)
    for _ in range(600):  # undo_credit committed: undo_debit (slow) is running
        names = [(s.name, s.status.value) for s in await handle.steps()]
        if ("undo_credit", "completed") in names:
            break
        await asyncio.sleep(0.02)
    assert ("undo_credit", "completed") in names, names
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert entries("t-kill") == {"debit", "credit", "undo-credit"}  # undo_debit not done
    workers.start(app="tests.apps.sagas:app", env=slow_undo)
    with pytest.raises(RunFailedError) as failed:
        await handle.result(timeout=60)
    assert failed.value.status == "compensated"
    assert entries("t-kill") == {"debit", "credit", "undo-credit", "undo-debit"}
    assert effects.counts() == {"t-kill:undo-credit": 1, "t-kill:undo-debit": 1}
    assert balances() == {"alice": 0, "bob": 0}
    run = await handle.describe()
    assert run.recoveries == 1


@pytest.mark.slow
async def test_many_sagas_through_worker_processes_one_killed(
    runtime: Runtime, workers: Workers
) -> None:
    """210 mixed sagas through three worker processes; one is killed with SIGKILL midway and
    replaced. Every saga still ends in its state, the ledger balances, and every entry and
    compensation took effect once (the ledger's keys are unique); only runs the killed worker
    held may have executed a compensation twice."""
    slow_undo = {"TENANTFLOW_TEST_UNDO_SECONDS": "0.05"}  # compensations in flight when killed
    concurrency = 16
    tenant = Client(sagas.app, runtime=runtime).tenant("acme")
    plan = mixed_transfers("p")
    handles = [await tenant.start(sagas.transfer, *p) for p in plan]
    procs = [
        workers.start(app="tests.apps.sagas:app", env=slow_undo, concurrency=concurrency)
        for _ in range(3)
    ]
    for _ in range(1500):  # a third of them ended
        ended = sum(r.status.terminal for r in await tenant.list_runs(limit=500))
        if ended >= 70:
            break
        await asyncio.sleep(0.02)
    assert 70 <= ended < 210, ended
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)
    workers.start(app="tests.apps.sagas:app", env=slow_undo, concurrency=concurrency)
    await assert_each_ends_right(plan, handles)
    # A compensation ran twice only in a run taken over from the killed worker.
    recovered = {
        tid
        for (tid, *_), handle in zip(plan, handles, strict=True)
        if (await handle.describe()).recoveries > 0
    }
    assert 0 < len(recovered) <= concurrency, recovered
    again = {key.split(":")[0] for key, n in effects.counts().items() if n > 1}
    assert again <= recovered, (again, recovered)
