"""Credentials bound to a tenant's lifetime, on both backends: a tenant offboarded and created
again under the same id is another tenant, and nothing of the old one (its admin's token, an
operator's token, an API key, a password membership) reaches it."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
import sqlalchemy as sa

from tenantflow import Runtime
from tenantflow.platform.identity import Role
from tenantflow.platform.licensing import Quotas
from tests.conftest import POSTGRES_URL
from tests.integration.test_api import PASSWORD, admin, bearer, http, member, token

__all__ = ["http"]  # the fixture, used by name


async def test_a_recreated_tenant_takes_no_credential_of_the_old_one(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    root = await admin(runtime, http)
    boss = await member(runtime, http, "boss@acme.test", "acme", Role.TENANT_ADMIN)
    made = await http.post(
        "/platform/v1/tenants/acme/api-keys", json={"name": "ci", "role": "operator"}, headers=boss
    )
    assert made.status_code == 201, made.text
    key = made.json()["secret"]
    keyed = bearer(await token(http, grant_type="api_key", api_key=key))
    start = {"workflow": "greet", "args": ["old"]}
    assert (await http.post("/v1/runs", json=start, headers=keyed)).status_code == 202
    old_uid = jwt.decode(
        boss["Authorization"].removeprefix("Bearer "), options={"verify_signature": False}
    )["tuid"]

    assert (await http.post("/platform/v1/tenants/acme/offboard", headers=root)).status_code == 200
    again = await http.post("/platform/v1/tenants", json={"id": "acme"}, headers=root)
    assert again.status_code == 201, again.text
    assert runtime.registry.get("acme").uid != old_uid

    # The old tenant's tokens, each on a read, a write and a tenant admin's route.
    for headers in (boss, keyed):
        for method, path, body in (
            ("GET", "/v1/runs", None),
            ("POST", "/v1/runs", start),
            ("POST", "/platform/v1/tenants/acme/api-keys", {"name": "x", "role": "tenant_admin"}),
            ("GET", "/platform/v1/tenants/acme/memberships", None),
        ):
            reply = await http.request(method, path, json=body, headers=headers)
            assert reply.status_code == 401, (method, path, reply.status_code, reply.text)
            assert reply.json()["type"] == "urn:tenantflow:problem:invalid-token"
    # Its API key and its members' passwords sign in to nothing.
    refused = await http.post("/platform/v1/token", json={"grant_type": "api_key", "api_key": key})
    assert refused.status_code == 401, refused.text
    refused = await http.post(
        "/platform/v1/token",
        json={
            "grant_type": "password",
            "email": "boss@acme.test",
            "password": PASSWORD,
            "tenant": "acme",
        },
    )
    assert refused.status_code == 401, refused.text
    # Nothing was made in the new tenant by the old credentials.
    assert (await http.get("/platform/v1/tenants/acme/api-keys", headers=root)).json() == []
    assert (await http.get("/platform/v1/tenants/acme/memberships", headers=root)).json() == []
    # The new tenant's own members are served.
    fresh = await member(runtime, http, "new@acme.test", "acme", Role.VIEWER)
    runs = await http.get("/v1/runs", headers=fresh)
    assert runs.status_code == 200 and runs.json()["runs"] == []


async def test_a_credential_made_in_a_tenant_names_its_identity(runtime: Runtime) -> None:
    """API keys and memberships carry the identity of the tenant they were made in, and a
    token exchange checks it against the tenant's identity now."""
    platform = runtime.platform
    uid = runtime.registry.get("acme").uid
    user = platform.create_user("system", "m@acme.test", PASSWORD)
    assert platform.set_membership("system", user.id, "acme", Role.VIEWER).tenant_uid == uid
    key, secret = platform.create_api_key("system", "acme", "k", Role.VIEWER)
    assert key.tenant_uid == uid
    assert [m.tenant_uid for m in platform.identity.memberships(tenant_id="acme")] == [uid]
    claims = jwt.decode(
        platform.token_for_api_key(secret).access_token, options={"verify_signature": False}
    )
    assert claims["tid"] == "acme" and claims["tuid"] == uid


