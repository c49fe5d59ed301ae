"""Identity: users, their memberships in tenants and invitations to them, platform
administrators. Passwords are hashed with argon2id. (API keys: ``platform/api_keys.py``.)
"""

from __future__ import annotations

import enum
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from tenantflow.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SeatLimitError,
    TenantNotFoundError,
)
from tenantflow.platform.schema import invitations, memberships, tenants, users

# No whitespace, and no control character either (PostgreSQL refuses NUL in text).
EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}")
MIN_PASSWORD = 8
INVITATION_SECONDS = 7 * 86400  # how long an invitation waits for its answer


class Role(enum.StrEnum):
    """A member's role in a tenant; each includes the ones below it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    TENANT_ADMIN = "tenant_admin"

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.TENANT_ADMIN: 2}


@dataclass(frozen=True, kw_only=True)
class User:
    id: str
    email: str
    is_platform_admin: bool
    created_at: float
    disabled: bool = False
    generation: int = 0  # of its credentials: tokens carry it (see p0005)


@dataclass(frozen=True, kw_only=True)
class Membership:
    user_id: str
    tenant_id: str
    role: Role
    created_at: float
    tenant_uid: str | None = None  # the identity of the tenant it was made in
    grant_id: str | None = None  # this grant: tokens name it


@dataclass(frozen=True, kw_only=True)
class Invitation:
    """A tenant's offer of ``role`` to an existing user, who is a member once they accept."""

    id: str
    tenant_id: str
    user_id: str
    role: Role
    invited_by: str
    created_at: float
    expires_at: float


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if not EMAIL.fullmatch(email):
        raise InvalidInputError("not an email address")
    return email


def _user(row: Any) -> User:
    return User(
        id=row.id,
        email=row.email,
        is_platform_admin=bool(row.is_platform_admin),
        created_at=row.created_at,
        disabled=row.disabled_at is not None,
        generation=row.generation,
    )


