"""The platform plane over HTTP (``/platform/v1``): the token endpoint, tenants, database
servers, plans and licenses, the audit log; and the JWKS (users, memberships, invitations and
API keys: ``api/people.py``).

Platform administrators manage everything. A tenant administrator manages the memberships and
API keys of their own tenant (their token's tenant, whatever the path says otherwise).
Connection secrets and private keys are never part of an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam

from tenantflow.api import problems
from tenantflow.api.deps import (
    AuditCursor,
    PlatformAdmin,
    RuntimeDep,
    known_query,
)
from tenantflow.api.models import (
    PLAIN,
    TENANT_ID_PATTERN,
    AuditPage,
    LicenseOut,
    MembershipOut,
    PlanIn,
    PlanOut,
    RotateIn,
    ServerIn,
    ServerOut,
    ServerPatch,
    TenantIn,
    TenantOut,
    TenantPatch,
    TokenOut,
    TokenRequest,
)
from tenantflow.api.routing import StrictJsonRoute
from tenantflow.api.signin import SignInGuard
from tenantflow.errors import (
    InvalidInputError,
    TenantNotFoundError,
)
from tenantflow.platform.access import Principal
from tenantflow.platform.identity import Membership, Role
from tenantflow.platform.keys import Jwks
from tenantflow.platform.licensing import License
from tenantflow.platform.registry import DatabaseServer, TenantStatus
from tenantflow.platform.service import Platform
from tenantflow.runtime import Runtime

T = TypeVar("T")

# Only a valid tenant id can name a tenant; the other ids are plain text (see PLAIN).
TenantId = Annotated[str, PathParam(pattern=TENANT_ID_PATTERN)]
Key = Annotated[str, PathParam(max_length=255, pattern=PLAIN)]


# Every route may refuse its caller (/token the credentials, the others the token), and find
# the platform database out of reach (503).
def platform_router() -> APIRouter:
    return APIRouter(
        prefix="/platform/v1",
        tags=["platform plane"],
        route_class=StrictJsonRoute,
        dependencies=[Depends(known_query)],
        responses=problems.responses(401, 403, 422, 503),
    )


router = platform_router()
wellknown = APIRouter(tags=["platform plane"])


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Platform calls are synchronous (the platform database): off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def membership_out(m: Membership) -> MembershipOut:
    return MembershipOut(
        user_id=m.user_id, tenant=m.tenant_id, role=m.role, created_at=m.created_at
    )


def _license_out(lic: License) -> LicenseOut:
    return LicenseOut(
        id=lic.id,
        tenant=lic.tenant_id,
        plan=lic.plan_id,
        document=lic.document,
        issued_at=lic.issued_at,
        expires_at=lic.expires_at,
    )


def require_admin_of(principal: Principal, tenant_id: str) -> None:
    """A platform admin, or this tenant's admin. Another tenant's admin gets the answer a
    missing tenant gets."""
    if principal.platform_admin:
        return
    if principal.tenant_id != tenant_id:
        raise TenantNotFoundError()
    principal.require(Role.TENANT_ADMIN)


# -- token and keys --------------------------------------------------------------------------


@router.post("/token", response_model=TokenOut, responses=problems.responses(400, 413, 429))
async def token(body: TokenRequest, request: Request, runtime: RuntimeDep) -> TokenOut:
    """Exchange a password (for one tenant, or the platform plane for a platform admin) or
    an API key for a short-lived access token. Failed passwords are limited per account and
    per client address (429 ``sign-in-throttled``, see ``api.signin``)."""
    platform = runtime.platform
    if body.grant_type == "password":
        if not body.email or body.password is None:
            raise InvalidInputError("the password grant needs email and password")
        guard: SignInGuard = request.app.state.signin
        user = await guard.authenticate(
            platform.identity.authenticate,
            body.email,
            body.password,
            address=request.client.host if request.client else "unknown",
        )
        issued = await in_thread(platform.token_for_user, user, body.tenant)
    else:
        if not body.api_key:
            raise InvalidInputError("the api_key grant needs api_key")
        issued = await in_thread(platform.token_for_api_key, body.api_key)
    return TokenOut(
        access_token=issued.access_token,
        expires_in=issued.expires_in,
        tenant=issued.tenant_id,
        role=issued.role,
    )


@wellknown.get("/.well-known/jwks.json")
async def jwks(runtime: RuntimeDep) -> Jwks:
    """The public keys that verify access tokens and licenses."""
    return await in_thread(runtime.platform.jwks)


@router.post("/keys/rotate", responses=problems.responses(400, 413))
async def rotate_keys(
    principal: PlatformAdmin, runtime: RuntimeDep, body: RotateIn | None = None
) -> dict[str, str]:
    """Sign with a new key from now on. The old keys still verify what they signed until it
    expires; with ``revoke_tokens`` (a key that leaked) no access token they signed is
    taken from now on, in any API process within a second (licenses still verify)."""
    revoke = body is not None and body.revoke_tokens
    kid = await in_thread(runtime.platform.rotate_keys, principal.subject, revoke_tokens=revoke)
    return {"kid": kid}


# -- tenants ---------------------------------------------------------------------------------

ACTION = problems.responses(404, 413)  # of a POST that acts on one tenant


@router.post(
    "/tenants",
    status_code=201,
    response_model=TenantOut,
    responses=problems.responses(400, 404, 409, 413),
)
async def create_tenant(body: TenantIn, principal: PlatformAdmin, runtime: RuntimeDep) -> TenantOut:
    tenant = await in_thread(
        runtime.platform.create_tenant,
        principal.subject,
        body.id,
        name=body.name,
        plan_id=body.plan,
    )
    return TenantOut.of(tenant)


@router.get("/tenants", response_model=list[TenantOut])
async def list_tenants(principal: PlatformAdmin, runtime: RuntimeDep) -> list[TenantOut]:
    return [TenantOut.of(t) for t in await in_thread(runtime.registry.list)]


@router.get("/tenants/{tenant_id}", response_model=TenantOut, responses=problems.responses(404))
async def show_tenant(
    tenant_id: TenantId, principal: PlatformAdmin, runtime: RuntimeDep
) -> TenantOut:
    return TenantOut.of(await in_thread(runtime.registry.get, tenant_id))


@router.patch(
    "/tenants/{tenant_id}",
    response_model=TenantOut,
    responses=problems.responses(400, 404, 413),
)
async def change_tenant(
    tenant_id: TenantId, body: TenantPatch, principal: PlatformAdmin, runtime: RuntimeDep
) -> TenantOut:
    """Move the tenant to another plan (a new license is issued)."""
    return TenantOut.of(
        await in_thread(runtime.platform.set_plan, principal.subject, tenant_id, body.plan)
    )


@router.post("/tenants/{tenant_id}/suspend", response_model=TenantOut, responses=ACTION)
async def suspend_tenant(
    tenant_id: TenantId, principal: PlatformAdmin, runtime: RuntimeDep
) -> TenantOut:
    """Refuse the tenant's submits and stop workers taking its runs; nothing is lost."""
    return await _set_status(runtime, principal, tenant_id, TenantStatus.SUSPENDED)


