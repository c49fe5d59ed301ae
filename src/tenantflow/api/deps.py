"""FastAPI dependencies: the process's services, and who is calling.

A tenant-plane request takes its tenant only from the verified access token; nothing a client
sends elsewhere (path, query, body, headers) can name another tenant.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tenantflow.client import Client, TenantClient
from tenantflow.errors import (
    AuthenticationError,
    InvalidInputError,
    Issue,
    PermissionDeniedError,
)
from tenantflow.platform.access import Principal
from tenantflow.platform.identity import Role
from tenantflow.platform.keys import verify
from tenantflow.platform.service import ACCESS_AUDIENCE, ACCESS_TYP
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_app(request: Request) -> App:
    app: App = request.app.state.workflows
    return app


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
AppDep = Annotated[App, Depends(get_app)]

# Audit entry ids, the audit log's cursor: the column is an INTEGER (32 bits on PostgreSQL),
# so a larger number is refused here rather than by the database.
AuditCursor = Annotated[int | None, Query(ge=1, le=2**31 - 1)]


async def known_query(request: Request) -> None:
    """Refuse a query parameter the route does not take, rather than ignore it: a misspelt
    cursor or filter (``?before=`` for ``?cursor=``) must not answer an unfiltered first
    page."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    unknown = sorted(set(request.query_params) - _query_names(route.dependant))
    if unknown:
        raise InvalidInputError(
            issues=[Issue(f"query.{name}", "not a parameter of this route") for name in unknown]
        )


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters of a route and of all its dependencies (under a microsecond: not
    worth a cache)."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# Declared through FastAPI's security class so that the OpenAPI document carries the scheme
# (Swagger UI's Authorize button); a missing token is refused below, as a problem document.
BEARER = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An access token from `POST /platform/v1/token`.",
    auto_error=False,
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]


async def get_principal(
    request: Request, runtime: RuntimeDep, credentials: BearerCredentials
) -> Principal:
    import jwt

    if credentials is None:
        raise AuthenticationError("an access token is needed (Authorization: Bearer ...)")
    token = credentials.credentials
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        kid = None
    kid = None if kid is None else str(kid)
    keys = await runtime.artifacts.keys_async(kid=kid)
    claims = verify(token, keys, typ=ACCESS_TYP, audience=ACCESS_AUDIENCE)
    # What the token may do now: its grant as the platform stands (revoked, changed role).
    principal = await runtime.access.admit(claims, kid)
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def tenant_role(role: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency: a tenant-scoped caller with at least ``role``."""

    async def dependency(principal: CurrentPrincipal) -> Principal:
        if principal.tenant_id is None:
            raise PermissionDeniedError("this needs a token scoped to a tenant")
        principal.require(role)
        return principal

    return dependency


async def platform_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.platform_admin:
        raise PermissionDeniedError("this needs a platform administrator")
    return principal


Viewer = Annotated[Principal, Depends(tenant_role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(tenant_role(Role.OPERATOR))]
TenantAdmin = Annotated[Principal, Depends(tenant_role(Role.TENANT_ADMIN))]
PlatformAdmin = Annotated[Principal, Depends(platform_admin)]


def tenant_client(principal: Principal, runtime: Runtime, app: App) -> TenantClient:
    assert principal.tenant_id is not None
    return Client(app, runtime=runtime).tenant(principal.tenant_id)