async def test_a_recreated_tenant_is_served_its_own_license(runtime: Runtime) -> None:
    """A license names the tenant's identity; one cached for the old tenant of an id is
    fetched again, not applied to the new one."""
    platform = runtime.platform
    platform.create_plan("system", "gold", name="Gold", entitlements=["*"], quotas=Quotas())
    platform.set_plan("system", "acme", "gold")
    old = await runtime.license("acme")
    assert old is not None and old.tenant_uid == runtime.registry.get("acme").uid
    platform.offboard("system", "acme", runtime.settings.home / "archives")
    await runtime.router.forget("acme")
    platform.create_tenant("system", "acme", plan_id="gold")
    new_uid = runtime.registry.get("acme").uid
    assert runtime.artifacts.license("acme").tenant_uid == old.tenant_uid  # type: ignore[union-attr]
    fresh = await runtime.license("acme")
    assert fresh is not None and fresh.tenant_uid == new_uid != old.tenant_uid
    assert fresh.license_id != old.license_id


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migration_gives_each_tenant_an_identity_and_its_credentials_with_it(
    backend: str, tmp_path: Path
) -> None:
    """p0004 and p0005 over a platform database with tenants, keys and memberships made
    before them."""
    from alembic import command

    from tenantflow.platform.database import PLATFORM_MIGRATIONS, migrate_platform
    from tenantflow.platform.provision import with_database
    from tenantflow.store.migrate import alembic_config

    name = f"tftest_p0004_{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'platform.db'}"
    else:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin_conn:
            admin_conn.execute(f'CREATE DATABASE "{name}"')
        url = with_database(POSTGRES_URL, name).replace("postgresql://", "postgresql+psycopg://")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(PLATFORM_MIGRATIONS)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "p0003")
            for tenant in ("acme", "globex"):
                conn.execute(
                    sa.text(
                        "INSERT INTO tenants (id, name, status, created_at, database_url) "
                        "VALUES (:id, :id, 'active', 0, :url)"
                    ),
                    {"id": tenant, "url": f"sqlite:///{tenant}.db"},
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO api_keys (id, tenant_id, name, role, secret_hash, "
                        "created_at) VALUES (:id, :t, 'k', 'viewer', 'x', 0)"
                    ),
                    {"id": f"key-{tenant}", "t": tenant},
                )
                conn.execute(
                    sa.text(
                        "INSERT INTO memberships (user_id, tenant_id, role, created_at) "
                        "VALUES ('u1', :t, 'viewer', 0)"
                    ),
                    {"t": tenant},
                )
        migrate_platform(engine)
        with engine.connect() as conn:
            uids: dict[str, str] = {
                r[0]: r[1] for r in conn.execute(sa.text("SELECT id, uid FROM tenants"))
            }
            keys: dict[str, str] = {
                r[0]: r[1]
                for r in conn.execute(sa.text("SELECT tenant_id, tenant_uid FROM api_keys"))
            }
            members: dict[str, str] = {
                r[0]: r[1]
                for r in conn.execute(sa.text("SELECT tenant_id, tenant_uid FROM memberships"))
            }
            grants = [r[0] for r in conn.execute(sa.text("SELECT grant_id FROM memberships"))]
            generations = {
                r[0] for r in conn.execute(sa.text("SELECT access_generation FROM tenants"))
            }
        assert set(uids) == {"acme", "globex"} and len(set(uids.values())) == 2
        assert all(len(uid) == 32 for uid in uids.values())
        assert keys == uids and members == uids
        # Each membership is a grant of its own; no tenant was suspended yet.
        assert len(set(grants)) == 2 and all(len(g) == 32 for g in grants)
        assert generations == {0}
    finally:
        engine.dispose()
        if backend == "postgresql":
            with psycopg.connect(POSTGRES_URL, autocommit=True) as admin_conn:
                admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
