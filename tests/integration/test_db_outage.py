"""Database faults as tenantflow's callers see them, on a PostgreSQL server of the tests' own
that is restarted, stopped and frozen: the first calls after a restart succeed (no pooled
connection that died with the old server is used); during an outage every call gets
``StoreUnavailableError`` (HTTP 503 ``database-unavailable``) within the configured wait, never
a driver's exception, never an unbounded block; and a worker running multi-step runs through
an outage longer than its lease executes no step twice but the ones the outage interrupted."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tenantflow import Client, Runtime, StoreUnavailableError
from tenantflow.api.app import create_api
from tenantflow.platform.identity import Role
from tenantflow.store.db import HOLD_MARGIN_SECONDS, PostgresDatabase
from tenantflow.store.sql import SqlRunStore
from tests.apps import api as workflows
from tests.apps import durable, effects
from tests.conftest import REDIS_URL, cleanup_redis
from tests.integration.test_api import assert_problem
from tests.integration.test_budget import MakeRuntime, make_runtime, own_pg
from tests.integration.test_crash import Workers, wait_until
from tests.servers import OwnPostgres

__all__ = ["make_runtime", "own_pg"]  # fixtures, used by name
pytestmark = pytest.mark.slow
WAIT = 1.0  # TENANTFLOW_DATABASE_WAIT_SECONDS of these tests


@asynccontextmanager
async def api_of(runtime: Runtime, tenant_id: str) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API of ``runtime``, with the headers of an operator of ``tenant_id``."""
    _, secret = runtime.platform.create_api_key("k", tenant_id, "k", Role.OPERATOR)
    token = runtime.platform.token_for_api_key(secret).access_token
    transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=runtime))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://t.test",
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        yield http


async def within(seconds: float, call: Awaitable[Any]) -> Any:
    """``call``'s answer, asserting it came within ``seconds``."""
    started = time.monotonic()
    try:
        return await asyncio.wait_for(call, seconds + 5)
    finally:
        took = time.monotonic() - started
        assert took < seconds, f"answered after {took:.2f} s"


async def test_the_first_calls_after_a_restart_succeed(
    own_pg: OwnPostgres, make_runtime: MakeRuntime
) -> None:
    runtime = make_runtime("restart", tenant_pool_size=4)
    runtime.registry.create("acme")
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    async with api_of(runtime, "acme") as http:
        # Several connections of the tenant's database in the pool, idle.
        handles = await asyncio.gather(*(tenant.start(workflows.greet, str(i)) for i in range(8)))
        assert (await http.get("/v1/runs")).status_code == 200
        store = runtime.router.store("acme")
        assert isinstance(store, SqlRunStore) and isinstance(store.db, PostgresDatabase)
        pooled = len(runtime.router.budget._idle_of[store.db.pool.database])
        assert pooled >= 2

        own_pg.restart()  # every one of those connections is dead now

        reply = await http.post("/v1/runs", json={"workflow": "greet", "args": ["h"]})
        assert reply.status_code == 202, reply.text
        assert (await http.get(reply.headers["location"])).status_code == 200
        calls: list[Callable[[], Awaitable[object]]] = [
            *(h.describe for h in handles),
            tenant.list_runs,
            lambda: tenant.start(workflows.greet, "after"),
        ]
        await asyncio.gather(*(call() for call in calls))  # together, as many as were pooled
        for call in calls:  # and one after the other
            await call()
    assert pooled + 1 <= len(calls)


async def test_an_outage_answers_store_unavailable_within_the_wait(
    own_pg: OwnPostgres, make_runtime: MakeRuntime
) -> None:
    runtime = make_runtime("outage", database_wait_seconds=WAIT, database_timeout_seconds=5)
    runtime.registry.create("acme")
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    async with api_of(runtime, "acme") as http:
        handle = await tenant.start(workflows.greet, "before")
        assert (await http.get("/v1/runs")).status_code == 200  # keys and license cached

        own_pg.stop()
        try:
            for attempt in range(2):  # the second after the tenant's cached record expired
                for call in (
                    lambda: tenant.start(workflows.greet, "during"),
                    handle.describe,
                    tenant.list_runs,
                ):
                    with pytest.raises(StoreUnavailableError, match="did not answer"):
                        await within(WAIT, call())
                for request in (
                    http.post("/v1/runs", json={"workflow": "greet", "args": ["during"]}),
                    http.get(f"/v1/runs/{handle.run_id}"),
                    http.get("/v1/runs"),
                ):
                    reply = await within(WAIT, request)
                    assert_problem(reply, 503, "database-unavailable")
                    assert reply.headers["retry-after"] == "2"
                if attempt == 0:
                    await asyncio.sleep(2.1)  # TENANT_CACHE_SECONDS
        finally:
            own_pg.start()
        # Back: the next calls go through.
        assert (await http.post("/v1/runs", json={"workflow": "greet", "args": ["x"]})).is_success
        assert (await tenant.start(workflows.greet, "after")).run_id


