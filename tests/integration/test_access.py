"""Revocation on both backends: every change that takes access away refuses the tokens it
touches on their next request, the role authorised is the one held now, and a tenant
administrator brings a user in by an invitation the user accepts. (Across API processes:
test_access_processes.py.)"""

from __future__ import annotations

import httpx
import jwt
import pytest
import sqlalchemy as sa

from tenantflow import Runtime
from tenantflow.platform.identity import Role
from tenantflow.platform.licensing import Quotas
from tenantflow.platform.schema import invitations
from tests.integration.test_api import (
    PASSWORD,
    admin,
    assert_problem,
    bearer,
    http,
    member,
    platform_call,
    token,
)
from tests.integration.test_licensing import on_plan

__all__ = ["http"]  # the fixture, used by name

START = {"workflow": "greet", "args": ["x"]}


async def sign_in(
    http: httpx.AsyncClient, email: str, tenant: str | None = "acme"
) -> dict[str, str]:
    grant = {"grant_type": "password", "email": email, "password": PASSWORD}
    if tenant is not None:
        grant["tenant"] = tenant
    return bearer(await token(http, **grant))


async def user_id(runtime: Runtime, email: str) -> str:
    return str((await platform_call(runtime.platform.identity.user_by_email, email)).id)


async def test_a_revoked_api_key_takes_its_tokens_with_it(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    boss = await member(runtime, http, "boss@acme.test", "acme", Role.TENANT_ADMIN)
    made = (
        await http.post(
            "/platform/v1/tenants/acme/api-keys",
            json={"name": "ci", "role": "operator"},
            headers=boss,
        )
    ).json()
    keyed = bearer(await token(http, grant_type="api_key", api_key=made["secret"]))
    other = (
        await http.post(
            "/platform/v1/tenants/acme/api-keys",
            json={"name": "other", "role": "operator"},
            headers=boss,
        )
    ).json()
    kept = bearer(await token(http, grant_type="api_key", api_key=other["secret"]))
    assert (await http.post("/v1/runs", json=START, headers=keyed)).status_code == 202
    revoked = await http.delete(f"/platform/v1/tenants/acme/api-keys/{made['id']}", headers=boss)
    assert revoked.status_code in (200, 204), revoked.text
    assert_problem(await http.post("/v1/runs", json=START, headers=keyed), 401, "invalid-token")
    assert_problem(await http.get("/v1/runs", headers=keyed), 401, "invalid-token")
    assert (await http.post("/v1/runs", json=START, headers=kept)).status_code == 202


async def test_the_role_authorised_is_the_one_held_now(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    alice_id = await user_id(runtime, "alice@acme.test")
    assert (await http.post("/v1/runs", json=START, headers=alice)).status_code == 202

    def role(value: str) -> dict[str, str]:
        return {"user_id": alice_id, "role": value}

    down = await http.put(
        "/platform/v1/tenants/acme/memberships", json=role("viewer"), headers=root
    )
    assert down.status_code == 200, down.text
    assert_problem(await http.post("/v1/runs", json=START, headers=alice), 403, "forbidden")
    assert (await http.get("/v1/runs", headers=alice)).status_code == 200  # still a viewer
    up = await http.put(
        "/platform/v1/tenants/acme/memberships", json=role("tenant_admin"), headers=root
    )
    assert up.status_code == 200, up.text
    # The same token, minted for an operator, now does what a tenant admin does.
    assert (await http.get("/v1/audit", headers=alice)).status_code == 200

    removed = await http.delete(f"/platform/v1/tenants/acme/memberships/{alice_id}", headers=root)
    assert removed.status_code == 204, removed.text
    assert_problem(await http.get("/v1/runs", headers=alice), 401, "invalid-token")
    # Made a member again: a new grant, which the old token does not name.
    await platform_call(runtime.platform.set_membership, "system", alice_id, "acme", Role.OPERATOR)
    assert_problem(await http.get("/v1/runs", headers=alice), 401, "invalid-token")
    fresh = await sign_in(http, "alice@acme.test")
    assert (await http.post("/v1/runs", json=START, headers=fresh)).status_code == 202


async def test_a_disabled_user_and_a_new_password_void_every_token(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    alice_id = await user_id(runtime, "alice@acme.test")
    await platform_call(runtime.platform.set_membership, "system", alice_id, "globex", Role.VIEWER)
    at_globex = await sign_in(http, "alice@acme.test", "globex")

    disabled = await http.post(f"/platform/v1/users/{alice_id}/disable", headers=root)
    assert disabled.status_code == 200 and disabled.json()["disabled"] is True, disabled.text
    for headers in (alice, at_globex):
        assert_problem(await http.get("/v1/runs", headers=headers), 401, "invalid-token")
    refused = await http.post(
        "/platform/v1/token",
        json={
            "grant_type": "password",
            "email": "alice@acme.test",
            "password": PASSWORD,
            "tenant": "acme",
        },
    )
    assert_problem(refused, 401, "unauthenticated")
    enabled = await http.post(f"/platform/v1/users/{alice_id}/enable", headers=root)
    assert enabled.json()["disabled"] is False
    assert_problem(await http.get("/v1/runs", headers=alice), 401, "invalid-token")
    again = await sign_in(http, "alice@acme.test")
    assert (await http.get("/v1/runs", headers=again)).status_code == 200

    await platform_call(
        runtime.platform.reset_password, "system", "alice@acme.test", "another long one"
    )
    assert_problem(await http.get("/v1/runs", headers=again), 401, "invalid-token")
    actions = [
        e["action"] for e in (await http.get("/platform/v1/audit", headers=root)).json()["entries"]
    ]
    assert {"user.disabled", "user.enabled", "user.password_reset"} <= set(actions)


async def test_a_suspension_voids_the_tenants_tokens_for_good(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    bob = await member(runtime, http, "bob@globex.test", "globex", Role.OPERATOR)
    assert (await http.post("/platform/v1/tenants/acme/suspend", headers=root)).status_code == 200
    assert_problem(await http.get("/v1/runs", headers=alice), 409, "tenant-suspended")
    assert (await http.get("/v1/runs", headers=bob)).status_code == 200  # another tenant
    assert (await http.post("/platform/v1/tenants/acme/resume", headers=root)).status_code == 200
    assert_problem(await http.get("/v1/runs", headers=alice), 401, "invalid-token")
    fresh = await sign_in(http, "alice@acme.test")
    assert (await http.get("/v1/runs", headers=fresh)).status_code == 200


async def test_a_rotation_that_revokes_refuses_what_the_old_keys_signed(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    await on_plan(runtime, "acme", "basic", Quotas())
    root = await admin(runtime, http)
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    plain = await http.post("/platform/v1/keys/rotate", headers=root)
    assert plain.status_code == 200, plain.text
    assert (await http.get("/v1/runs", headers=alice)).status_code == 200  # runs out its life
    root = await sign_in(http, "root@example.com", None)
    after_plain = await sign_in(http, "alice@acme.test")
    leaked = await http.post("/platform/v1/keys/rotate", json={"revoke_tokens": True}, headers=root)
    assert leaked.status_code == 200, leaked.text
    new_kid = leaked.json()["kid"]
    for headers in (alice, after_plain, root):
        assert_problem(await http.get("/v1/runs", headers=headers), 401, "invalid-token")
    fresh = await sign_in(http, "alice@acme.test")
    assert jwt.get_unverified_header(fresh["Authorization"][7:])["kid"] == new_kid
    # Licenses the old keys signed still verify: submits go on.
    assert (await http.post("/v1/runs", json=START, headers=fresh)).status_code == 202
    root = await sign_in(http, "root@example.com", None)
    bad = await http.post("/platform/v1/keys/rotate", json={"revoke_tokens": "yes"}, headers=root)
    assert_problem(bad, 422, "invalid-request")


async def test_a_tenant_admin_invites_and_the_user_accepts(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    await on_plan(runtime, "acme", "duo", Quotas(seats=2))
    boss = await member(runtime, http, "boss@acme.test", "acme", Role.TENANT_ADMIN)
    carol = await platform_call(runtime.platform.create_user, "system", "carol@x.test", PASSWORD)
    dave = await platform_call(runtime.platform.create_user, "system", "dave@x.test", PASSWORD)

    # Adding a user who is no member is no longer the tenant admin's to do alone.
    direct = await http.put(
        "/platform/v1/tenants/acme/memberships",
        json={"user_id": carol.id, "role": "operator"},
        headers=boss,
    )
    assert_problem(direct, 409, "conflict")
    sent = await http.post(
        "/platform/v1/tenants/acme/invitations",
        json={"user_id": carol.id, "role": "operator"},
        headers=boss,
    )
    assert sent.status_code == 201, sent.text
    invitation = sent.json()
    assert invitation["tenant"] == "acme" and invitation["role"] == "operator"
    listed = (await http.get("/platform/v1/tenants/acme/invitations", headers=boss)).json()
    assert [i["id"] for i in listed] == [invitation["id"]]
    # Not a member until accepted: no token for the tenant.
    pending = await http.post(
        "/platform/v1/token",
        json={
            "grant_type": "password",
            "email": "carol@x.test",
            "password": PASSWORD,
            "tenant": "acme",
        },
    )
    assert_problem(pending, 401, "unauthenticated")

    carol_own = await sign_in(http, "carol@x.test", None)
    dave_own = await sign_in(http, "dave@x.test", None)
    mine = (await http.get("/platform/v1/invitations", headers=carol_own)).json()
    assert [i["id"] for i in mine] == [invitation["id"]]
    assert (await http.get("/platform/v1/invitations", headers=dave_own)).json() == []
    # A personal token reaches neither a tenant's runs nor the platform's routes.
    assert_problem(await http.get("/v1/runs", headers=carol_own), 403, "forbidden")
    assert_problem(await http.get("/platform/v1/users", headers=carol_own), 403, "forbidden")
    # Someone else's invitation is not found, like a missing one.
    stolen = await http.post(
        f"/platform/v1/invitations/{invitation['id']}/accept", headers=dave_own
    )
    assert_problem(stolen, 404, "not-found")
    # A tenant-scoped token is not a user's own: it cannot accept either.
    assert_problem(
        await http.post(f"/platform/v1/invitations/{invitation['id']}/accept", headers=boss),
        403,
        "forbidden",
    )
    accepted = await http.post(
        f"/platform/v1/invitations/{invitation['id']}/accept", headers=carol_own
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["role"] == "operator"
    carol_acme = await sign_in(http, "carol@x.test")
    assert (await http.post("/v1/runs", json=START, headers=carol_acme)).status_code == 202
    assert (await http.get("/platform/v1/tenants/acme/invitations", headers=boss)).json() == []

    # Seats are counted on accepting: the plan's two are taken now.
    sent = await http.post(
        "/platform/v1/tenants/acme/invitations",
        json={"user_id": dave.id, "role": "viewer"},
        headers=boss,
    )
    assert sent.status_code == 201, sent.text
    full = await http.post(f"/platform/v1/invitations/{sent.json()['id']}/accept", headers=dave_own)
    assert_problem(full, 409, "seats-exhausted")
    declined = await http.post(
        f"/platform/v1/invitations/{sent.json()['id']}/decline", headers=dave_own
    )
    assert declined.status_code == 204, declined.text
    assert (await http.get("/platform/v1/invitations", headers=dave_own)).json() == []

    # Inviting a member is a conflict; a withdrawn invitation cannot be accepted.
    member_again = await http.post(
        "/platform/v1/tenants/acme/invitations",
        json={"user_id": carol.id, "role": "viewer"},
        headers=boss,
    )
    assert_problem(member_again, 409, "conflict")
    sent = await http.post(
        "/platform/v1/tenants/acme/invitations",
        json={"user_id": dave.id, "role": "viewer"},
        headers=boss,
    )
    withdrawn = await http.delete(
        f"/platform/v1/tenants/acme/invitations/{sent.json()['id']}", headers=boss
    )
    assert withdrawn.status_code == 204, withdrawn.text
    gone = await http.post(f"/platform/v1/invitations/{sent.json()['id']}/accept", headers=dave_own)
    assert_problem(gone, 404, "not-found")
    actions = [e["action"] for e in (await http.get("/v1/audit", headers=boss)).json()["entries"]]
    assert {"invitation.sent", "invitation.declined", "invitation.withdrawn"} <= set(actions)


async def test_an_expired_invitation_or_one_of_an_offboarded_tenant_is_none(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    carol = await platform_call(runtime.platform.create_user, "system", "carol@x.test", PASSWORD)
    sent = await http.post(
        "/platform/v1/tenants/acme/invitations",
        json={"user_id": carol.id, "role": "viewer"},
        headers=root,
    )
    assert sent.status_code == 201, sent.text
    with runtime.registry.engine.begin() as conn:
        conn.execute(invitations.update().values(expires_at=sa.literal(0.0)))
    carol_own = await sign_in(http, "carol@x.test", None)
    assert (await http.get("/platform/v1/invitations", headers=carol_own)).json() == []
    expired = await http.post(
        f"/platform/v1/invitations/{sent.json()['id']}/accept", headers=carol_own
    )
    assert_problem(expired, 404, "not-found")


@pytest.mark.parametrize("path", ["/v1/runs", "/platform/v1/invitations"])
async def test_a_token_of_a_deleted_user_is_refused(
    runtime: Runtime, http: httpx.AsyncClient, path: str
) -> None:
    """The grant is read from the platform database: a user row gone is no user."""
    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    own = await sign_in(http, "alice@acme.test", None)
    from tenantflow.platform.access import Change
    from tenantflow.platform.schema import memberships, users

    alice_id = await user_id(runtime, "alice@acme.test")
    with runtime.registry.engine.begin() as conn:
        conn.execute(memberships.delete().where(memberships.c.user_id == alice_id))
        conn.execute(users.delete().where(users.c.id == alice_id))
    runtime.platform.announce(Change("user", alice_id))
    headers = alice if path == "/v1/runs" else own
    assert_problem(await http.get(path, headers=headers), 401, "invalid-token")


async def test_without_a_live_channel_a_grant_is_read_again_after_half_a_second(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    """Redis away (here: a port nobody listens on): no change can be heard of, so a cached
    grant serves for 0.5 s at most, then is read again."""
    import asyncio

    from tenantflow.coordination.redis import RedisCoordination
    from tenantflow.platform.access import STALE_SECONDS, AccessGuard
    from tenantflow.platform.schema import memberships
    from tests.servers import free_port

    alice = await member(runtime, http, "alice@acme.test", "acme", Role.OPERATOR)
    claims = jwt.decode(alice["Authorization"][7:], options={"verify_signature": False})

    async def uid(tenant_id: str) -> str:
        return (await runtime.router.tenant_async(tenant_id)).uid

    nobody = RedisCoordination(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    guard = AccessGuard(
        runtime.registry.engine, cache_seconds=10, tenant_uid=uid, coordination=nobody
    )
    try:
        assert (await guard.admit(claims, None)).role is Role.OPERATOR
        with runtime.registry.engine.begin() as conn:  # changed behind the guard's back
            conn.execute(memberships.update().values(role=Role.VIEWER.value))
        assert (await guard.admit(claims, None)).role is Role.OPERATOR  # cached
        assert not guard.proven
        await asyncio.sleep(STALE_SECONDS + 0.1)
        assert (await guard.admit(claims, None)).role is Role.VIEWER
    finally:
        await guard.close()
        await nobody.close()
