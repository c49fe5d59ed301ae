"""Plans and licenses enforced, on both backends: monthly quota, entitlements, seats, the cap on
concurrent runs, the request rate, the dispatch weight; suspending, resuming and offboarding a
tenant; the tenant plane working through a platform outage until its cached license expires."""

from __future__ import annotations

import asyncio
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tenantflow import Runtime, Settings
from tenantflow.api.app import create_api
from tenantflow.errors import InvalidInputError, LicenseError
from tenantflow.platform.identity import Role
from tenantflow.platform.licensing import Quotas, verify_license
from tenantflow.store.records import RunStatus
from tests.apps import api as workflows
from tests.conftest import running_worker
from tests.integration.test_api import (
    PASSWORD,
    admin,
    assert_problem,
    bearer,
    finished,
    member,
    platform_call,
    token,
)


@pytest.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantflow.test") as c:
        yield c


async def on_plan(runtime: Runtime, tenant: str, plan: str, quotas: Quotas, *codes: str) -> None:
    platform = runtime.platform
    await platform_call(
        platform.create_plan, "system", plan, name=plan, entitlements=codes or ("*",), quotas=quotas
    )
    await platform_call(platform.set_plan, "system", tenant, plan)


async def test_monthly_quota_and_entitlements(runtime: Runtime, http: httpx.AsyncClient) -> None:
    await on_plan(runtime, "acme", "starter", Quotas(runs_per_month=3), "greet")
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    start = {"workflow": "greet", "args": ["x"]}
    for _ in range(3):
        assert (await http.post("/v1/runs", json=start, headers=alice)).status_code == 202
    refused = await http.post("/v1/runs", json=start, headers=alice)
    assert_problem(refused, 429, "quota-exceeded")
    assert int(refused.headers["retry-after"]) > 0
    runs = await runtime.router.store("acme").list_runs(limit=100)
    assert len(runs) == 3  # the refused submit created nothing
    # A repeated idempotency key returns its run and does not count.
    keyed = {**alice, "Idempotency-Key": "k"}
    slow = {"workflow": "slow", "args": [0.1]}
    assert_problem(await http.post("/v1/runs", json=slow, headers=alice), 403, "not-entitled")
    assert_problem(await http.post("/v1/runs", json=start, headers=keyed), 429, "quota-exceeded")
    # Another tenant, on no plan, is not limited.
    bob = await member(runtime, http, "bob@globex.test", "globex", Role.OPERATOR)
    for _ in range(5):
        assert (await http.post("/v1/runs", json=start, headers=bob)).status_code == 202


async def test_quota_holds_under_concurrent_submits(runtime: Runtime) -> None:
    from tenantflow import Client

    await on_plan(runtime, "acme", "tight", Quotas(runs_per_month=10))
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    outcomes = await asyncio.gather(
        *(tenant.start(workflows.greet, str(i)) for i in range(25)), return_exceptions=True
    )
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(accepted) == 10, refused[:3]
    assert all(type(e).__name__ == "QuotaExceededError" for e in refused)
    assert len(await tenant.list_runs(limit=100)) == 10


async def test_seats(runtime: Runtime, http: httpx.AsyncClient) -> None:
    await on_plan(runtime, "acme", "duo", Quotas(seats=2))
    root = await admin(runtime, http)
    await member(runtime, http, "a@acme.test", "acme", Role.TENANT_ADMIN)
    boss = await member(runtime, http, "b@acme.test", "acme", Role.VIEWER)
    extra = await http.post(
        "/platform/v1/users", json={"email": "c@acme.test", "password": "long enough"}, headers=root
    )
    assert extra.status_code == 201, extra.text
    over = await http.put(
        "/platform/v1/tenants/acme/memberships",
        json={"user_id": extra.json()["id"], "role": "viewer"},
        headers=root,
    )
    assert_problem(over, 409, "seats-exhausted")
    # Changing an existing member's role takes no new seat.
    users = {
        u["email"]: u["id"] for u in (await http.get("/platform/v1/users", headers=root)).json()
    }
    promoted = await http.put(
        "/platform/v1/tenants/acme/memberships",
        json={"user_id": users["b@acme.test"], "role": "operator"},
        headers=root,
    )
    assert promoted.status_code == 200, promoted.text
    assert (await http.get("/v1/runs", headers=boss)).status_code == 200
    actions = [
        e["action"]
        for e in (
            await http.get("/platform/v1/audit", params={"tenant": "acme"}, headers=root)
        ).json()["entries"]
    ]
    assert actions.count("membership.added") == 2 and "membership.role_changed" in actions
    assert "license.issued" in actions and "tenant.plan_changed" in actions


