"""The people of the platform over HTTP (``/platform/v1``): users, memberships, invitations
and API keys. Platform administrators manage users; a tenant administrator manages the
memberships, invitations and API keys of their own tenant (their token's tenant)."""

from __future__ import annotations

from tenantflow.api import problems
from tenantflow.api.deps import (
    CurrentPrincipal,
    PlatformAdmin,
    RuntimeDep,
)
from tenantflow.api.models import (
    ApiKeyIn,
    ApiKeyOut,
    InvitationIn,
    InvitationOut,
    MembershipIn,
    MembershipOut,
    UserIn,
    UserOut,
)
from tenantflow.api.platform import (
    Key,
    TenantId,
    in_thread,
    membership_out,
    platform_router,
    require_admin_of,
)
from tenantflow.errors import (
    ConflictError,
    PermissionDeniedError,
)
from tenantflow.platform.access import Principal

router = platform_router()


# -- users, memberships, API keys ------------------------------------------------------------


@router.post(
    "/users",
    status_code=201,
    response_model=UserOut,
    responses=problems.responses(400, 409, 413),
)
async def create_user(body: UserIn, principal: PlatformAdmin, runtime: RuntimeDep) -> UserOut:
    user = await in_thread(
        runtime.platform.create_user,
        principal.subject,
        body.email,
        body.password,
        platform_admin=body.platform_admin,
    )
    return UserOut.of(user)


@router.get("/users", response_model=list[UserOut])
async def list_users(principal: PlatformAdmin, runtime: RuntimeDep) -> list[UserOut]:
    return [UserOut.of(u) for u in await in_thread(runtime.platform.identity.list_users)]


@router.post(
    "/users/{user_id}/disable", response_model=UserOut, responses=problems.responses(404, 413)
)
async def disable_user(user_id: Key, principal: PlatformAdmin, runtime: RuntimeDep) -> UserOut:
    """The user can no longer sign in, and every token of theirs is refused, in any API
    process within a second."""
    return UserOut.of(
        await in_thread(runtime.platform.set_user_disabled, principal.subject, user_id, True)
    )


@router.post(
    "/users/{user_id}/enable", response_model=UserOut, responses=problems.responses(404, 413)
)
async def enable_user(user_id: Key, principal: PlatformAdmin, runtime: RuntimeDep) -> UserOut:
    """The user may sign in again (tokens from before the disabling stay refused)."""
    return UserOut.of(
        await in_thread(runtime.platform.set_user_disabled, principal.subject, user_id, False)
    )


@router.put(
    "/tenants/{tenant_id}/memberships",
    response_model=MembershipOut,
    responses=problems.responses(400, 404, 409, 413),
)
async def set_membership(
    tenant_id: TenantId, body: MembershipIn, principal: CurrentPrincipal, runtime: RuntimeDep
) -> MembershipOut:
    """Change a member's role (at once, for their outstanding tokens too). A platform
    administrator may also add a user directly; a tenant administrator invites them
    (``POST .../invitations``): a 409 otherwise. Beyond the plan's seats, a 409."""
    require_admin_of(principal, tenant_id)
    if not principal.platform_admin:
        current = await in_thread(runtime.platform.identity.membership, body.user_id, tenant_id)
        if current is None:
            raise ConflictError(
                "the user is not a member: invite them (POST "
                f"/platform/v1/tenants/{tenant_id}/invitations), and they accept"
            )
    membership = await in_thread(
        runtime.platform.set_membership, principal.subject, body.user_id, tenant_id, body.role
    )
    return membership_out(membership)


@router.get(
    "/tenants/{tenant_id}/memberships",
    response_model=list[MembershipOut],
    responses=problems.responses(404),
)
async def list_memberships(
    tenant_id: TenantId, principal: CurrentPrincipal, runtime: RuntimeDep
) -> list[MembershipOut]:
    require_admin_of(principal, tenant_id)
    found = await in_thread(runtime.platform.identity.memberships, tenant_id=tenant_id)
    return [membership_out(m) for m in found]


@router.delete(
    "/tenants/{tenant_id}/memberships/{user_id}",
    status_code=204,
    responses=problems.responses(404),
)
async def remove_membership(
    tenant_id: TenantId, user_id: Key, principal: CurrentPrincipal, runtime: RuntimeDep
) -> None:
    require_admin_of(principal, tenant_id)
    await in_thread(runtime.platform.remove_membership, principal.subject, user_id, tenant_id)


# -- invitations -----------------------------------------------------------------------------


