"""Circuit breakers, on both backends: opening on the failure rate and the slow-call rate in
count- and time-based windows, waiting while open, a limited number of half-open probes
counted across processes, probes' slots as leases (a lost probe frees its slot when its lease
ends; a late answer is not counted), the local fallback without Redis, a step that waits out
an open breaker without using up its retries, and bulkhead slots' leases."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from tenantflow import (
    App,
    BreakerConfig,
    BulkheadConfig,
    BulkheadFullError,
    CircuitOpenError,
    Client,
    RetryPolicy,
    Runtime,
    WorkflowContext,
)
from tenantflow.coordination.redis import RedisCoordination
from tenantflow.resilience.breaker import (
    Breakers,
    BreakerState,
    LocalBreakers,
    Permit,
    RedisBreakers,
    WindowType,
)
from tests.conftest import running_worker

SMALL = BreakerConfig(
    window_size=4, minimum_calls=4, failure_rate=50, wait_open=0.5, half_open_calls=2
)


async def outcomes(breakers: Breakers, name: str, *failed: bool) -> None:
    for f in failed:
        permit = await breakers.acquire(name)
        await breakers.record(permit, failed=f)


async def test_opens_waits_probes_and_closes(runtime: Runtime) -> None:
    breakers = runtime.breakers
    breakers.configure("payments", SMALL)
    await outcomes(breakers, "payments", True, False, False)  # 1 of 3: below the minimum
    assert (await breakers.status("payments")).state is BreakerState.CLOSED
    await outcomes(breakers, "payments", True)  # 2 of 4 failed: 50%
    status = await breakers.status("payments")
    assert status.state is BreakerState.OPEN and 0 < status.retry_after <= 0.5
    with pytest.raises(CircuitOpenError) as refused:
        await breakers.acquire("payments")
    assert 0 < refused.value.retry_after <= 0.5
    await asyncio.sleep(0.55)
    first = await breakers.acquire("payments")
    second = await breakers.acquire("payments")
    assert first.probe and second.probe
    with pytest.raises(CircuitOpenError):  # only two probes at a time
        await breakers.acquire("payments")
    await breakers.record(first, failed=False)
    await breakers.record(second, failed=False)
    assert (await breakers.status("payments")).state is BreakerState.CLOSED
    await outcomes(breakers, "payments", False, False)  # a fresh window after closing


async def test_a_failed_probe_reopens(runtime: Runtime) -> None:
    breakers = runtime.breakers
    breakers.configure("ledger", SMALL)
    await outcomes(breakers, "ledger", True, True, True, True)
    await asyncio.sleep(0.55)
    probes = [await breakers.acquire("ledger") for _ in range(2)]
    await breakers.record(probes[0], failed=True)
    await breakers.record(probes[1], failed=False)
    assert (await breakers.status("ledger")).state is BreakerState.OPEN


async def test_slow_calls_and_the_time_window(runtime: Runtime) -> None:
    breakers = runtime.breakers
    breakers.configure(
        "slowpoke",
        BreakerConfig(
            window_type=WindowType.TIME,
            window_size=2,
            minimum_calls=3,
            slow_call_seconds=0.05,
            slow_call_rate=60,
            wait_open=5,
        ),
    )

    async def call(seconds: float) -> None:
        await breakers.call("slowpoke", lambda: asyncio.sleep(seconds))

    await call(0.0)
    await call(0.06)
    await asyncio.sleep(2.1)  # the first two calls fall out of the 2 s window
    await call(0.06)
    await call(0.0)
    assert (await breakers.status("slowpoke")).state is BreakerState.CLOSED  # 1 of 2
    await call(0.06)  # 2 slow of 3 in the window: 67%
    status = await breakers.status("slowpoke")
    assert status.state is BreakerState.OPEN, status
    with pytest.raises(CircuitOpenError):
        await call(0.0)


async def test_probes_are_counted_across_processes(runtime: Runtime) -> None:
    """Two runtimes (as two worker processes would) share one breaker: together they get no
    more half-open probes than the breaker allows."""
    other = Runtime(runtime.settings)
    try:
        for rt in (runtime, other):
            rt.breakers.configure("shared", SMALL)
        await outcomes(runtime.breakers, "shared", True, True, False, True)
        if isinstance(runtime.breakers.backend, LocalBreakers):
            # The embedded default: each process has its own breakers.
            assert (await other.breakers.status("shared")).state is BreakerState.CLOSED
            return
        assert (await other.breakers.status("shared")).state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError):
            await other.breakers.acquire("shared")
        await asyncio.sleep(0.55)
        granted = 0
        for rt in (runtime, other, runtime, other):
            try:
                await rt.breakers.acquire("shared")
                granted += 1
            except CircuitOpenError:
                pass
        assert granted == SMALL.half_open_calls
    finally:
        await other.close()


LEASED = dataclasses.replace(SMALL, probe_timeout=0.1)  # leases of 1.1 s: timeout plus margin


async def half_open_probes(breakers: Breakers, name: str) -> tuple[Permit, Permit]:
    """Trip ``name`` (configured as LEASED), wait it out, and take both of its probe slots."""
    breakers.configure(name, LEASED)
    await outcomes(breakers, name, True, True, True, True)
    await asyncio.sleep(LEASED.wait_open + 0.05)
    first, second = await breakers.acquire(name), await breakers.acquire(name)
    assert first.probe and second.probe
    return first, second


async def after_lease(permit: Permit) -> None:
    await asyncio.sleep(permit.started + LEASED.probe_lease + 0.05 - time.monotonic())


async def test_a_lost_probe_frees_its_slot_when_its_lease_ends(runtime: Runtime) -> None:
    """Two probes are let through and never answer (their worker died): until their leases
    end nothing else is let through, then the next callers get their slots, and their
    answers close the breaker."""
    breakers = runtime.breakers
    first, _ = await half_open_probes(breakers, "lost")
    shared = runtime.coordination if isinstance(runtime.coordination, RedisCoordination) else None
    if shared is not None:  # the lease ends on the Redis clock
        _, _, probes = shared.keys.breaker("lost")
        seconds, micros = await shared.redis.time()
        lease_end = await shared.redis.zscore(probes, first.probe)
        expected = seconds * 1000 + micros // 1000 + LEASED.probe_lease * 1000
        assert abs(lease_end - expected) < 100, (lease_end, expected)
    while time.monotonic() < first.started + LEASED.probe_lease - 0.15:
        with pytest.raises(CircuitOpenError) as refused:
            await breakers.acquire("lost")
        assert refused.value.retry_after == 1.0
        await asyncio.sleep(0.1)
    assert (await breakers.status("lost")).state is BreakerState.HALF_OPEN
    await after_lease(first)
    again = [await breakers.acquire("lost") for _ in range(2)]
    assert all(p.probe for p in again)
    with pytest.raises(CircuitOpenError):
        await breakers.acquire("lost")
    for permit in again:
        await breakers.record(permit, failed=False)
    assert (await breakers.status("lost")).state is BreakerState.CLOSED


async def test_a_probe_that_answers_after_its_lease_is_not_counted(runtime: Runtime) -> None:
    """Two probes answer after their leases ended and their slots went to two others: the
    late failure does not reopen the breaker, nor take a slot; the new probes' successes close
    it; the late success that comes after does not count in the closed breaker's window."""
    breakers = runtime.breakers
    late_failure, late_success = await half_open_probes(breakers, "late")
    await after_lease(late_success)
    first, second = await breakers.acquire("late"), await breakers.acquire("late")
    assert first.probe and second.probe
    await breakers.record(late_failure, failed=True)
    assert (await breakers.status("late")).state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError):  # its slot was given to a probe still in flight
        await breakers.acquire("late")
    await breakers.record(first, failed=False)
    await breakers.record(second, failed=False)
    assert (await breakers.status("late")).state is BreakerState.CLOSED
    await breakers.record(late_success, failed=False)
    status = await breakers.status("late")
    assert status.state is BreakerState.CLOSED and status.calls == 0