@pytest.mark.parametrize("weight", [1, 3], ids=["weight-1", "heavy"])
async def test_workers_hold_a_tenant_to_its_concurrent_runs(runtime: Runtime, weight: int) -> None:
    """The cap holds for a tenant whose dispatch weight would give it most of the workers."""
    from tenantflow import Client

    await on_plan(runtime, "acme", "single", Quotas(concurrent_runs=2, dispatch_weight=weight))
    acme = Client(workflows.app, runtime=runtime).tenant("acme")
    globex = Client(workflows.app, runtime=runtime).tenant("globex")
    capped = [await acme.start(workflows.slow, 0.3) for _ in range(6)]
    free = [await globex.start(workflows.slow, 0.3) for _ in range(6)]
    most = {"acme": 0, "globex": 0}

    async def watch() -> None:
        while True:
            for name, client in (("acme", acme), ("globex", globex)):
                running = await client.list_runs(status=RunStatus.RUNNING, limit=100)
                most[name] = max(most[name], len(running))
            await asyncio.sleep(0.02)

    async with running_worker(workflows.app, runtime, concurrency=16):
        watcher = asyncio.create_task(watch())
        try:
            for handle in capped + free:
                assert await handle.result(timeout=60) == 0.3
        finally:
            watcher.cancel()
    assert most["acme"] <= 2, most
    assert most["globex"] > 2, most  # the cap is the tenant's, not everyone's


async def test_a_heavier_plan_takes_a_bigger_share_of_the_workers(runtime: Runtime) -> None:
    """Two tenants flood the workers; the one on a plan of dispatch weight 3 gets about three
    runs to the other's one (on a plan of the default weight) while both have work waiting."""
    from tenantflow import Client

    # The heavier tenant second by name, so that no tie between the two is broken its way.
    await on_plan(runtime, "globex", "gold", Quotas(dispatch_weight=3))
    await on_plan(runtime, "acme", "standard", Quotas())
    backlog, served = 150, 120
    for name in ("acme", "globex"):
        tenant = Client(workflows.app, runtime=runtime).tenant(name)
        for _ in range(backlog):
            await tenant.start(workflows.slow, 0.01)
    await runtime.outbox.published()

    async def completed() -> dict[str, int]:
        return {
            name: await runtime.router.store(name).count_runs(status=RunStatus.COMPLETED)
            for name in ("acme", "globex")
        }

    # Two at a time: a busy worker's dequeues are of a slot or two, as its runs finish.
    async with running_worker(workflows.app, runtime, concurrency=2):
        deadline = time.monotonic() + 60
        while sum((await completed()).values()) < served:
            assert time.monotonic() < deadline, await completed()
            await asyncio.sleep(0.05)
    done = await completed()
    assert max(done.values()) < backlog, done  # both still had work waiting at the end
    assert 2 <= done["globex"] / done["acme"] <= 4, done


