"""What is missing is said quickly and says nothing of the servers: a tenant whose database is
gone answers 503 at once; log lines and `tenants migrate` name no database, host, port or
user; an API started while the platform database is down serves from its cached, signed
artifacts."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx

from tenantflow import Client, Runtime, Settings
from tenantflow.errors import TenantDatabaseMissingError
from tenantflow.platform.identity import Role
from tests.apps import api as workflows
from tests.commands import tenantflow
from tests.conftest import settings_env
from tests.integration.test_api import assert_problem, http, member
from tests.integration.test_cli_ops import in_background

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
        await runtime.published()
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
