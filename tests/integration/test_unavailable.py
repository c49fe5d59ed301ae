"""What is missing is said quickly and says nothing of the servers: a tenant whose database is
gone answers 503 at once; log lines and `tenants migrate` name no database, host, port or
user; an API started while the platform database is down serves from its cached, signed
artifacts."""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
from pathlib import Path

import httpx

from tenantflow import Client, Runtime, Settings
from tenantflow.errors import TenantDatabaseMissingError
from tenantflow.platform.identity import Role
from tenantflow.platform.licensing import Quotas
from tenantflow.platform.provision import PostgresProvisioner, with_database
from tests.apps import api as workflows
from tests.commands import free_port, tenantflow
from tests.conftest import POSTGRES_URL, cleanup_production, production_settings, settings_env
from tests.integration.test_api import PASSWORD, assert_problem, bearer, http, member
from tests.integration.test_cli_ops import in_background, serving
from tests.servers import OwnPostgres

__all__ = ["http"]  # the fixture, used by name


async def test_a_tenant_whose_database_is_gone_answers_503_at_once(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    assert (await http.get("/v1/runs", headers=alice)).status_code == 200
    await runtime.router.forget("acme")
    tenant = runtime.registry.get("acme")
    runtime.registry.provisioner_for(tenant.server_id).drop_database("acme")
    for method, path, body in [
        ("GET", "/v1/runs", None),
        ("GET", "/v1/runs/0123456789abcdef0123456789abcdef", None),
        ("POST", "/v1/runs", {"workflow": "greet", "args": ["x"]}),
    ]:
        began = time.monotonic()
        reply = await http.request(method, path, json=body, headers=alice)
        assert time.monotonic() - began < 2.0
        problem = assert_problem(reply, 503, "tenant-database-missing")
        assert reply.headers["retry-after"] == "30"
        assert "acme" not in problem["detail"] and "tenant_" not in reply.text
    # Another tenant is not affected.
    bob = await member(runtime, http, "bob@globex.test", "globex", Role.OPERATOR)
    assert (await http.get("/v1/runs", headers=bob)).status_code == 200


def _server_details(settings: Settings, tenant: str) -> list[str]:
    """What no line may show of a tenant's database: its name, host, port and user (on the
    embedded default: its folder)."""
    if settings.database_url is None:
        return [str(settings.home.resolve())]
    name = f"{settings.tenant_db_prefix}tenant_{tenant}"
    return [name, "127.0.0.1", ":5432", "port 5432", 'user "postgres"', "postgres@"]


def test_worker_logs_name_no_server(settings: Settings, tmp_path: Path) -> None:
    """A worker whose tenant's database is gone, in JSON lines: every line names the tenant,
    none its database, host, port or user."""
    runtime = Runtime(settings)
    tenant = runtime.registry.create("acme")

    async def submit() -> None:
        handle = (
            await Client(workflows.app, runtime=runtime).tenant("acme").start(workflows.greet, "x")
        )
        assert handle.run_id
        await runtime.outbox.published()
        await runtime.close()

    asyncio.run(submit())
    runtime.registry.provisioner_for(tenant.server_id).drop_database("acme")
    env = {**settings_env(settings), "TENANTFLOW_LOG_FORMAT": "json"}
    worker = in_background("worker", "--app", "tests.apps.api:app", cwd=tmp_path, env=env)
    time.sleep(6)
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=60)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("tenant") == "acme"]
    assert failed, out
    assert all(line["level"] in ("warning", "error") for line in failed), failed
    logged = "\n".join(json.dumps(line) for line in lines)
    for detail in _server_details(settings, "acme"):
        assert detail not in logged, (detail, logged)
    # One line each, saying why (PostgreSQL's words, or tenantflow's on SQLite).
    assert all("exception" not in line for line in failed), failed
    reasons = {line["error"] for line in failed}
    assert reasons <= {'database "…" does not exist', TenantDatabaseMissingError().message}, reasons