@router.post("/tenants/{tenant_id}/resume", response_model=TenantOut, responses=ACTION)
async def resume_tenant(
    tenant_id: TenantId, principal: PlatformAdmin, runtime: RuntimeDep
) -> TenantOut:
    return await _set_status(runtime, principal, tenant_id, TenantStatus.ACTIVE)


async def _set_status(
    runtime: Runtime, principal: Principal, tenant_id: str, status: TenantStatus
) -> TenantOut:
    platform: Platform = runtime.platform
    return TenantOut.of(await in_thread(platform.set_status, principal.subject, tenant_id, status))


@router.post("/tenants/{tenant_id}/offboard", responses=ACTION)
async def offboard_tenant(
    tenant_id: TenantId, principal: PlatformAdmin, runtime: RuntimeDep
) -> dict[str, str]:
    """Export the tenant's data to an archive, then drop its database."""
    await runtime.forget(tenant_id)
    archive = await in_thread(
        runtime.platform.offboard,
        principal.subject,
        tenant_id,
        runtime.settings.home / "archives",
    )
    await runtime.queue.purge(tenant_id)
    return {"tenant": tenant_id, "archive": archive.name}


# -- database servers (the routing table) ----------------------------------------------------


def _server_out(s: DatabaseServer) -> ServerOut:
    return ServerOut(id=s.id, accepting=s.accepting, tenants=s.tenants)


