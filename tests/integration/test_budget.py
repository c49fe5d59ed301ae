"""The connection budget, on a PostgreSQL server of the tests' own (counted from the server):
however many tenants are active, a process holds at most ``database_connections``; a caller
past the wait gets ``DatabaseBusyError`` (HTTP 503); sweeps open no session to idle tenants."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tenantflow import Client, Runtime, Settings
from tenantflow.api.app import create_api
from tenantflow.errors import DatabaseBusyError
from tenantflow.platform.identity import Role
from tenantflow.platform.provision import with_database
from tenantflow.store.db import PostgresDatabase
from tenantflow.store.sql import SqlRunStore
from tenantflow.telemetry.health import survey
from tenantflow.worker.maintenance import Maintenance
from tests.apps import api as workflows
from tests.conftest import running_worker
from tests.integration.test_api import assert_problem
from tests.servers import OwnPostgres

APP_NAME = "tf-budget-test"
MakeRuntime = Callable[..., Runtime]


@pytest.fixture(scope="module")
def own_pg() -> Iterator[OwnPostgres]:
    # Not under pytest's temporary folder, which the postgres user may not enter.
    with tempfile.TemporaryDirectory() as folder, OwnPostgres(Path(folder)) as pg:
        yield pg


@pytest.fixture
async def make_runtime(
    own_pg: OwnPostgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeRuntime]:
    """Runtimes on the own server whose sessions carry ``APP_NAME``; closed at the end."""
    monkeypatch.setenv("PGAPPNAME", APP_NAME)  # libpq names every session of this process
    made: list[Runtime] = []

    def make(name: str, **overrides: object) -> Runtime:
        values: dict[str, object] = {
            "home": tmp_path / name,
            "database_url": with_database(own_pg.url, f"{name}_platform"),
            "tenant_db_prefix": f"{name}_",
            "tenant_template": "budget_template",  # migrated once for the module
            "lease_seconds": 2.0,
            "poll_interval": 0.02,
            "reconcile_interval": 0.5,
            **overrides,
        }
        runtime = Runtime(Settings(**values))  # type: ignore[arg-type]
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        await runtime.close()


class Watch(threading.Thread):
    """The most sessions named ``APP_NAME`` seen at once, sampled every 5 ms."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, application_name="watch") as conn:
            while not self.stopped.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (APP_NAME,),
                ).fetchone()
                self.peak = max(self.peak, int(row[0]) if row else 0)
                time.sleep(0.005)

    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(10)


async def test_connections_stay_within_the_budget_with_many_tenants_active(
    own_pg: OwnPostgres, make_runtime: MakeRuntime
) -> None:
    runtime = make_runtime("many", database_connections=8)
    tenants = [f"t{i:02d}" for i in range(24)]
    for tenant_id in tenants:
        runtime.registry.create(tenant_id)
    client = Client(workflows.app, runtime=runtime)
    with Watch(own_pg.url) as watch:
        handles = await asyncio.gather(
            *(client.tenant(t).start(workflows.greet, str(i)) for i in range(4) for t in tenants)
        )
        async with running_worker(workflows.app, runtime):
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            # Reads of every tenant at once as well, while the worker claims and finishes.
            await asyncio.gather(*(client.tenant(t).list_runs() for t in tenants))
    assert sorted(results) == sorted(f"hello {i}" for i in range(4) for _ in tenants)
    assert 0 < watch.peak <= 8
    assert runtime.router.budget.peak == 8 - 4  # reached: the platform database has 4 of them
    assert runtime.router.budget.open <= runtime.router.budget.limit


async def test_a_caller_past_the_wait_gets_a_503_problem(make_runtime: MakeRuntime) -> None:
    # 5 connections: 4 for the platform database, 1 for every tenant database together.
    runtime = make_runtime("busy", database_connections=5, database_wait_seconds=0.5)
    runtime.registry.create("acme")
    runtime.registry.create("globex")
    _, secret = runtime.platform.create_api_key("k", "acme", "k", Role.OPERATOR)
    headers = {"Authorization": f"Bearer {runtime.platform.token_for_api_key(secret).access_token}"}
    acme, globex = (runtime.router.store(t) for t in ("acme", "globex"))
    assert isinstance(acme, SqlRunStore) and isinstance(acme.db, PostgresDatabase)
    assert isinstance(globex, SqlRunStore) and isinstance(globex.db, PostgresDatabase)
    transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
        async with globex.db.pool.connection():  # the one tenant connection, held
            started = time.monotonic()
            with pytest.raises(DatabaseBusyError):
                await acme.list_runs()
            assert 0.4 < time.monotonic() - started < 3
            reply = await http.post(
                "/v1/runs", json={"workflow": "greet", "args": ["x"]}, headers=headers
            )
            body = assert_problem(reply, 503, "database-busy")
            assert reply.headers["retry-after"] == "1"
            assert "connection" in body["detail"]
            # A caller that waits its turn gets the connection once it is given back (the
            # idle one of globex is closed to make room for acme's).
            waiting = asyncio.create_task(acme.list_runs())
            await asyncio.sleep(0.1)
            assert not waiting.done()
        assert await waiting == []
        reply = await http.post(
            "/v1/runs", json={"workflow": "greet", "args": ["x"]}, headers=headers
        )
        assert reply.status_code == 202, reply.text
    assert runtime.router.budget.open == 1


def sessions(url: str, prefix: str) -> dict[str, int]:
    """Sessions ever opened on each of the databases named ``prefix*`` (statistics lag a
    little: a session counts once it has been reported)."""
    with psycopg.connect(url, autocommit=True, application_name="watch") as conn:
        rows = conn.execute(
            "SELECT datname, sessions FROM pg_stat_database WHERE datname LIKE %s",
            (f"{prefix}%",),
        ).fetchall()
    return {name: int(count) for name, count in rows}


@pytest.mark.parametrize("sweep", ["maintenance", "survey"])
async def test_sweeps_open_no_session_to_idle_tenants(
    own_pg: OwnPostgres, make_runtime: MakeRuntime, sweep: str
) -> None:
    """The relay and reconciler, and the stuck-run detector's survey (behind /readyz, the
    gauges and `tenantflow status`), read only the database of the tenant with work."""
    runtime = make_runtime(sweep, stuck_run_seconds=0.5)
    for i in range(10):
        runtime.registry.create(f"idle{i}")
    runtime.registry.create("busy")
    handle = await Client(workflows.app, runtime=runtime).tenant("busy").start(workflows.greet, "x")
    await runtime.router.close()  # its sessions end: the counts below are of the sweeps alone
    await asyncio.sleep(1.5)
    before = sessions(own_pg.url, f"{sweep}_tenant_")
    sweeps = Maintenance(runtime, "test")
    for _ in range(5):
        if sweep == "maintenance":
            report = await sweeps.run_once()
            assert report.ran and report.tenants == 1
        else:
            found = {t.tenant_id: t for t in await survey(runtime)}
            assert len(found) == 11 and found["busy"].stuck_runs == 1  # queued, no worker
            assert found["busy"].queue_depth == 1
            assert sum(t.stuck_runs + t.queue_depth for t in found.values()) == 2
        await runtime.router.close()  # a new session for each sweep, if any were made
    await asyncio.sleep(1.5)
    after = sessions(own_pg.url, f"{sweep}_tenant_")
    assert set(before) == set(after) and len(after) == 11
    opened = {name: after[name] - before[name] for name in after}
    assert opened.pop(f"{sweep}_tenant_busy") >= 1
    assert set(opened.values()) == {0}, opened
    async with running_worker(workflows.app, runtime):
        assert await handle.result(timeout=30) == "hello x"
