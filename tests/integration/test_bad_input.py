"""Input that no JSON or no column can hold gets a clear error, on both backends: numbers JSON
has not (NaN, Infinity, beyond a double) over HTTP and from Python, integers beyond what the
columns and the stored JSON take, never a 500 and never a value stored as something else."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import pytest

from tenantflow import Client, Runtime
from tenantflow.errors import ConfigError, InvalidInputError, SerializationError
from tenantflow.platform.identity import Role
from tenantflow.platform.licensing import Quotas
from tenantflow.serde import NOT_JSON_NUMBER
from tests.apps import api as workflows
from tests.commands import free_port
from tests.conftest import POSTGRES_URL, running_worker
from tests.integration.test_api import (
    admin,
    assert_problem,
    finished,
    http,
    member,
    platform_call,
)

__all__ = ["http"]  # the fixture, used by name

NOT_JSON = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
HUGE = 2**70


async def post_raw(
    http: httpx.AsyncClient, path: str, text: str, headers: dict[str, str]
) -> httpx.Response:
    """A body sent as it is written (httpx's own encoder would refuse NaN)."""
    json_headers = {**headers, "Content-Type": "application/json"}
    return await http.post(path, content=text.encode(), headers=json_headers)


async def test_numbers_json_has_not_are_refused_over_http(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    root = await admin(runtime, http)
    waiting = await http.post("/v1/runs", json={"workflow": "approval", "args": [1]}, headers=alice)
    run_id = waiting.json()["id"]
    event = f"/v1/runs/{run_id}/events/decision"
    for number in NOT_JSON:
        for path, text, headers in [
            ("/v1/runs", f'{{"workflow": "slow", "args": [{number}]}}', alice),
            ("/v1/runs", f'{{"workflow": "approval", "kwargs": {{"order": {number}}}}}', alice),
            (event, f'{{"approved": {number}}}', alice),
            (event, f"[1, {number}]", alice),
            (event, number, alice),
            (
                "/platform/v1/plans",
                f'{{"id": "p", "name": "P", "quotas": {{"requests_per_second": {number}}}}}',
                root,
            ),
        ]:
            reply = await post_raw(http, path, text, headers)
            problem = assert_problem(reply, 422, "invalid-request")
            msg = f"not valid JSON: {NOT_JSON_NUMBER} (at character {text.index(number)})"
            assert problem["errors"] == [{"loc": "body", "msg": msg}], (path, text)
            assert problem["detail"] == f"body: {msg}"
    # Nothing was stored in the place of the refused values: the run gets the first event that
    # was accepted, and no other run or plan exists.
    accepted = await http.post(event, json={"approved": True}, headers=alice)
    assert accepted.status_code == 202, accepted.text
    async with running_worker(workflows.app, runtime):
        body = await finished(http, alice, run_id)
    assert body["result"] == {"order": 1, "decision": {"approved": True}}
    assert [r["id"] for r in (await http.get("/v1/runs", headers=alice)).json()["runs"]] == [run_id]
    assert (await http.get("/platform/v1/plans", headers=root)).json() == []


async def test_integers_beyond_64_bits_are_refused_over_http(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    root = await admin(runtime, http)
    tenant_admin = await member(runtime, http, "ann@acme.test", "acme", Role.TENANT_ADMIN)
    waiting = await http.post("/v1/runs", json={"workflow": "approval", "args": [1]}, headers=alice)
    run_id = waiting.json()["id"]
    refused: list[tuple[str, httpx.Response]] = [
        ("limit", await http.get("/v1/runs", params={"limit": HUGE}, headers=alice)),
        ("dl", await http.get("/v1/dead-letters", params={"limit": HUGE}, headers=alice)),
        ("audit", await http.get("/v1/audit", params={"cursor": HUGE}, headers=tenant_admin)),
        ("all", await http.get("/platform/v1/audit", params={"cursor": -HUGE}, headers=root)),
        (
            "priority",
            await http.post(
                "/v1/runs",
                json={"workflow": "greet", "args": ["x"], "priority": HUGE},
                headers=alice,
            ),
        ),
        (
            "arg",
            await http.post(
                "/v1/runs", json={"workflow": "approval", "args": [HUGE]}, headers=alice
            ),
        ),
        (
            "event",
            await http.post(f"/v1/runs/{run_id}/events/decision", json={"n": 2**64}, headers=alice),
        ),
        ("cursor", await http.get("/v1/runs", params={"cursor": str(HUGE)}, headers=alice)),
    ]
    for quota in ("runs_per_month", "concurrent_runs", "seats", "dispatch_weight"):
        body = {"id": "p", "name": "P", "quotas": {quota: HUGE}}
        refused.append((quota, await http.post("/platform/v1/plans", json=body, headers=root)))
    for what, reply in refused:
        assert reply.status_code == 422, (what, reply.text)
        assert_problem(reply, 422, "invalid-request")
    # An id made of digits names nothing: the answer a missing one gets.
    assert_problem(await http.get(f"/v1/runs/{HUGE}", headers=alice), 404, "not-found")
    missing = await http.post(f"/v1/dead-letters/{HUGE}/replay", headers=alice)
    assert_problem(missing, 404, "not-found")
    assert len(await runtime.router.store("acme").list_runs(limit=10)) == 1


async def test_python_callers_get_named_errors(runtime: Runtime) -> None:
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    for number in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(SerializationError, match="NaN and Infinity have no JSON form"):
            await tenant.start(workflows.slow, number)
    waiting = await tenant.start(workflows.approval, 1)
    order = workflows.Order(order_id="1", sku="mug", quantity=1, amount_cents=1)
    for payload in ({"deep": [float("nan")]}, [order, float("-inf")], (1.0, float("inf"))):
        with pytest.raises(SerializationError, match="the payload of event 'decision'"):
            await waiting.send_event("decision", payload)
    with pytest.raises(ConfigError, match="a priority is a whole number from -1000 to 1000"):
        workflows.greet.options(priority=HUGE)
    plan = functools.partial(runtime.platform.create_plan, "system", "p", name="P")
    for quotas, where in [
        (Quotas(runs_per_month=HUGE), "runs_per_month"),
        (Quotas(concurrent_runs=0), "concurrent_runs"),
        (Quotas(seats=-1), "seats"),
        (Quotas(requests_per_second=float("inf")), "requests_per_second"),
        (Quotas(requests_per_second=float("nan")), "requests_per_second"),
    ]:
        with pytest.raises(InvalidInputError, match=f"^quotas.{where}: ") as refused:
            await platform_call(plan, entitlements=["*"], quotas=quotas)
        assert [i.loc for i in refused.value.issues] == [f"quotas.{where}"]
    assert [r.id for r in await tenant.list_runs()] == [waiting.run_id]
    assert await platform_call(runtime.platform.licensing.list_plans) == []


async def test_a_database_server_is_checked_before_it_is_registered(
    runtime: Runtime, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    root = await admin(runtime, http)
    sqlite = runtime.registry.engine.dialect.name == "sqlite"
    closed = free_port()
    unwritable = tmp_path / "file"
    unwritable.write_text("a file, not a folder")
    junk = {
        "sqlite://garbage": "the platform database is SQLite",
        "sqlite:///": "the platform database is SQLite",
        f"sqlite:///{unwritable}": "its folder cannot be written (NotADirectoryError)",
        "postgresql://postgres@127.0.0.1/x": "the platform database is SQLite",
    }
    if not sqlite:
        junk = {
            f"sqlite:///{tmp_path}": "the platform database is PostgreSQL",
            "mysql://root@127.0.0.1/x": "the platform database is PostgreSQL",
            "postgresql://postgres@127.0.0.1:99999/x": "its port is not a number",
            "postgresql:///x": "it names no host",
            f"postgresql://tf:s3cret@127.0.0.1:{closed}/x": "the server did not answer a test "
            "connection: connection refused",
            f"{POSTGRES_URL}?sslmode=junk": "the server did not answer a test connection",
        }
    for url, why in junk.items():
        reply = await http.post(
            "/platform/v1/servers", json={"id": "junk", "url": url}, headers=root
        )
        problem = assert_problem(reply, 422, "invalid-request")
        assert problem["errors"][0]["loc"] == "url" and why in problem["detail"], (url, problem)
        # Nothing of the URL is repeated (it may hold a password).
        for part in (str(tmp_path), "s3cret", str(closed), "99999", "junk"):
            assert part not in reply.text, (url, reply.text)
    servers = (await http.get("/platform/v1/servers", headers=root)).json()
    assert [s["id"] for s in servers] == ["default"]
    # Tenants are still created, on a server that works.
    made = await http.post("/platform/v1/tenants", json={"id": "after-junk"}, headers=root)
    assert made.status_code == 201, made.text