async def test_a_dispatch_weight_out_of_bounds_is_refused(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    for bad in (0, -1, 101, 10**12, 2.5, "3", True, None):
        reply = await http.post(
            "/platform/v1/plans",
            json={"id": "bad", "name": "Bad", "quotas": {"dispatch_weight": bad}},
            headers=root,
        )
        body = assert_problem(reply, 422, "invalid-request")
        assert [e["loc"] for e in body["errors"]] == ["body.quotas.dispatch_weight"], bad
    made = await http.post(
        "/platform/v1/plans",
        json={"id": "gold", "name": "Gold", "quotas": {"dispatch_weight": 3.0}},
        headers=root,
    )
    assert made.status_code == 201, made.text
    assert made.json()["quotas"]["dispatch_weight"] == 3
    plain = await http.post("/platform/v1/plans", json={"id": "basic", "name": "B"}, headers=root)
    assert plain.json()["quotas"]["dispatch_weight"] == 1  # the default, every tenant's before
    listed = (await http.get("/platform/v1/plans", headers=root)).json()
    assert {p["id"]: p["quotas"]["dispatch_weight"] for p in listed} == {"basic": 1, "gold": 3}
    # From Python, the same bounds, as a named error.
    with pytest.raises(InvalidInputError, match="dispatch weight is a whole number from 1 to 100"):
        await platform_call(
            runtime.platform.create_plan,
            "system",
            "zero",
            name="Zero",
            entitlements=["*"],
            quotas=Quotas(dispatch_weight=0),
        )
    # A license signed for it carries the weight the worker gives the queue.
    await platform_call(runtime.platform.set_plan, "system", "acme", "gold")
    license = await runtime.license("acme")
    assert license is not None and license.quotas.dispatch_weight == 3


async def test_request_rate(runtime: Runtime, http: httpx.AsyncClient) -> None:
    await on_plan(runtime, "acme", "slowpoke", Quotas(requests_per_second=5))
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.VIEWER)
    bob = await member(runtime, http, "bob@globex.test", "globex", Role.VIEWER)
    statuses = [(await http.get("/v1/runs", headers=alice)).status_code for _ in range(12)]
    assert statuses.count(200) <= 6 and 429 in statuses, statuses
    limited = await http.get("/v1/runs", headers=alice)
    assert_problem(limited, 429, "rate-limited")
    assert int(limited.headers["retry-after"]) >= 1
    # Another tenant is not slowed down by acme's traffic.
    assert [(await http.get("/v1/runs", headers=bob)).status_code for _ in range(12)] == [200] * 12
    await asyncio.sleep(1.0)
    assert (await http.get("/v1/runs", headers=alice)).status_code == 200


async def test_suspend_and_resume_lose_nothing(runtime: Runtime, http: httpx.AsyncClient) -> None:
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    start = {"workflow": "greet", "args": ["x"]}
    queued = [
        (await http.post("/v1/runs", json=start, headers=alice)).json()["id"] for _ in range(3)
    ]
    suspended = await http.post("/platform/v1/tenants/acme/suspend", headers=root)
    assert suspended.json()["status"] == "suspended"
    # Every token of the suspended tenant is refused at once, and none is issued.
    assert_problem(await http.post("/v1/runs", json=start, headers=alice), 409, "tenant-suspended")
    assert_problem(await http.get("/v1/runs", headers=alice), 409, "tenant-suspended")
    assert_problem(
        await http.post(
            "/platform/v1/token",
            json={
                "grant_type": "password",
                "email": "alice@acme.test",
                "password": PASSWORD,
                "tenant": "acme",
            },
        ),
        409,
        "tenant-suspended",
    )
    store = runtime.router.store("acme")
    async with running_worker(workflows.app, runtime):
        await asyncio.sleep(1.5)
        for run_id in queued:  # the worker does not take the suspended tenant's runs
            run = await store.get_run(run_id)
            assert run is not None and run.status is RunStatus.QUEUED
        resumed = await http.post("/platform/v1/tenants/acme/resume", headers=root)
        assert resumed.json()["status"] == "active"
        # A token from before the suspension stays refused; a new one serves.
        assert_problem(await http.get("/v1/runs", headers=alice), 401, "invalid-token")
        alice = bearer(
            await token(
                http,
                grant_type="password",
                email="alice@acme.test",
                password=PASSWORD,
                tenant="acme",
            )
        )
        for run_id in queued:
            assert (await finished(http, alice, run_id))["status"] == "completed"


async def test_offboarding_exports_then_drops(runtime: Runtime, http: httpx.AsyncClient) -> None:
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    async with running_worker(workflows.app, runtime):
        run_id = (
            await http.post("/v1/runs", json={"workflow": "greet", "args": ["bye"]}, headers=alice)
        ).json()["id"]
        await finished(http, alice, run_id)
    url = (await platform_call(runtime.registry.get, "acme")).database_url
    reply = await http.post("/platform/v1/tenants/acme/offboard", headers=root)
    assert reply.status_code == 200, reply.text
    archive = runtime.settings.home / "archives" / reply.json()["archive"]
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        runs = tar.extractfile("runs.jsonl")
        assert runs is not None
        exported = runs.read().decode()
    assert {"runs.jsonl", "steps.jsonl", "events.jsonl", "tenant.json"} <= names
    assert run_id in exported and "hello bye" in exported
    assert_problem(await http.get("/platform/v1/tenants/acme", headers=root), 404, "not-found")
    assert await database_gone(url)
    audit = (await http.get("/platform/v1/audit", params={"tenant": "acme"}, headers=root)).json()
    assert audit["entries"][-1]["action"] == "tenant.offboarded"
    assert "postgresql://" not in str(audit) and "sqlite://" not in str(audit)


