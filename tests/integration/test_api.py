"""The HTTP API, on both backends: tokens and keys, runs end to end, isolation between tenants,
roles, problem documents, streams, API keys, the audit log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jwt import PyJWK

from tenantflow import Runtime
from tenantflow.api.app import create_api
from tenantflow.platform.identity import Role
from tests.apps import api as workflows
from tests.conftest import running_worker

PASSWORD = "correct horse battery"


@pytest.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    api = create_api(workflows.app, runtime=runtime)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantflow.test") as c:
        yield c


async def platform_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def token(http: httpx.AsyncClient, **grant: Any) -> str:
    reply = await http.post("/platform/v1/token", json=grant)
    assert reply.status_code == 200, reply.text
    access: str = reply.json()["access_token"]
    return access


def bearer(access: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access}"}


async def member(
    runtime: Runtime, http: httpx.AsyncClient, email: str, tenant: str, role: Role
) -> dict[str, str]:
    """A user with ``role`` in ``tenant``, and the headers of their token."""
    platform = runtime.platform
    user = await platform_call(platform.create_user, "system", email, PASSWORD)
    await platform_call(platform.set_membership, "system", user.id, tenant, role)
    return bearer(
        await token(http, grant_type="password", email=email, password=PASSWORD, tenant=tenant)
    )


async def admin(runtime: Runtime, http: httpx.AsyncClient) -> dict[str, str]:
    await platform_call(
        runtime.platform.create_user, "system", "root@example.com", PASSWORD, platform_admin=True
    )
    return bearer(
        await token(http, grant_type="password", email="root@example.com", password=PASSWORD)
    )


async def finished(http: httpx.AsyncClient, headers: dict[str, str], run_id: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        reply = await http.get(f"/v1/runs/{run_id}", headers=headers)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if body["status"] in ("completed", "failed", "cancelled", "compensated", "needs_attention"):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.05)


async def start(http: httpx.AsyncClient, headers: dict[str, str], workflow: str, *args: Any) -> str:
    """Submit a run over HTTP; its id."""
    reply = await http.post(
        "/v1/runs", json={"workflow": workflow, "args": list(args)}, headers=headers
    )
    assert reply.status_code == 202, reply.text
    run_id: str = reply.json()["id"]
    return run_id


def assert_problem(reply: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = reply.json()
    assert body["type"] == f"urn:tenantflow:problem:{slug}", body
    assert body["status"] == status
    return body


async def test_a_run_end_to_end(runtime: Runtime, http: httpx.AsyncClient) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    async with running_worker(workflows.app, runtime):
        reply = await http.post(
            "/v1/runs", json={"workflow": "greet", "args": ["world"]}, headers=alice
        )
        assert reply.status_code == 202, reply.text
        run_id = reply.json()["id"]
        assert reply.headers["location"] == f"/v1/runs/{run_id}"
        body = await finished(http, alice, run_id)
    assert body["status"] == "completed"
    assert body["result"] == "hello world"
    assert [(s["seq"], s["name"], s["status"]) for s in body["steps"]] == [
        (0, "hello", "completed")
    ]
    listed = (await http.get("/v1/runs", headers=alice)).json()
    assert [r["id"] for r in listed["runs"]] == [run_id]
    workflows_listed = (await http.get("/v1/workflows", headers=alice)).json()
    assert ("greet", ["name"]) in [(w["name"], w["parameters"]) for w in workflows_listed]


async def test_idempotency_key_and_pagination(runtime: Runtime, http: httpx.AsyncClient) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    keyed = {**alice, "Idempotency-Key": "order-7"}
    first = await http.post("/v1/runs", json={"workflow": "greet", "args": ["a"]}, headers=keyed)
    again = await http.post("/v1/runs", json={"workflow": "greet", "args": ["a"]}, headers=keyed)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = await http.post("/v1/runs", json={"workflow": "greet", "args": ["b"]}, headers=keyed)
    assert_problem(other, 409, "idempotency-conflict")
    ids = {first.json()["id"]}
    for i in range(4):
        reply = await http.post(
            "/v1/runs", json={"workflow": "greet", "args": [str(i)]}, headers=alice
        )
        ids.add(reply.json()["id"])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await http.get("/v1/runs", params=params, headers=alice)).json()
        seen += [r["id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) == 5


async def test_a_cursor_this_api_did_not_give_out_is_refused(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    boss = await member(runtime, http, "boss@acme.test", "acme", Role.TENANT_ADMIN)
    root = await admin(runtime, http)
    await start(http, boss, "greet", "x")
    expected = "not a cursor this API gave out: pass the next_cursor of a previous page"
    for cursor in ("garbage", "0" * 31, "0" * 32 + ".", "../x"):
        reply = await http.get("/v1/runs", params={"cursor": cursor}, headers=boss)
        body = assert_problem(reply, 422, "invalid-request")
        assert body["detail"] == f"query.cursor: {expected}"
        assert body["errors"] == [{"loc": "query.cursor", "msg": expected}]
    # A misspelt parameter is refused too, not ignored (which would answer the first page).
    misspelt = await http.get("/v1/runs", params={"before": "garbage"}, headers=boss)
    assert assert_problem(misspelt, 422, "invalid-request")["errors"] == [
        {"loc": "query.before", "msg": "not a parameter of this route"}
    ]
    child = "0" * 32 + ".1.2"  # a child's id is a cursor like any other
    assert (await http.get("/v1/runs", params={"cursor": child}, headers=boss)).status_code == 200
    # The audit log's cursor is an entry id: a positive integer the id column can hold.
    not_int = "Input should be a valid integer, unable to parse string as an integer"
    too_big = "Input should be less than or equal to 2147483647"
    for path, headers in (("/v1/audit", boss), ("/platform/v1/audit", root)):
        for cursor, msg in (
            ("garbage", not_int),
            (str(2**31), too_big),
            (str(2**64), too_big),
            ("0", "Input should be greater than or equal to 1"),
        ):
            reply = await http.get(path, params={"cursor": cursor}, headers=headers)
            body = assert_problem(reply, 422, "invalid-request")
            assert body["detail"] == f"query.cursor: {msg}", (path, cursor)
        assert (await http.get(path, params={"cursor": 2**31 - 1}, headers=headers)).json() == {
            "entries": [],
            "next_cursor": None,
        }
    # A dead letter's id that no backend could have made is a missing one, not an error.
    for letter in ("garbage", str(2**64), "-1"):
        reply = await http.post(f"/v1/dead-letters/{letter}/replay", headers=boss)
        assert_problem(reply, 404, "not-found")


async def test_another_tenants_run_is_not_found(runtime: Runtime, http: httpx.AsyncClient) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    mallory = await member(runtime, http, "mallory@globex.test", "globex", Role.TENANT_ADMIN)
    run_id = (
        await http.post("/v1/runs", json={"workflow": "greet", "args": ["x"]}, headers=alice)
    ).json()["id"]
    theirs = await http.get(f"/v1/runs/{run_id}", headers=mallory)
    missing = await http.get("/v1/runs/0000-no-such-run", headers=mallory)
    assert_problem(theirs, 404, "not-found")
    assert_problem(missing, 404, "not-found")
    assert theirs.json()["title"] == missing.json()["title"]
    for path in (f"/v1/runs/{run_id}/cancel", f"/v1/runs/{run_id}/events/decision"):
        assert_problem(await http.post(path, headers=mallory, json=None), 404, "not-found")
    assert_problem(await http.get(f"/v1/runs/{run_id}/stream", headers=mallory), 404, "not-found")
    # The tenant comes from the token only: a body naming another tenant is refused outright.
    sneaky = {"workflow": "greet", "args": ["x"], "tenant": "acme"}
    assert_problem(
        await http.post("/v1/runs", json=sneaky, headers=mallory), 422, "invalid-request"
    )
    assert (await http.get("/v1/runs", headers=mallory)).json()["runs"] == []
    # Platform routes of another tenant answer as if it did not exist.
    assert_problem(
        await http.get("/platform/v1/tenants/acme/memberships", headers=mallory), 404, "not-found"
    )


async def test_roles_are_checked_on_every_route(runtime: Runtime, http: httpx.AsyncClient) -> None:
    viewer = await member(runtime, http, "vic@acme.test", "acme", Role.VIEWER)
    operator = await member(runtime, http, "olga@acme.test", "acme", Role.OPERATOR)
    start = {"workflow": "greet", "args": ["x"]}
    assert_problem(await http.post("/v1/runs", json=start, headers=viewer), 403, "forbidden")
    run_id = (await http.post("/v1/runs", json=start, headers=operator)).json()["id"]
    assert (await http.get(f"/v1/runs/{run_id}", headers=viewer)).status_code == 200
    assert_problem(await http.post(f"/v1/runs/{run_id}/cancel", headers=viewer), 403, "forbidden")
    assert_problem(await http.get("/v1/audit", headers=operator), 403, "forbidden")
    for path in ("/platform/v1/tenants", "/platform/v1/users", "/platform/v1/plans"):
        assert_problem(await http.get(path, headers=operator), 403, "forbidden")
    assert_problem(
        await http.get("/platform/v1/tenants/acme/api-keys", headers=operator), 403, "forbidden"
    )


async def test_errors_are_problem_documents(runtime: Runtime, http: httpx.AsyncClient) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    no_token = await http.get("/v1/runs")
    assert_problem(no_token, 401, "unauthenticated")
    assert no_token.headers["www-authenticate"] == "Bearer"
    assert_problem(await http.get("/v1/runs", headers=bearer("not.a.jwt")), 401, "invalid-token")
    unknown = await http.post("/v1/runs", json={"workflow": "nope"}, headers=alice)
    assert_problem(unknown, 404, "not-found")
    wrong_type = await http.post(
        "/v1/runs", json={"workflow": "slow", "args": ["soon"]}, headers=alice
    )
    assert_problem(wrong_type, 422, "invalid-request")
    missing_arg = await http.post("/v1/runs", json={"workflow": "greet"}, headers=alice)
    assert_problem(missing_arg, 422, "invalid-request")
    huge = await http.post(
        "/v1/runs",
        json={"workflow": "greet", "args": ["x" * (runtime.settings.max_request_bytes + 1)]},
        headers=alice,
    )
    assert_problem(huge, 413, "too-large")
    bad_login = await http.post(
        "/platform/v1/token",
        json={
            "grant_type": "password",
            "email": "alice@acme.test",
            "password": "wrong!!!!",
            "tenant": "acme",
        },
    )
    body = assert_problem(bad_login, 401, "unauthenticated")
    assert "wrong" not in body.get("detail", "")
    assert_problem(await http.get("/nowhere"), 404, "not-found")


async def test_invalid_input_is_located_field_by_field(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)

    async def refused(body: Any) -> tuple[str, list[dict[str, str]]]:
        if isinstance(body, bytes):
            json_headers = {**alice, "Content-Type": "application/json"}
            reply = await http.post("/v1/runs", content=body, headers=json_headers)
        else:
            reply = await http.post("/v1/runs", json=body, headers=alice)
        problem = assert_problem(reply, 422, "invalid-request")
        return problem["detail"], problem["errors"]

    # Arguments are JSON, taken strictly as their schema says ("lots" and "7" are no integer).
    not_int = "Input should be a valid integer"
    order = {"order_id": "1", "sku": "mug", "quantity": "lots", "amount_cents": 1}
    # A workflow's arguments: located by parameter, then field.
    assert await refused({"workflow": "fulfil_order", "args": [order]}) == (
        f"order.quantity: {not_int}",
        [{"loc": "order.quantity", "msg": not_int}],
    )
    partial = {"order_id": "1", "sku": "mug"}
    assert await refused({"workflow": "fulfil_order", "kwargs": {"order": partial}}) == (
        "order.quantity: Field required (and 1 more)",
        [
            {"loc": "order.quantity", "msg": "Field required"},
            {"loc": "order.amount_cents", "msg": "Field required"},
        ],
    )
    assert await refused({"workflow": "greet"}) == (
        "name: required",
        [{"loc": "name", "msg": "required"}],
    )
    assert await refused({"workflow": "greet", "args": ["a", "b"], "kwargs": {"colour": 1}}) == (
        "args.1: the workflow takes 1 positional argument (and 1 more)",
        [
            {"loc": "args.1", "msg": "the workflow takes 1 positional argument"},
            {"loc": "kwargs.colour", "msg": "the workflow has no such parameter"},
        ],
    )
    # The request itself: located in the body, the query or a header.
    assert await refused({"workflow": "greet", "args": ["x"], "priority": "high"}) == (
        f"body.priority: {not_int}",
        [{"loc": "body.priority", "msg": not_int}],
    )
    assert await refused(b'{"workflow": ') == (
        "body: not valid JSON (at character 13)",
        [{"loc": "body", "msg": "not valid JSON (at character 13)"}],
    )
    # Deliberate messages of the platform plane are named errors, shown as they are.
    root = await admin(runtime, http)
    bad_email = await http.post(
        "/platform/v1/users", json={"email": "nobody", "password": PASSWORD}, headers=root
    )
    assert assert_problem(bad_email, 422, "invalid-request")["detail"] == "not an email address"


async def test_a_stray_value_error_is_not_echoed() -> None:
    """A ValueError that is not one of tenantflow's was written for developers (and may quote
    the input): the answer is a 422 that says no more than that."""
    from fastapi import FastAPI

    from tenantflow.api import problems

    api = FastAPI()
    problems.install(api)

    @api.get("/parse")
    async def parse(value: str) -> int:
        return int(value)

    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as client:
        reply = await client.get("/parse", params={"value": "secret-42"})
    body = assert_problem(reply, 422, "invalid-request")
    assert body["detail"] == "a value in the request is not valid"
    assert "secret" not in reply.text


async def test_tokens_verify_against_the_jwks_across_a_rotation(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.VIEWER)
    old = alice["Authorization"].removeprefix("Bearer ")

    def verify(access: str, jwks: dict[str, Any]) -> dict[str, Any]:
        kid = jwt.get_unverified_header(access)["kid"]
        (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
        claims: dict[str, Any] = jwt.decode(
            access, PyJWK(jwk).key, algorithms=["EdDSA"], audience="tenantflow-api"
        )
        return claims

    jwks = (await http.get("/.well-known/jwks.json")).json()
    assert "d" not in jwks["keys"][0]  # public halves only
    claims = verify(old, jwks)
    assert claims["tid"] == "acme" and claims["role"] == "viewer"
    assert claims["exp"] - claims["iat"] == runtime.settings.token_ttl_seconds
    rotated = await http.post("/platform/v1/keys/rotate", headers=root)
    assert rotated.status_code == 200, rotated.text
    new_kid = rotated.json()["kid"]
    jwks = (await http.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == {new_kid, jwt.get_unverified_header(old)["kid"]}
    verify(old, jwks)  # the old key still verifies what it signed
    assert (await http.get("/v1/runs", headers=alice)).status_code == 200
    new = await token(
        http, grant_type="password", email="alice@acme.test", password=PASSWORD, tenant="acme"
    )
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert (await http.get("/v1/runs", headers=bearer(new))).status_code == 200


async def test_api_keys_shown_once_and_revocable(runtime: Runtime, http: httpx.AsyncClient) -> None:
    boss = await member(runtime, http, "boss@acme.test", "acme", Role.TENANT_ADMIN)
    made = await http.post(
        "/platform/v1/tenants/acme/api-keys", json={"name": "ci", "role": "operator"}, headers=boss
    )
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["secret"].startswith(f"tfk_{key['id']}_")
    listed = (await http.get("/platform/v1/tenants/acme/api-keys", headers=boss)).json()
    assert [k["id"] for k in listed] == [key["id"]] and listed[0]["secret"] is None
    access = await token(http, grant_type="api_key", api_key=key["secret"])
    start = await http.post(
        "/v1/runs", json={"workflow": "greet", "args": ["k"]}, headers=bearer(access)
    )
    assert start.status_code == 202
    gone = await http.delete(f"/platform/v1/tenants/acme/api-keys/{key['id']}", headers=boss)
    assert gone.status_code == 200 and gone.json()["revoked_at"] is not None
    refused = await http.post(
        "/platform/v1/token", json={"grant_type": "api_key", "api_key": key["secret"]}
    )
    assert_problem(refused, 401, "unauthenticated")
    audit = (await http.get("/v1/audit", headers=boss)).json()["entries"]
    assert [e["action"] for e in audit if e["action"].startswith("api_key.")] == [
        "api_key.issued",
        "api_key.revoked",
    ]
    assert all(key["secret"] not in str(e) for e in audit)


async def test_events_cancel_and_the_stream(runtime: Runtime, http: httpx.AsyncClient) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    async with running_worker(workflows.app, runtime):
        waiting = (
            await http.post("/v1/runs", json={"workflow": "approval", "args": [7]}, headers=alice)
        ).json()["id"]
        doomed = (
            await http.post("/v1/runs", json={"workflow": "approval", "args": [8]}, headers=alice)
        ).json()["id"]

        async def stream() -> list[tuple[str, str]]:
            events: list[tuple[str, str]] = []
            async with http.stream("GET", f"/v1/runs/{waiting}/stream", headers=alice) as reply:
                assert reply.status_code == 200
                assert reply.headers["content-type"].startswith("text/event-stream")
                event = ""
                async for line in reply.aiter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        events.append((event, line.removeprefix("data: ")))
            return events

        watcher = asyncio.create_task(stream())
        await asyncio.sleep(0.5)
        sent = await http.post(
            f"/v1/runs/{waiting}/events/decision", json={"approved": True}, headers=alice
        )
        assert sent.status_code == 202, sent.text
        body = await finished(http, alice, waiting)
        assert body["result"] == {"order": 7, "decision": {"approved": True}}
        events = await asyncio.wait_for(watcher, 30)
        assert events[-1][0] == "run" and '"status":"completed"' in events[-1][1]
        assert any(kind == "step" for kind, _ in events)
        cancelled = await http.post(f"/v1/runs/{doomed}/cancel", headers=alice)
        assert cancelled.status_code == 202
        assert (await finished(http, alice, doomed))["status"] == "cancelled"
    root = await admin(runtime, http)
    audit = (await http.get("/platform/v1/audit", params={"tenant": "acme"}, headers=root)).json()
    assert ("run.cancelled", doomed) in [(e["action"], e["target"]) for e in audit["entries"]]


async def test_cancel_of_an_ended_run_is_a_conflict(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    async with running_worker(workflows.app, runtime):
        done = await start(http, alice, "greet", "x")
        await finished(http, alice, done)
        slow = await start(http, alice, "slow", 30)
        while (await http.get(f"/v1/runs/{slow}", headers=alice)).json()["status"] != "running":
            await asyncio.sleep(0.02)
        for _ in range(2):  # asked twice while it is being cancelled: the same answer
            cancelling = await http.post(f"/v1/runs/{slow}/cancel", headers=alice)
            assert cancelling.status_code == 202, cancelling.text
            assert cancelling.json()["cancel_requested"] is True
        assert (await finished(http, alice, slow))["status"] == "cancelled"
    for run_id, status in ((done, "completed"), (slow, "cancelled")):
        refused = await http.post(f"/v1/runs/{run_id}/cancel", headers=alice)
        body = assert_problem(refused, 409, "run-finished")
        assert body["detail"] == f"run {run_id} has ended ({status}); it cannot be cancelled"
    event = await http.post(f"/v1/runs/{done}/events/decision", json=True, headers=alice)
    assert assert_problem(event, 409, "run-finished")["detail"] == (
        f"run {done} has ended (completed); it takes no events"
    )
    root = await admin(runtime, http)
    audit = (await http.get("/platform/v1/audit", params={"tenant": "acme"}, headers=root)).json()
    # Only the accepted requests are in the audit log.
    assert [e["target"] for e in audit["entries"] if e["action"] == "run.cancelled"] == [slow] * 2


async def test_health_and_openapi(runtime: Runtime, http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"platform_database": "ok", "queue": "ok"}
    spec = (await http.get("/openapi.json")).json()
    for path in ("/v1/runs", "/v1/runs/{run_id}/stream", "/platform/v1/token", "/readyz"):
        assert path in spec["paths"]


async def test_routing_places_tenants_on_the_emptiest_server(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    default_url = runtime.settings.resolved_database_url()
    second_url = (
        f"sqlite:///{runtime.settings.home / 'second'}"
        if default_url.startswith("sqlite:///")
        else default_url
    )
    added = await http.post(
        "/platform/v1/servers", json={"id": "second", "url": second_url}, headers=root
    )
    assert added.status_code == 201, added.text
    assert added.json() == {"id": "second", "accepting": True, "tenants": 0}
    placed = {}
    for tenant in ("t1", "t2", "t3"):
        made = await http.post("/platform/v1/tenants", json={"id": tenant}, headers=root)
        assert made.status_code == 201, made.text
        placed[tenant] = made.json()["server"]
    # default holds acme and globex already: the new ones fill "second" first.
    assert placed == {"t1": "second", "t2": "second", "t3": "default"}
    closed = await http.patch(
        "/platform/v1/servers/second", json={"accepting": False}, headers=root
    )
    assert closed.json()["accepting"] is False
    made = await http.post("/platform/v1/tenants", json={"id": "t4"}, headers=root)
    assert made.json()["server"] == "default"
    servers = (await http.get("/platform/v1/servers", headers=root)).json()
    assert servers == [
        {"id": "default", "accepting": True, "tenants": 4},
        {"id": "second", "accepting": False, "tenants": 2},
    ]
    # A tenant on the second server works like any other.
    t1 = await member(runtime, http, "t1@example.com", "t1", Role.OPERATOR)
    async with running_worker(workflows.app, runtime):
        run = await http.post("/v1/runs", json={"workflow": "greet", "args": ["t1"]}, headers=t1)
        assert (await finished(http, t1, run.json()["id"]))["result"] == "hello t1"
    everything = (await http.get("/platform/v1/audit", headers=root)).text
    assert "server.added" in everything and second_url not in everything


async def test_dead_letters_listed_and_replayed(runtime: Runtime, http: httpx.AsyncClient) -> None:
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    bob = await member(runtime, http, "bob@globex.test", "globex", Role.OPERATOR)
    run_id = (
        await http.post("/v1/runs", json={"workflow": "greet", "args": ["dl"]}, headers=alice)
    ).json()["id"]
    await runtime.outbox.published()
    queue = runtime.queue
    for _ in range(100):  # deliveries that never finish, until the message is dead-lettered
        await queue.dequeue("crashy", 10, 0.001)
        if await queue.dead_letters("acme"):
            break
        await asyncio.sleep(0.005)
    letters = (await http.get("/v1/dead-letters", headers=alice)).json()
    assert [d["run_id"] for d in letters] == [run_id]
    assert letters[0]["deliveries"] >= queue.max_deliveries
    assert letters[0]["reason"] == (
        f"delivered {letters[0]['deliveries']} times without being acknowledged"
    )
    assert letters[0]["parked"] is False
    assert (await http.get("/v1/dead-letters", headers=bob)).json() == []
    missing = await http.post(f"/v1/dead-letters/{letters[0]['id']}/replay", headers=bob)
    assert_problem(missing, 404, "not-found")
    replayed = await http.post(f"/v1/dead-letters/{letters[0]['id']}/replay", headers=alice)
    assert replayed.status_code == 202, replayed.text
    assert (await http.get("/v1/dead-letters", headers=alice)).json() == []
    async with running_worker(workflows.app, runtime):
        assert (await finished(http, alice, run_id))["result"] == "hello dl"
    root = await admin(runtime, http)
    audit = (await http.get("/platform/v1/audit", params={"tenant": "acme"}, headers=root)).json()
    assert ("dead_letter.replayed", letters[0]["id"]) in [
        (e["action"], e["target"]) for e in audit["entries"]
    ]


async def test_a_run_no_worker_can_execute_shows_why(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    from tenantflow import App

    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    runtime.queue.max_deliveries = 1  # the first delivery is the last
    run_id = await start(http, alice, "greet", "nobody")
    async with running_worker(App("old-worker"), runtime):
        while not (letters := (await http.get("/v1/dead-letters", headers=alice)).json()):
            await asyncio.sleep(0.02)
    reason = "workflow 'greet' is not registered in this worker's app 'old-worker'"
    assert [(d["run_id"], d["reason"], d["parked"]) for d in letters] == [(run_id, reason, True)]
    run = (await http.get(f"/v1/runs/{run_id}", headers=alice)).json()
    assert run["status"] == "queued"
    assert run["stuck_reason"] == (
        f"{reason}; dead-lettered after 1 delivery: replay the dead letter once a worker has "
        "the workflow"
    )


async def test_readyz_tells_the_truth(runtime: Runtime, http: httpx.AsyncClient) -> None:
    from tests.integration.test_licensing import platform_down

    assert (await http.get("/readyz")).status_code == 200
    with runtime.registry.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tenants SET revision = '0001' WHERE id = 'acme'")
    behind = await http.get("/readyz")
    assert behind.status_code == 503
    assert "1 tenant databases behind" in behind.json()["checks"]["platform_database"]
    await asyncio.to_thread(runtime.registry.migrate_all)
    assert (await http.get("/readyz")).status_code == 200
    with platform_down(runtime):
        down = await http.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["platform_database"].startswith("failed: ")
        assert down.json()["checks"]["queue"] == "ok"
    assert (await http.get("/readyz")).status_code == 200


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


async def test_no_input_makes_the_api_fail(runtime: Runtime, http: httpx.AsyncClient) -> None:
    """Arbitrary bodies, paths and queries: every answer is a success or a problem document,
    never a 500."""
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    answers: list[httpx.Response] = []

    @hypothesis_settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        body=JSON
        | st.fixed_dictionaries(
            {"workflow": st.sampled_from(["greet", "slow", "x"]), "args": JSON}
        ),
        segment=st.text(
            # No lone surrogates: no client can put one in a URL (httpx refuses to encode it).
            st.characters(
                min_codepoint=33, exclude_characters="/?#%\x7f", exclude_categories=["Cs"]
            ),
            min_size=1,
            max_size=30,
        ),
        query=st.dictionaries(
            st.sampled_from(["status", "limit", "cursor", "workflow"]),
            st.text(max_size=10),
            max_size=3,
        ),
    )
    def probe(body: Any, segment: str, query: dict[str, str]) -> None:
        async def send() -> None:
            quoted = f"/v1/runs/{segment}"
            for reply in (
                await http.post("/v1/runs", json=body, headers=alice),
                await http.get(quoted, headers=alice),
                await http.post(
                    f"{quoted}/events/{segment}".replace("//", "/"), json=body, headers=alice
                ),
                await http.get("/v1/runs", params=query, headers=alice),
            ):
                answers.append(reply)

        asyncio.run_coroutine_threadsafe(send(), loop).result(60)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(probe)
    assert answers
    for reply in answers:
        assert reply.status_code < 500, (reply.request.url, reply.text)
        if reply.status_code >= 400:
            assert reply.headers["content-type"].startswith("application/problem+json"), reply.text