async def test_a_server_that_accepts_no_connection_is_an_error_within_the_wait(
    own_pg: OwnPostgres, make_runtime: MakeRuntime
) -> None:
    """The postmaster frozen (a server gone from the network looks the same to a client): a
    new connection is never answered, so the wait bounds it, not the connect timeout (60 s
    here)."""
    runtime = make_runtime("frozen", database_wait_seconds=WAIT, database_timeout_seconds=60)
    runtime.registry.create("acme")
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    async with api_of(runtime, "acme") as http:
        assert runtime.router.budget.open == 0  # no tenant connection yet: each call opens one
        own_pg.freeze()
        try:
            with pytest.raises(StoreUnavailableError, match=f"within {WAIT:g} s"):
                await within(WAIT + 0.5, tenant.start(workflows.greet, "frozen"))
            reply = await within(
                WAIT + 0.5, http.post("/v1/runs", json={"workflow": "greet", "args": ["frozen"]})
            )
            assert_problem(reply, 503, "database-unavailable")
        finally:
            own_pg.thaw()
        assert (await tenant.start(workflows.greet, "thawed")).run_id
    assert runtime.router.budget.open <= 1


async def test_a_server_that_stops_answering_mid_session_is_an_error_within_its_bound(
    own_pg: OwnPostgres, make_runtime: MakeRuntime
) -> None:
    """Every server process frozen with sessions open: the kernel still takes the bytes and
    answers keepalives, and the server's own statement timeout cannot fire, so only the
    client's bound ends the statement (TENANTFLOW_DATABASE_TIMEOUT_SECONDS plus a margin);
    the call gets StoreUnavailableError, the connection is dropped, and once the server is
    back the next call succeeds."""
    runtime = make_runtime("hung", database_wait_seconds=WAIT, database_timeout_seconds=1)
    runtime.registry.create("acme")
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    handle = await tenant.start(workflows.greet, "before")  # a session open, and idle
    bound = 1 + HOLD_MARGIN_SECONDS
    own_pg.freeze_all()
    try:
        with pytest.raises(StoreUnavailableError, match=f"did not answer within {bound:g} s"):
            await within(bound + 1.0, handle.describe())
    finally:
        own_pg.thaw()
    assert (await within(5.0, handle.describe())).id == handle.run_id
    assert runtime.router.budget.open <= 1


async def test_an_unreachable_server_holds_no_call_past_the_connect_bound(
    own_pg: OwnPostgres, make_runtime: MakeRuntime
) -> None:
    """Every session cut and no new one answered: once the tenant's cached record is stale,
    a call asks the platform database first (its connection is bounded by the wait too, but
    psycopg waits 2 s at least), then the tenant's."""
    runtime = make_runtime("cut", database_wait_seconds=WAIT, database_timeout_seconds=60)
    runtime.registry.create("acme")
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    bound = 2 + WAIT + 0.5
    async with api_of(runtime, "acme") as http:
        handle = await tenant.start(workflows.greet, "before")
        assert (await http.get("/v1/runs")).status_code == 200
        own_pg.cut_off()
        try:
            await asyncio.sleep(2.1)  # TENANT_CACHE_SECONDS
            with pytest.raises(StoreUnavailableError):
                await within(bound, handle.describe())
            with pytest.raises(StoreUnavailableError):
                await within(bound, tenant.start(workflows.greet, "cut"))
            await asyncio.sleep(2.1)
            reply = await within(bound, http.get(f"/v1/runs/{handle.run_id}"))
            assert_problem(reply, 503, "database-unavailable")
        finally:
            own_pg.thaw()
        assert (await http.get(f"/v1/runs/{handle.run_id}")).status_code == 200