def test_the_probe_timeout_is_a_positive_number_of_seconds() -> None:
    assert BreakerConfig().probe_lease == 61.0
    for wrong in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="probe timeout"):
            BreakerConfig(probe_timeout=wrong)


async def test_without_redis_each_process_falls_back_to_its_own(runtime: Runtime) -> None:
    unreachable = RedisCoordination("redis://127.0.0.1:1", timeout=0.2)
    breakers = Breakers(RedisBreakers(unreachable))
    try:
        breakers.configure("payments", SMALL)
        await outcomes(breakers, "payments", True, True, True, True)
        status = await breakers.status("payments")
        assert status.state is BreakerState.OPEN  # the local breaker took over
        with pytest.raises(CircuitOpenError):
            await breakers.acquire("payments")
    finally:
        await unreachable.close()


# -- a step behind a breaker -----------------------------------------------------------------

app = App("breaker-tests")
app.breaker(
    "flaky-api",
    BreakerConfig(
        window_size=4, minimum_calls=4, failure_rate=50, wait_open=0.6, half_open_calls=1
    ),
)
DOWN: dict[str, Any] = {"until": 0.0, "calls": 0}


@app.step(breaker="flaky-api", retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
async def call_api(i: int) -> int:
    DOWN["calls"] += 1
    if time.monotonic() < DOWN["until"]:
        raise ConnectionError("the API is down")
    return i


@app.workflow
async def uses_api(ctx: WorkflowContext, i: int) -> int:
    return await call_api(i)


async def test_an_open_breaker_makes_steps_wait_not_fail(runtime: Runtime) -> None:
    """The API is down for a second and the breaker already open (other calls failed): the
    runs' steps wait for it instead of calling a dead API and using up their retries."""
    runtime.breakers.configure("flaky-api", app.breakers["flaky-api"])
    await outcomes(runtime.breakers, "flaky-api", True, True, True, True)
    DOWN.update(until=time.monotonic() + 1.0, calls=0)
    tenant = Client(app, runtime=runtime).tenant("acme")
    async with running_worker(app, runtime, concurrency=8):
        handles = [await tenant.start(uses_api, i) for i in range(8)]
        results = [await h.result(timeout=30) for h in handles]
    assert results == list(range(8))
    # One probe at a time reached the dead API; every run finished within its 2 attempts.
    attempts = [(await h.steps())[0].attempts for h in handles]
    assert all(a <= 2 for a in attempts), attempts
    assert DOWN["calls"] <= 8 + 3, DOWN["calls"]


async def test_per_tenant_breakers_are_apart(runtime: Runtime) -> None:
    breakers = runtime.breakers
    breakers.configure("api", SMALL)
    await outcomes(breakers, "api@acme", True, True, True, True)
    assert (await breakers.status("api@acme")).state is BreakerState.OPEN
    assert (await breakers.status("api@globex")).state is BreakerState.CLOSED
    await breakers.acquire("api@globex")


async def test_breaker_state_over_the_api(runtime: Runtime) -> None:
    import httpx

    from tenantflow.api.app import create_api
    from tenantflow.platform.identity import Role
    from tests.integration.test_api import member

    transport = httpx.ASGITransport(app=create_api(app, runtime=runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantflow.test") as http:
        alice = await member(runtime, http, "alice@acme.test", "acme", Role.VIEWER)
        closed = (await http.get("/v1/breakers", headers=alice)).json()
        assert closed == [
            {
                "name": "flaky-api",
                "state": "closed",
                "calls": 0,
                "failure_rate": None,
                "slow_call_rate": None,
                "retry_after": 0.0,
            }
        ]
        await outcomes(runtime.breakers, "flaky-api", True, True, True, True)
        (tripped,) = (await http.get("/v1/breakers", headers=alice)).json()
        assert tripped["state"] == "open" and 0 < tripped["retry_after"] <= 0.6


# -- bulkheads --------------------------------------------------------------------------------

IN_DB: dict[str, int] = {"now": 0, "most": 0}
app.bulkhead("db", BulkheadConfig(max_concurrent=2, lease_seconds=30))


@app.step(bulkhead="db")
async def query(i: int) -> int:
    IN_DB["now"] += 1
    IN_DB["most"] = max(IN_DB["most"], IN_DB["now"])
    try:
        await asyncio.sleep(0.1)
    finally:
        IN_DB["now"] -= 1
    return i


@app.workflow
async def uses_db(ctx: WorkflowContext, i: int) -> int:
    return await query(i)


async def test_a_bulkhead_bounds_concurrent_calls_of_a_step(runtime: Runtime) -> None:
    IN_DB.update(now=0, most=0)
    tenant = Client(app, runtime=runtime).tenant("acme")
    async with running_worker(app, runtime, concurrency=16):
        handles = [await tenant.start(uses_db, i) for i in range(10)]
        assert [await h.result(timeout=30) for h in handles] == list(range(10))
    assert IN_DB["most"] == 2


async def test_a_bulkhead_is_shared_by_processes(runtime: Runtime) -> None:
    """Two runtimes (two processes' worth) share the slots on Redis; on the embedded default
    each process has its own."""
    other = Runtime(runtime.settings)
    inside = {"now": 0, "most": 0}

    async def work() -> None:
        inside["now"] += 1
        inside["most"] = max(inside["most"], inside["now"])
        await asyncio.sleep(0.05)
        inside["now"] -= 1

    try:
        for rt in (runtime, other):
            rt.bulkheads.configure("partner", BulkheadConfig(max_concurrent=3))
        await asyncio.gather(
            *(rt.bulkheads.call("partner", work, wait=10) for rt in [runtime, other] * 6)
        )
        shared = runtime.bulkheads.coordination is not None
        assert inside["most"] == (3 if shared else 6)
        assert await runtime.bulkheads.in_use("partner") == 0
        slots = [await runtime.bulkheads.take("partner") for _ in range(3)]
        with pytest.raises(BulkheadFullError):
            await (other if shared else runtime).bulkheads.take("partner")
        assert await runtime.bulkheads.in_use("partner") == 3
        for slot in slots:
            await runtime.bulkheads.give_back(slot)
        assert await runtime.bulkheads.in_use("partner") == 0
    finally:
        await other.close()


@pytest.mark.parametrize("backend", ["production"])  # on the embedded default: per process
async def test_a_lost_bulkhead_slot_comes_back_when_its_lease_ends(runtime: Runtime) -> None:
    """Slots taken by a process that died (never given back) are held until their leases end
    on the Redis clock, then go to the next callers; giving one back late frees nothing else."""
    bulkheads = runtime.bulkheads
    bulkheads.configure("lost", BulkheadConfig(max_concurrent=2, lease_seconds=0.5))
    lost = [await bulkheads.take("lost") for _ in range(2)]
    taken = time.monotonic()
    with pytest.raises(BulkheadFullError) as full:
        await bulkheads.take("lost")
    assert 0 < full.value.retry_after <= 0.5
    assert await bulkheads.in_use("lost") == 2
    await asyncio.sleep(taken + 0.55 - time.monotonic())
    assert await bulkheads.in_use("lost") == 0
    again = [await bulkheads.take("lost") for _ in range(2)]
    for slot in lost:
        await bulkheads.give_back(slot)
    assert await bulkheads.in_use("lost") == 2
    with pytest.raises(BulkheadFullError):
        await bulkheads.take("lost")
    for slot in again:
        await bulkheads.give_back(slot)
    assert await bulkheads.in_use("lost") == 0