@router.post(
    "/servers",
    status_code=201,
    response_model=ServerOut,
    responses=problems.responses(400, 409, 413),
)
async def add_server(body: ServerIn, principal: PlatformAdmin, runtime: RuntimeDep) -> ServerOut:
    """Register a database server new tenants may be placed on (the one with the fewest
    tenants among those accepting is picked). Its URL is never shown again."""
    return _server_out(
        await in_thread(runtime.platform.add_server, principal.subject, body.id, body.url)
    )


@router.get("/servers", response_model=list[ServerOut])
async def list_servers(principal: PlatformAdmin, runtime: RuntimeDep) -> list[ServerOut]:
    return [_server_out(s) for s in await in_thread(runtime.registry.servers)]


@router.patch(
    "/servers/{server_id}",
    response_model=ServerOut,
    responses=problems.responses(400, 404, 413),
)
async def change_server(
    server_id: Key, body: ServerPatch, principal: PlatformAdmin, runtime: RuntimeDep
) -> ServerOut:
    return _server_out(
        await in_thread(
            runtime.platform.set_server_accepting, principal.subject, server_id, body.accepting
        )
    )


# -- plans and licenses ----------------------------------------------------------------------


@router.post(
    "/plans",
    status_code=201,
    response_model=PlanOut,
    responses=problems.responses(400, 409, 413),
)
async def create_plan(body: PlanIn, principal: PlatformAdmin, runtime: RuntimeDep) -> PlanOut:
    plan = await in_thread(
        runtime.platform.create_plan,
        principal.subject,
        body.id,
        name=body.name,
        entitlements=body.entitlements,
        quotas=body.quotas.quotas(),
    )
    return PlanOut.of(plan)


@router.get("/plans", response_model=list[PlanOut])
async def list_plans(principal: PlatformAdmin, runtime: RuntimeDep) -> list[PlanOut]:
    return [PlanOut.of(p) for p in await in_thread(runtime.platform.licensing.list_plans)]


@router.post(
    "/tenants/{tenant_id}/licenses",
    status_code=201,
    response_model=LicenseOut,
    responses=problems.responses(404, 409, 413),
)
async def issue_license(
    tenant_id: TenantId, principal: PlatformAdmin, runtime: RuntimeDep
) -> LicenseOut:
    return _license_out(
        await in_thread(runtime.platform.issue_license, principal.subject, tenant_id)
    )


@router.get(
    "/tenants/{tenant_id}/licenses",
    response_model=list[LicenseOut],
    responses=problems.responses(404),
)
async def list_licenses(
    tenant_id: TenantId, principal: PlatformAdmin, runtime: RuntimeDep
) -> list[LicenseOut]:
    await in_thread(runtime.registry.get, tenant_id)
    return [_license_out(x) for x in await in_thread(runtime.platform.licensing.history, tenant_id)]


# -- audit -----------------------------------------------------------------------------------


@router.get("/audit", response_model=AuditPage)
async def platform_audit(
    principal: PlatformAdmin,
    runtime: RuntimeDep,
    tenant: Annotated[str | None, Query(max_length=63, pattern=PLAIN)] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=PLAIN)] = None,
    cursor: AuditCursor = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditPage:
    """Every tenant's entries, or one tenant's (``tenant``)."""
    entries = await in_thread(
        runtime.platform.audit.query,
        tenant_id=tenant,
        action=action,
        after=cursor,
        limit=limit,
        platform_wide=tenant is None,
    )
    return AuditPage.of(entries, limit)