@router.post(
    "/tenants/{tenant_id}/invitations",
    status_code=201,
    response_model=InvitationOut,
    responses=problems.responses(400, 404, 409, 413),
)
async def invite(
    tenant_id: TenantId, body: InvitationIn, principal: CurrentPrincipal, runtime: RuntimeDep
) -> InvitationOut:
    """Offer a role in the tenant to an existing user; they become a member when they
    accept it (``POST /platform/v1/invitations/{id}/accept``), within 7 days."""
    require_admin_of(principal, tenant_id)
    made = await in_thread(
        runtime.platform.invite, principal.subject, tenant_id, body.user_id, body.role
    )
    return InvitationOut.of(made)


@router.get(
    "/tenants/{tenant_id}/invitations",
    response_model=list[InvitationOut],
    responses=problems.responses(404),
)
async def list_tenant_invitations(
    tenant_id: TenantId, principal: CurrentPrincipal, runtime: RuntimeDep
) -> list[InvitationOut]:
    require_admin_of(principal, tenant_id)
    found = await in_thread(runtime.platform.identity.invitations, tenant_id=tenant_id)
    return [InvitationOut.of(i) for i in found]


@router.delete(
    "/tenants/{tenant_id}/invitations/{invitation_id}",
    status_code=204,
    responses=problems.responses(404),
)
async def withdraw_invitation(
    tenant_id: TenantId, invitation_id: Key, principal: CurrentPrincipal, runtime: RuntimeDep
) -> None:
    require_admin_of(principal, tenant_id)
    await in_thread(
        runtime.platform.withdraw_invitation, principal.subject, tenant_id, invitation_id
    )


def _invitee(principal: Principal) -> str:
    """A user's own token (one with no tenant: ``/token`` without ``tenant``)."""
    if principal.subject.startswith("key:") or principal.tenant_id is not None:
        raise PermissionDeniedError("this needs a user's token with no tenant")
    return principal.subject


@router.get("/invitations", response_model=list[InvitationOut])
async def my_invitations(principal: CurrentPrincipal, runtime: RuntimeDep) -> list[InvitationOut]:
    """The caller's pending invitations."""
    user_id = _invitee(principal)
    found = await in_thread(runtime.platform.identity.invitations, user_id=user_id)
    return [InvitationOut.of(i) for i in found]


@router.post(
    "/invitations/{invitation_id}/accept",
    response_model=MembershipOut,
    responses=problems.responses(404, 409, 413),
)
async def accept_invitation(
    invitation_id: Key, principal: CurrentPrincipal, runtime: RuntimeDep
) -> MembershipOut:
    """Become a member of the inviting tenant, with the role offered (a 409 if the plan's
    seats are taken by then). Then sign in for that tenant."""
    user_id = _invitee(principal)
    return membership_out(
        await in_thread(runtime.platform.accept_invitation, user_id, invitation_id)
    )


@router.post(
    "/invitations/{invitation_id}/decline",
    status_code=204,
    responses=problems.responses(404, 413),
)
async def decline_invitation(
    invitation_id: Key, principal: CurrentPrincipal, runtime: RuntimeDep
) -> None:
    user_id = _invitee(principal)
    await in_thread(runtime.platform.decline_invitation, user_id, invitation_id)


@router.post(
    "/tenants/{tenant_id}/api-keys",
    status_code=201,
    response_model=ApiKeyOut,
    responses=problems.responses(400, 404, 413),
)
async def create_api_key(
    tenant_id: TenantId, body: ApiKeyIn, principal: CurrentPrincipal, runtime: RuntimeDep
) -> ApiKeyOut:
    """A new key; its secret is in this answer and nowhere else, ever."""
    require_admin_of(principal, tenant_id)
    key, secret = await in_thread(
        runtime.platform.create_api_key, principal.subject, tenant_id, body.name, body.role
    )
    return ApiKeyOut.of(key, secret)


@router.get(
    "/tenants/{tenant_id}/api-keys",
    response_model=list[ApiKeyOut],
    responses=problems.responses(404),
)
async def list_api_keys(
    tenant_id: TenantId, principal: CurrentPrincipal, runtime: RuntimeDep
) -> list[ApiKeyOut]:
    require_admin_of(principal, tenant_id)
    return [
        ApiKeyOut.of(k) for k in await in_thread(runtime.platform.api_keys.of_tenant, tenant_id)
    ]


@router.delete(
    "/tenants/{tenant_id}/api-keys/{key_id}",
    response_model=ApiKeyOut,
    responses=problems.responses(404),
)
async def revoke_api_key(
    tenant_id: TenantId, key_id: Key, principal: CurrentPrincipal, runtime: RuntimeDep
) -> ApiKeyOut:
    require_admin_of(principal, tenant_id)
    return ApiKeyOut.of(
        await in_thread(runtime.platform.revoke_api_key, principal.subject, tenant_id, key_id)
    )