RUNS = 16
STEPS = 6


@pytest.mark.parametrize(
    ("how", "lease", "outage"),
    [
        pytest.param("stopped", 2.0, 4.0, id="stopped-longer-than-the-lease"),
        pytest.param("unreachable", 1.0, 4.0, id="unreachable-longer-than-the-lease"),
        pytest.param("stopped", 6.0, 1.0, id="stopped-shorter"),
    ],
)
async def test_steps_run_once_through_an_outage(
    own_pg: OwnPostgres,
    make_runtime: MakeRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    lease: float,
    outage: float,
) -> None:
    """Two worker processes run multi-step runs, and the database goes away for ``outage``
    seconds: stopped (a fast shutdown), or unreachable (its sessions cut, new connections
    never answered). Half the runs were submitted just before, so the relay publishes their
    messages again once it is back: duplicate deliveries of runs being executed. Each
    execution of a step is recorded with its process and its span in a ledger of its own (a
    SQLite file), outside tenantflow.

    The steps that may run twice are exactly those the outage interrupted: of each run, the
    last step to start before the database went away, whose checkpoint could not be committed
    while the lease lasted; through an outage shorter than the lease, none. No step starts
    while the database is away, no two executions of a run ever overlap (in one process or
    two), and the workers resume by themselves."""
    monkeypatch.setenv(effects.ENV, str(tmp_path / "ledger.db"))
    runtime = make_runtime(
        f"{how}{int(outage)}",
        queue_url=REDIS_URL,
        queue_prefix=f"tftest{uuid.uuid4().hex[:10]}",
        lease_seconds=lease,
        database_wait_seconds=WAIT,
        tenant_pool_size=1,  # claims queue for the connection, some past the lease
    )
    workers = Workers(runtime.settings, tmp_path)
    try:
        runtime.registry.create("acme")
        tenant = Client(durable.app, runtime=runtime).tenant("acme")
        handles = [await tenant.start(durable.many_steps, STEPS) for _ in range(RUNS)]
        procs = [workers.start(step_seconds=0.25, concurrency=16) for _ in range(2)]

        async def midway() -> bool:
            return len(effects.executions()) >= RUNS

        await wait_until(midway, what="steps executed")
        # Submitted as the database goes: their outbox records outlive their publication
        # (the cleanup fails), so the relay publishes them again once it is back.
        handles += [await tenant.start(durable.many_steps, STEPS) for _ in range(RUNS)]
        if how == "stopped":
            own_pg.stop()
        else:  # connections cut, new ones never answered: the calls wait for the connect
            own_pg.cut_off()
        down_at = time.time()
        await asyncio.sleep(outage)
        back_at = time.time()  # it accepts connections from a moment later
        own_pg.start() if how == "stopped" else own_pg.thaw()
        results = [await h.result(timeout=45) for h in handles]
        assert all(proc.poll() is None for proc in procs)
    finally:
        workers.stop_all()
        cleanup_redis(runtime.settings)
    assert results == [sum(range(STEPS))] * len(handles)

    runs: dict[str, list[effects.Execution]] = defaultdict(list)
    for execution in effects.executions():  # in the order they started
        runs[execution.key.rsplit(":", 1)[0]].append(execution)
    assert set(runs) == {h.run_id for h in handles}
    repeated = set()
    for run_id, executions in runs.items():
        counts = Counter(e.key for e in executions)
        assert set(counts) == {f"{run_id}:{seq}" for seq in range(STEPS)}
        started_before = [e for e in executions if e.started < down_at]
        interrupted = started_before[-1].key if started_before else None
        for key, count in counts.items():
            if count > 1:
                assert key == interrupted and count == 2, (key, count, interrupted)
                assert max(e.started for e in executions if e.key == key) > back_at
                repeated.add(key)
        for before, after in itertools.pairwise(executions):
            assert after.started >= before.ended, f"two executions of {run_id} at once"
        assert not [e for e in executions if down_at <= e.started <= back_at]
    if outage < lease:
        assert not repeated  # the commits waited for the database within the lease
    else:
        assert repeated  # the outage did interrupt steps (else this proves little)