async def database_gone(url: str) -> bool:
    if url.startswith("sqlite:///"):
        return not Path(url.removeprefix("sqlite:///")).exists()
    import psycopg

    from tenantflow.platform.provision import database_name, with_database

    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as admin_conn:
        row = admin_conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database_name(url),)
        ).fetchone()
    return row is None


@pytest.fixture
def short_licenses(settings: Settings) -> Iterator[Settings]:
    """Licenses that live 8 s, fetched every 0.5 s. A license is renewed once past half its
    life and its expiry is a whole second, so the one held when the outage begins has at least
    8 - 4 - 0.5 - 1 = 2.5 s left: enough for the submit made 1 s into the outage."""
    yield settings.model_copy(update={"license_ttl_seconds": 8.0, "license_refresh_seconds": 0.5})


async def test_the_tenant_plane_rides_out_a_platform_outage(short_licenses: Settings) -> None:
    runtime = Runtime(short_licenses)
    try:
        await outage_scenario(runtime)
    finally:
        await runtime.close()


async def outage_scenario(runtime: Runtime) -> None:
    from tenantflow import Client

    await platform_call(runtime.registry.create, "acme")
    await on_plan(runtime, "acme", "pro", Quotas(runs_per_month=1000))
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    async with running_worker(workflows.app, runtime):
        assert await (await tenant.start(workflows.greet, "before")).result(timeout=30)
        claims = await runtime.license("acme")
        assert claims is not None and claims.plan_id == "pro"
        with platform_down(runtime):
            # Keys, license and the tenant's record are cached: submits and runs go on.
            await asyncio.sleep(1.0)
            handle = await tenant.start(workflows.greet, "during")
            assert await handle.result(timeout=30) == "hello during"
            # Once the cached license expires, the tenant's submits are refused.
            await asyncio.sleep(max(0.0, claims.expires_at - time.time()) + 6.0)
            with pytest.raises(LicenseError):
                await tenant.start(workflows.greet, "too late")
        await asyncio.sleep(1.0)  # the platform is back: a fresh license is fetched
        assert await (await tenant.start(workflows.greet, "after")).result(timeout=30)
    # The cached copy on disk verifies offline against the cached keys.
    keys = runtime.artifacts.keys()
    document = (runtime.settings.home / "cache" / "license-acme.json").read_text()
    import json

    assert verify_license(json.loads(document)["document"], keys, tenant_id="acme").plan_id == "pro"


class platform_down:
    """The platform database unreachable: on SQLite its file moved away (and the pool
    emptied); on PostgreSQL the database renamed (its sessions ended first)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.url = runtime.settings.resolved_database_url()

    def __enter__(self) -> None:
        self._swap(down=True)

    def __exit__(self, *exc: object) -> None:
        self._swap(down=False)

    def _swap(self, *, down: bool) -> None:
        self.runtime.registry.engine.dispose()
        if self.url.startswith("sqlite:///"):
            path = Path(self.url.removeprefix("sqlite:///"))
            away = path.with_suffix(".away")
            if not down and path.is_dir():
                path.rmdir()
            src, dst = (path, away) if down else (away, path)
            for suffix in ("", "-wal", "-shm"):
                moved = Path(f"{src}{suffix}")
                if moved.exists():
                    moved.rename(f"{dst}{suffix}")
            if down:  # a connection attempt must fail, not create an empty database
                path.mkdir()
            else:
                # A thread of the worker that connected between the rmdir and the rename
                # created an empty database there, now replaced: its pooled connection would
                # fail every read from then on (a CI run's "license has expired" after the
                # platform was back). Connections made before now are dropped.
                self.runtime.registry.engine.dispose()
            return
        import psycopg
        from psycopg import sql

        from tenantflow.platform.provision import database_name, with_database

        name = database_name(self.url)
        source, target = (name, f"{name}_away") if down else (f"{name}_away", name)
        with psycopg.connect(with_database(self.url, "postgres"), autocommit=True) as admin_conn:
            admin_conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (source,),
            )
            admin_conn.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(source), sql.Identifier(target)
                )
            )