class Identity:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.hasher = hasher or PasswordHasher()  # argon2id, the library's defaults
        self.clock = clock
        # Verifying against this when the email is unknown takes as long as a real check,
        # so response times do not tell which emails have accounts.
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    # -- users -------------------------------------------------------------------------------

    def create_user(self, email: str, password: str, *, platform_admin: bool = False) -> User:
        email = normalize_email(email)
        _check_password(password)
        user = User(
            id=str(uuid.uuid4()),
            email=email,
            is_platform_admin=platform_admin,
            created_at=self.clock(),
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    users.insert().values(
                        id=user.id,
                        email=email,
                        password_hash=self.hasher.hash(password),
                        is_platform_admin=platform_admin,
                        created_at=user.created_at,
                    )
                )
        except sa.exc.IntegrityError:
            raise ConflictError("a user with this email exists") from None
        return user

    def get_user(self, user_id: str) -> User:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
        if row is None:
            raise NotFoundError("no such user")
        return _user(row)

    def user_by_email(self, email: str) -> User:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(users).where(users.c.email == normalize_email(email))
            ).first()
        if row is None:
            raise NotFoundError("no user with this email")
        return _user(row)

    def user_id_of(self, email: str) -> str | None:
        """The id of the user with this email, None if there is none (or it is no email)."""
        try:
            return self.user_by_email(email).id
        except (NotFoundError, InvalidInputError):
            return None

    def set_password(self, user_id: str, password: str) -> None:
        """Replace a user's password (a lost one: the old one is not needed); every token
        minted before is refused from now on."""
        _check_password(password)
        with self.engine.begin() as conn:
            changed = conn.execute(
                users.update()
                .where(users.c.id == user_id)
                .values(password_hash=self.hasher.hash(password), generation=users.c.generation + 1)
            ).rowcount
        if not changed:
            raise NotFoundError("no such user")

    def set_disabled(self, user_id: str, disabled: bool) -> User:
        """Disable a user (no sign-in, every token refused) or enable them again (tokens
        minted before the disabling stay refused)."""
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"disabled_at": self.clock() if disabled else None}
            if disabled:
                values["generation"] = users.c.generation + 1
            query = users.update().where(users.c.id == user_id)
            if disabled:  # disabling twice changes nothing
                query = query.where(users.c.disabled_at.is_(None))
            conn.execute(query.values(**values))
        return self.get_user(user_id)

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(users).order_by(users.c.email)).all()
        return [_user(r) for r in rows]

    def authenticate(self, email: str, password: str) -> User:
        """The user with these credentials; an ``AuthenticationError`` that does not say
        which part was wrong otherwise."""
        try:
            email = normalize_email(email)
        except InvalidInputError:
            email = ""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(users).where(users.c.email == email)).first()
        stored = row.password_hash if row is not None else self._dummy_hash
        try:
            self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            raise AuthenticationError("invalid email or password") from None
        if row is None:
            raise AuthenticationError("invalid email or password")
        if row.disabled_at is not None:  # said only to whoever knows the password
            raise AuthenticationError("this account is disabled")
        if self.hasher.check_needs_rehash(stored):
            with self.engine.begin() as conn:
                conn.execute(
                    users.update()
                    .where(users.c.id == row.id)
                    .values(password_hash=self.hasher.hash(password))
                )
        return _user(row)

    # -- memberships -------------------------------------------------------------------------

    def set_membership(
        self, user_id: str, tenant_id: str, role: Role, *, seats: int | None
    ) -> tuple[Membership, Role | None]:
        """Add a user to a tenant, or change their role there; returns the membership and
        the previous role (None if new). A new member beyond ``seats`` is refused."""
        self.get_user(user_id)
        now = self.clock()
        with self.engine.begin() as conn:
            # Lock the tenant's row: seat counting and the insert happen one at a time.
            locked = sa.select(tenants.c.uid).where(tenants.c.id == tenant_id)
            if conn.dialect.name == "postgresql":
                locked = locked.with_for_update()
            tenant = conn.execute(locked).first()
            if tenant is None:
                raise TenantNotFoundError()
            existing = conn.execute(
                sa.select(memberships.c.role).where(
                    memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id
                )
            ).first()
            if existing is not None:
                conn.execute(
                    memberships.update()
                    .where(memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id)
                    .values(role=role.value)
                )
                previous: Role | None = Role(existing.role)
            else:
                taken = conn.execute(
                    sa.select(sa.func.count()).where(memberships.c.tenant_id == tenant_id)
                ).scalar_one()
                if seats is not None and taken >= seats:
                    raise SeatLimitError(f"the tenant's plan has {seats} seats, all taken")
                grant = uuid.uuid4().hex
                conn.execute(
                    memberships.insert().values(
                        user_id=user_id,
                        tenant_id=tenant_id,
                        tenant_uid=tenant.uid,
                        role=role.value,
                        created_at=now,
                        grant_id=grant,
                    )
                )
                conn.execute(  # a pending invitation is answered by the membership
                    invitations.delete().where(
                        invitations.c.tenant_id == tenant_id, invitations.c.user_id == user_id
                    )
                )
                previous = None
            row = conn.execute(
                sa.select(memberships).where(
                    memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id
                )
            ).one()
        return _membership(row), previous

    # -- invitations -------------------------------------------------------------------------

    def invite(self, tenant_id: str, user_id: str, role: Role, *, invited_by: str) -> Invitation:
        """Offer ``role`` in the tenant to an existing user (a second invitation replaces the
        first). Someone already a member is a ``ConflictError``."""
        self.get_user(user_id)
        now = self.clock()
        made = Invitation(
            id=secrets.token_hex(8),
            tenant_id=tenant_id,
            user_id=user_id,
            role=role,
            invited_by=invited_by,
            created_at=now,
            expires_at=now + INVITATION_SECONDS,
        )
        with self.engine.begin() as conn:
            tenant = conn.execute(sa.select(tenants.c.uid).where(tenants.c.id == tenant_id)).first()
            if tenant is None:
                raise TenantNotFoundError()
            if self._is_member(conn, user_id, tenant_id):
                raise ConflictError("the user is a member of the tenant already")
            conn.execute(
                invitations.delete().where(
                    invitations.c.tenant_id == tenant_id, invitations.c.user_id == user_id
                )
            )
            conn.execute(
                invitations.insert().values(
                    id=made.id,
                    tenant_id=tenant_id,
                    tenant_uid=tenant.uid,
                    user_id=user_id,
                    role=role.value,
                    invited_by=invited_by,
                    created_at=now,
                    expires_at=made.expires_at,
                )
            )
        return made

    def invitations(
        self, *, tenant_id: str | None = None, user_id: str | None = None
    ) -> list[Invitation]:
        """The pending invitations of a tenant or of a user (not expired, and of the tenant
        as it is now: one made before an offboarding is no invitation to its successor)."""
        query = (
            sa.select(invitations)
            .join(
                tenants,
                sa.and_(
                    tenants.c.id == invitations.c.tenant_id,
                    tenants.c.uid == invitations.c.tenant_uid,
                ),
            )
            .where(invitations.c.expires_at > self.clock())
            .order_by(invitations.c.created_at)
        )
        if tenant_id is not None:
            query = query.where(invitations.c.tenant_id == tenant_id)
        if user_id is not None:
            query = query.where(invitations.c.user_id == user_id)
        with self.engine.connect() as conn:
            return [_invitation(r) for r in conn.execute(query).all()]

    def invitation(self, invitation_id: str, *, user_id: str | None = None) -> Invitation:
        """A pending invitation (``user_id``: only if it is to that user; another's is a
        ``NotFoundError``, as a missing one)."""
        for found in self.invitations(user_id=user_id):
            if found.id == invitation_id:
                return found
        raise NotFoundError("no such invitation")

    def drop_invitation(self, invitation_id: str, *, tenant_id: str | None = None) -> None:
        """Withdraw (``tenant_id``: only from that tenant) or decline an invitation."""
        query = invitations.delete().where(invitations.c.id == invitation_id)
        if tenant_id is not None:
            query = query.where(invitations.c.tenant_id == tenant_id)
        with self.engine.begin() as conn:
            if conn.execute(query).rowcount == 0:
                raise NotFoundError("no such invitation")

    @staticmethod
    def _is_member(conn: sa.Connection, user_id: str, tenant_id: str) -> bool:
        found = conn.execute(
            sa.select(memberships.c.user_id).where(
                memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id
            )
        ).first()
        return found is not None

    def remove_membership(self, user_id: str, tenant_id: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(
                memberships.delete().where(
                    memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id
                )
            )
        if done.rowcount == 0:
            raise NotFoundError("no such membership")

    def membership(self, user_id: str, tenant_id: str) -> Membership | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(memberships).where(
                    memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id
                )
            ).first()
        return None if row is None else _membership(row)

    def memberships(
        self, *, tenant_id: str | None = None, user_id: str | None = None
    ) -> list[Membership]:
        query = sa.select(memberships).order_by(memberships.c.tenant_id, memberships.c.user_id)
        if tenant_id is not None:
            query = query.where(memberships.c.tenant_id == tenant_id)
        if user_id is not None:
            query = query.where(memberships.c.user_id == user_id)
        with self.engine.connect() as conn:
            return [_membership(r) for r in conn.execute(query).all()]


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidInputError(f"a password has at least {MIN_PASSWORD} characters")


def _membership(row: Any) -> Membership:
    return Membership(
        user_id=row.user_id,
        tenant_id=row.tenant_id,
        role=Role(row.role),
        created_at=row.created_at,
        tenant_uid=row.tenant_uid,
        grant_id=row.grant_id,
    )


def _invitation(row: Any) -> Invitation:
    return Invitation(
        id=row.id,
        tenant_id=row.tenant_id,
        user_id=row.user_id,
        role=Role(row.role),
        invited_by=row.invited_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )
