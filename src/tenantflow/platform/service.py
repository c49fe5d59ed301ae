"""The platform plane's operations: tenants and routing, identity, tokens, plans and licenses,
each change recorded in the audit log.

Calls are synchronous (SQLAlchemy on the platform database); async callers run them in a
thread. ``actor`` names who acts: a user id, ``key:<id>`` for an API key, or ``system``.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tenantflow.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    TenantNotFoundError,
    TenantSuspendedError,
)
from tenantflow.platform.access import Announce, Change
from tenantflow.platform.api_keys import ApiKey, ApiKeys
from tenantflow.platform.audit import AuditLog
from tenantflow.platform.identity import Identity, Invitation, Membership, Role, User
from tenantflow.platform.keys import Jwks, SigningKeys
from tenantflow.platform.licensing import License, Licensing, Plan, Quotas
from tenantflow.platform.registry import DatabaseServer, Tenant, TenantRegistry, TenantStatus
from tenantflow.platform.schema import api_keys, invitations, licenses, memberships
from tenantflow.settings import Settings

ACCESS_TYP = "at+jwt"
# The tenantflow API: an access token names it, so a token minted by the same issuer for
# another audience is refused here.
ACCESS_AUDIENCE = "tenantflow-api"
SYSTEM = "system"
ANONYMOUS = "anonymous"  # the actor of what an unauthenticated caller caused


@dataclass(frozen=True, kw_only=True)
class Token:
    access_token: str
    expires_in: int
    tenant_id: str | None
    role: Role | None


class Platform:
    def __init__(self, registry: TenantRegistry) -> None:
        settings: Settings = registry.settings
        engine = registry.engine
        self.settings = settings
        self.registry = registry
        self.keys = SigningKeys(engine)
        self.identity = Identity(engine)
        self.api_keys = ApiKeys(engine)
        self.licensing = Licensing(engine, self.keys, ttl=settings.license_ttl_seconds)
        self.audit = AuditLog(engine)
        # Told of every change that takes access away (after its commit): the runtime drops
        # its cached grants and tells the other processes (see platform.access).
        self.announce: Announce = lambda change: None

    # -- tenants -----------------------------------------------------------------------------

    def create_tenant(
        self, actor: str, tenant_id: str, *, name: str | None = None, plan_id: str | None = None
    ) -> Tenant:
        if plan_id is not None:
            self.licensing.get_plan(plan_id)
        tenant = self.registry.create(tenant_id, name=name, plan_id=plan_id)
        self.audit.record(
            "tenant.created",
            actor=actor,
            tenant_id=tenant.id,
            target=tenant.id,
            details={"plan": plan_id, "server": tenant.server_id},
        )
        if plan_id is not None:
            self.issue_license(actor, tenant.id)
        return tenant

    def set_status(self, actor: str, tenant_id: str, status: TenantStatus) -> Tenant:
        tenant = self.registry.set_status(tenant_id, status)
        self.announce(Change("tenant", tenant_id))
        action = "tenant.suspended" if status is TenantStatus.SUSPENDED else "tenant.resumed"
        self.audit.record(action, actor=actor, tenant_id=tenant_id, target=tenant_id)
        return tenant

    def set_plan(self, actor: str, tenant_id: str, plan_id: str | None) -> Tenant:
        if plan_id is not None:
            self.licensing.get_plan(plan_id)
        tenant = self.registry.set_plan(tenant_id, plan_id)
        self.audit.record(
            "tenant.plan_changed",
            actor=actor,
            tenant_id=tenant_id,
            target=tenant_id,
            details={"plan": plan_id},
        )
        if plan_id is not None:
            self.issue_license(actor, tenant_id)
        return tenant

    def offboard(self, actor: str, tenant_id: str, archive_dir: Path) -> Path:
        """Export the tenant's data to an archive, then drop its database and forget it
        (memberships, keys, licenses). The audit trail stays."""
        tenant = self.registry.get(tenant_id)
        archive = export_tenant(tenant, archive_dir)
        self.registry.drop(tenant_id)
        with self.registry.engine.begin() as conn:
            for table in (memberships, api_keys, licenses, invitations):
                conn.execute(table.delete().where(table.c.tenant_id == tenant_id))
        self.announce(Change("tenant", tenant_id))
        self.audit.record(
            "tenant.offboarded",
            actor=actor,
            tenant_id=tenant_id,
            target=tenant_id,
            details={"archive": archive.name},
        )
        return archive

    def add_server(self, actor: str, server_id: str, url: str) -> DatabaseServer:
        try:
            server = self.registry.add_server(server_id, url)
        except sa.exc.IntegrityError:
            raise ConflictError(f"a database server {server_id!r} exists") from None
        self.audit.record("server.added", actor=actor, tenant_id=None, target=server_id)
        return server

    def set_server_accepting(self, actor: str, server_id: str, accepting: bool) -> DatabaseServer:
        self.registry.server(server_id)
        server = self.registry.set_accepting(server_id, accepting)
        self.audit.record(
            "server.changed",
            actor=actor,
            tenant_id=None,
            target=server_id,
            details={"accepting": accepting},
        )
        return server

    # -- identity ----------------------------------------------------------------------------

    def create_user(
        self, actor: str, email: str, password: str, *, platform_admin: bool = False
    ) -> User:
        user = self.identity.create_user(email, password, platform_admin=platform_admin)
        self.audit.record(
            "user.created",
            actor=actor,
            tenant_id=None,
            target=user.id,
            details={"platform_admin": platform_admin},
        )
        return user

    def reset_password(self, actor: str, email: str, password: str) -> User:
        """Give a user (a platform administrator who lost theirs, say) a new password."""
        user = self.identity.user_by_email(email)
        self.identity.set_password(user.id, password)
        self.announce(Change("user", user.id))
        self.audit.record("user.password_reset", actor=actor, tenant_id=None, target=user.id)
        return user

    def set_user_disabled(self, actor: str, user_id: str, disabled: bool) -> User:
        """Disable a user (no sign-in; every token of theirs refused at once) or enable them
        again (they sign in anew: tokens minted before the disabling stay refused)."""
        user = self.identity.set_disabled(user_id, disabled)
        self.announce(Change("user", user_id))
        action = "user.disabled" if disabled else "user.enabled"
        self.audit.record(action, actor=actor, tenant_id=None, target=user_id)
        return user

    def set_membership(self, actor: str, user_id: str, tenant_id: str, role: Role) -> Membership:
        seats = self._seats(tenant_id)
        membership, previous = self.identity.set_membership(user_id, tenant_id, role, seats=seats)
        if previous is not role:  # a grant made anew as well: a cached "none" goes
            self.announce(Change("user", user_id))
        if previous is None:
            self.audit.record(
                "membership.added",
                actor=actor,
                tenant_id=tenant_id,
                target=user_id,
                details={"role": role.value},
            )
        elif previous is not role:
            self.audit.record(
                "membership.role_changed",
                actor=actor,
                tenant_id=tenant_id,
                target=user_id,
                details={"from": previous.value, "to": role.value},
            )
        return membership

    def remove_membership(self, actor: str, user_id: str, tenant_id: str) -> None:
        self.identity.remove_membership(user_id, tenant_id)
        self.announce(Change("user", user_id))
        self.audit.record("membership.removed", actor=actor, tenant_id=tenant_id, target=user_id)

    def _seats(self, tenant_id: str) -> int | None:
        tenant = self.registry.get(tenant_id)
        if tenant.plan_id is None:
            return None
        return self.licensing.get_plan(tenant.plan_id).quotas.seats

    def invite(self, actor: str, tenant_id: str, user_id: str, role: Role) -> Invitation:
        """Offer a role in the tenant to an existing user; they are a member once they
        accept (``accept_invitation``)."""
        invitation = self.identity.invite(tenant_id, user_id, role, invited_by=actor)
        self.audit.record(
            "invitation.sent",
            actor=actor,
            tenant_id=tenant_id,
            target=user_id,
            details={"role": role.value, "invitation": invitation.id},
        )
        return invitation

    def withdraw_invitation(self, actor: str, tenant_id: str, invitation_id: str) -> None:
        self.identity.drop_invitation(invitation_id, tenant_id=tenant_id)
        self.audit.record(
            "invitation.withdrawn", actor=actor, tenant_id=tenant_id, target=invitation_id
        )

    def accept_invitation(self, user_id: str, invitation_id: str) -> Membership:
        """The invited user takes the role offered (within the plan's seats, counted now)."""
        invitation = self.identity.invitation(invitation_id, user_id=user_id)
        membership, previous = self.identity.set_membership(
            user_id, invitation.tenant_id, invitation.role, seats=self._seats(invitation.tenant_id)
        )
        self.announce(Change("user", user_id))
        self.audit.record(
            "membership.added" if previous is None else "membership.role_changed",
            actor=user_id,
            tenant_id=invitation.tenant_id,
            target=user_id,
            details={"role": invitation.role.value, "invitation": invitation.id},
        )
        return membership

    def decline_invitation(self, user_id: str, invitation_id: str) -> None:
        invitation = self.identity.invitation(invitation_id, user_id=user_id)
        self.identity.drop_invitation(invitation.id)
        self.audit.record(
            "invitation.declined",
            actor=user_id,
            tenant_id=invitation.tenant_id,
            target=invitation.id,
        )

    def create_api_key(
        self, actor: str, tenant_id: str, name: str, role: Role
    ) -> tuple[ApiKey, str]:
        self.registry.get(tenant_id)
        key, secret = self.api_keys.create(tenant_id, name, role)
        self.audit.record(
            "api_key.issued",
            actor=actor,
            tenant_id=tenant_id,
            target=key.id,
            details={"name": name, "role": role.value},
        )
        return key, secret

    def revoke_api_key(self, actor: str, tenant_id: str, key_id: str) -> ApiKey:
        key = self.api_keys.revoke(tenant_id, key_id)
        self.announce(Change("key", key_id))
        self.audit.record("api_key.revoked", actor=actor, tenant_id=tenant_id, target=key_id)
        return key

    # -- tokens ------------------------------------------------------------------------------

    def token_for_password(self, email: str, password: str, tenant_id: str | None) -> Token:
        """An access token for a user: scoped to one tenant they belong to, or with no
        tenant to the platform plane (a platform administrator's) or to their own account
        (anyone's: their invitations)."""
        return self.token_for_user(self.identity.authenticate(email, password), tenant_id)

    def token_for_user(self, user: User, tenant_id: str | None) -> Token:
        """``token_for_password`` once the password was verified (the HTTP API verifies it
        apart: see ``api.signin``)."""
        if tenant_id is None:
            return self._sign(user, None, None, platform_admin=user.is_platform_admin)
        membership = self.identity.membership(user.id, tenant_id)
        if membership is None:
            # The same answer as for a tenant that does not exist.
            raise AuthenticationError("no membership in this tenant")
        tenant = self._active(tenant_id, membership.tenant_uid)
        return self._sign(
            user, tenant, membership.role, platform_admin=False, grant=membership.grant_id
        )

    def record_lockout(self, scope: str, subject: str, details: Mapping[str, Any]) -> None:
        """Audit a sign-in lock-out (``sign_in.locked_out``): of an ``account`` (``subject``
        the email tried; the entry names the user, or nobody if no account has the email,
        never the email itself) or of a client ``address``."""
        target = self.identity.user_id_of(subject) if scope == "account" else subject
        self.audit.record(
            "sign_in.locked_out",
            actor=ANONYMOUS,
            tenant_id=None,
            target=target,
            details={"scope": scope, **details},
        )

    def token_for_api_key(self, presented: str) -> Token:
        key = self.api_keys.authenticate(presented)
        tenant = self._active(key.tenant_id, key.tenant_uid)
        return self._sign(f"key:{key.id}", tenant, key.role, platform_admin=False)

    def _active(self, tenant_id: str, uid: str | None) -> Tenant:
        """The tenant a credential was made in: the same tenant, not only the same id (an id
        may be reused after an offboarding, with a new identity)."""
        try:
            tenant = self.registry.get(tenant_id)
        except TenantNotFoundError:
            raise AuthenticationError("no membership in this tenant") from None
        if uid is None or tenant.uid != uid:
            raise AuthenticationError("no membership in this tenant")
        if tenant.status is not TenantStatus.ACTIVE:
            raise TenantSuspendedError(f"tenant {tenant_id!r} is suspended")
        return tenant

    def _sign(
        self,
        subject: str | User,
        tenant: Tenant | None,
        role: Role | None,
        *,
        platform_admin: bool,
        grant: str | None = None,
    ) -> Token:
        """A token naming the grant it stands on, which every request checks (see
        ``platform.access``): the user's generation, the membership's grant, the tenant's
        identity and access generation."""
        now = int(time.time())
        ttl = int(self.settings.token_ttl_seconds)
        claims: dict[str, Any] = {
            "sub": subject if isinstance(subject, str) else subject.id,
            "aud": ACCESS_AUDIENCE,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": now + ttl,
        }
        if isinstance(subject, User):
            claims["ugen"] = subject.generation
        if grant is not None:
            claims["gid"] = grant
        if tenant is not None:
            claims["tid"] = tenant.id
            claims["tuid"] = tenant.uid
            claims["tgen"] = tenant.access_generation
        if role is not None:
            claims["role"] = role.value
        if platform_admin:
            claims["adm"] = True
        return Token(
            access_token=self.keys.sign(claims, typ=ACCESS_TYP),
            expires_in=ttl,
            tenant_id=None if tenant is None else tenant.id,
            role=role,
        )

    def jwks(self) -> Jwks:
        return self.keys.jwks()

    def rotate_keys(self, actor: str, *, revoke_tokens: bool = False) -> str:
        """A new signing key; the old ones verify until what they signed has expired, or,
        with ``revoke_tokens`` (a key that leaked), no access token they signed is taken
        from now on (their licenses still verify)."""
        kid = self.keys.rotate(
            verify_for=max(self.settings.token_ttl_seconds, self.settings.license_ttl_seconds),
            revoke_tokens=revoke_tokens,
        )
        # Every process fetches the keys again at once (a token of the new key is known at
        # once), and, with revoke_tokens, refuses the old keys' tokens.
        self.announce(Change("keys"))
        self.audit.record(
            "signing_key.rotated",
            actor=actor,
            tenant_id=None,
            target=kid,
            details={"tokens_revoked": revoke_tokens},
        )
        return kid

    # -- plans and licenses ------------------------------------------------------------------

    def create_plan(
        self, actor: str, plan_id: str, *, name: str, entitlements: Sequence[str], quotas: Quotas
    ) -> Plan:
        plan = self.licensing.create_plan(
            plan_id, name=name, entitlements=entitlements, quotas=quotas
        )
        self.audit.record("plan.created", actor=actor, tenant_id=None, target=plan_id)
        return plan

    def issue_license(self, actor: str, tenant_id: str) -> License:
        issued = self.licensing.issue(tenant_id)
        self.audit.record(
            "license.issued",
            actor=actor,
            tenant_id=tenant_id,
            target=issued.id,
            details={"plan": issued.plan_id, "expires_at": issued.expires_at},
        )
        return issued

    def license_document(self, tenant_id: str) -> str | None:
        """What the tenant plane fetches: the tenant's license (renewed when past half its
        life), or None for a tenant on no plan."""
        current = self.licensing.current(tenant_id, renew=True)
        return None if current is None else current.document


def export_tenant(tenant: Tenant, archive_dir: Path) -> Path:
    """Write the tenant database's tables as JSON lines into ``<tenant>-<time>.tar.gz``."""
    from tenantflow.platform.provision import sqlalchemy_url

    archive_dir.mkdir(parents=True, exist_ok=True)
    path = archive_dir / f"{tenant.id}-{time.strftime('%Y%m%dT%H%M%S')}.tar.gz"
    engine = sa.create_engine(sqlalchemy_url(tenant.database_url))
    try:
        with engine.connect() as conn, tarfile.open(path, "w:gz") as archive:
            names = sorted(sa.inspect(conn).get_table_names())
            for name in names:
                if name == "alembic_version":
                    continue
                table = sa.Table(name, sa.MetaData(), autoload_with=conn)
                buffer = io.BytesIO()
                for row in conn.execute(sa.select(table)).mappings():
                    record = {k: _jsonable(v) for k, v in row.items()}
                    buffer.write(json.dumps(record, sort_keys=True).encode() + b"\n")
                info = tarfile.TarInfo(f"{name}.jsonl")
                info.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(info, buffer)
            meta = json.dumps({"tenant": tenant.id, "exported_at": time.time()}).encode()
            info = tarfile.TarInfo("tenant.json")
            info.size = len(meta)
            archive.addfile(info, io.BytesIO(meta))
    finally:
        engine.dispose()
    if not path.exists():
        raise NotFoundError("the archive was not written")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        raw = bytes(value)
        try:
            return json.loads(raw)
        except ValueError:
            return raw.hex()
    return value