def test_tenants_migrate_names_no_server(settings: Settings, tmp_path: Path) -> None:
    runtime = Runtime(settings)
    tenant = runtime.registry.create("acme")
    runtime.registry.create("globex")
    asyncio.run(runtime.close())
    runtime.registry.provisioner_for(tenant.server_id).drop_database("acme")
    done = tenantflow("tenants", "migrate", cwd=tmp_path, env=settings_env(settings))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 migrated, 1 already at head, 1 failed" in done.stdout
    failure = [line for line in done.stdout.splitlines() if line.startswith("failed acme")]
    assert len(failure) == 1, done.stdout
    for detail in _server_details(settings, "acme"):
        assert detail not in done.stdout + done.stderr, (detail, done.stdout)
    report = json.loads(
        tenantflow("tenants", "migrate", "--json", cwd=tmp_path, env=settings_env(settings)).stdout
    )
    assert list(report["failed"]) == ["acme"]


def test_an_api_started_during_a_platform_outage_serves_from_its_cache(tmp_path: Path) -> None:
    """The platform database on a server of its own, stopped between two starts of the API;
    the tenant's database on another server, which stays up. The second start serves the
    tenant from what the first cached (keys, license, route), says it is not ready, and is
    ready once the platform answers again."""
    # Not under pytest's temporary folder, which the postgres user may not enter.
    with tempfile.TemporaryDirectory() as folder, OwnPostgres(Path(folder)) as own:
        settings = production_settings(tmp_path, database_url=with_database(own.url, "platform"))
        try:
            runtime = Runtime(settings)
            runtime.platform.add_server("system", "tenants", POSTGRES_URL)
            runtime.registry.set_accepting(runtime.registry.DEFAULT_SERVER, False)
            runtime.platform.create_plan(
                "system", "pro", name="Pro", entitlements=["*"], quotas=Quotas(seats=5)
            )
            assert runtime.platform.create_tenant("system", "acme", plan_id="pro").server_id == (
                "tenants"
            )
            alice = runtime.platform.create_user("system", "alice@acme.test", PASSWORD)
            runtime.platform.set_membership("system", alice.id, "acme", Role.OPERATOR)
            asyncio.run(runtime.close())
            env = settings_env(settings)
            start = {"workflow": "greet", "args": ["x"]}
            with serving(tmp_path, free_port(), env=env, worker=False) as base:
                signed_in = httpx.post(f"{base}/platform/v1/token", json=grant(PASSWORD))
                alice_token = bearer(signed_in.json()["access_token"])
                before = httpx.post(f"{base}/v1/runs", json=start, headers=alice_token)
                assert before.status_code == 202, before.text
            own.stop()
            with serving(tmp_path, free_port(), env=env, worker=False) as base:
                assert httpx.get(f"{base}/healthz").status_code == 200
                unready = httpx.get(f"{base}/readyz")
                assert unready.status_code == 503
                assert unready.json()["checks"]["platform_database"].startswith("failed")
                run_path = f"{base}/v1/runs/{before.json()['id']}"
                shown = httpx.get(run_path, headers=alice_token)
                assert shown.status_code == 200, shown.text
                during = httpx.post(f"{base}/v1/runs", json=start, headers=alice_token)
                assert during.status_code == 202, during.text
                listed = httpx.get(f"{base}/v1/runs", headers=alice_token).json()["runs"]
                assert {r["id"] for r in listed} == {before.json()["id"], during.json()["id"]}
                own.start()
                deadline = time.monotonic() + 30
                while httpx.get(f"{base}/readyz").status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            cache = settings.home / "cache" / "tenants" / "acme.json"
            assert cache.stat().st_mode & 0o077 == 0  # it holds the database's URL: ours alone
        finally:
            if own.proc is None:
                own.start()
            cleanup_production(settings)
            PostgresProvisioner(POSTGRES_URL, settings.tenant_db_prefix).drop_all()


def grant(password: str) -> dict[str, str]:
    return {
        "grant_type": "password",
        "email": "alice@acme.test",
        "password": password,
        "tenant": "acme",
    }
