"""Access as the platform stands now, checked on every request: a verified token is only as
good as the grant behind it.

A token names its grant: the user's generation (``ugen``: a new password or a disabled
account moves it on), the membership's grant id (``gid``: a membership removed and made again
is another grant), the API key (its ``sub``), the tenant's identity and access generation
(``tuid``, ``tgen``: an offboarding or a suspension). The API checks them against the
platform database's rows, which each process caches briefly; the role used is the one held
now, not the one in the token.

A change (``Change``) drops the cached rows it touches in this process at once, and in every
other process through the coordination backend's pub/sub (``ACCESS_CHANGES``; on Redis
``<prefix>:access-changes``). A Redis subscription proves itself live by a PING on it every
``coordination.base.PING_SECONDS``: a PONG comes after every message published before its PING.
While the proof is younger than ``STALE_SECONDS`` cached rows are used for up to
``access_cache_seconds``; otherwise (no Redis, the embedded default; Redis away) rows older than
``STALE_SECONDS`` are read again. Either way a change takes effect everywhere within about
``STALE_SECONDS`` plus a read.

With the platform database away the last rows read keep serving (the tenant plane outlives a
platform outage), and a read again that does not answer within ``REREAD_WAIT_SECONDS`` holds up
no request; a process that has none admits a verified token by its claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
import structlog

from tenantflow.errors import (
    InvalidSignatureError,
    PermissionDeniedError,
    TenantNotFoundError,
    TenantSuspendedError,
)
from tenantflow.platform.identity import Role
from tenantflow.platform.schema import api_keys, memberships, signing_keys, tenants, users

if TYPE_CHECKING:
    from tenantflow.coordination import Coordination, Subscription

log = structlog.get_logger(__name__)

STALE_SECONDS = 0.5
RECONNECT_SECONDS = 0.5
REREAD_WAIT_SECONDS = 0.1
CLOSE_SECONDS = 2.0  # a Redis that does not answer does not hold up a shutdown
WARN_EVERY_SECONDS = 10.0

ChangeKind = Literal["user", "key", "tenant", "keys"]


@dataclass(frozen=True)
class Change:
    """What changed: a user's access (``id`` the user), an API key, a tenant (its status,
    its members' roles, its removal), or the signing keys (``id`` empty)."""

    kind: ChangeKind
    id: str = ""

    def encode(self) -> str:
        return json.dumps({"kind": self.kind, "id": self.id})

    @staticmethod
    def decode(data: bytes | str) -> Change | None:
        try:
            raw = json.loads(data)
            kind, ident = raw["kind"], raw["id"]
        except (ValueError, KeyError, TypeError):
            return None
        if kind not in ("user", "key", "tenant", "keys") or not isinstance(ident, str):
            return None
        return Change(kind, ident)


@dataclass(frozen=True, kw_only=True)
class Standing:
    """What the platform database says now of a token's subject in its tenant."""

    found: bool  # the user, or the API key unrevoked
    generation: int = 0  # the user's
    platform_admin: bool = False
    grant: str | None = None  # the membership's grant id; a key's tenant identity
    role: Role | None = None  # held now in the tenant
    tenant_uid: str | None = None  # None: no such tenant (or the token names none)
    tenant_active: bool = False
    tenant_generation: int = 0


def read_standing(engine: sa.Engine, subject: str, tenant_id: str | None) -> Standing:
    """One read of the rows behind a token (on the platform database, in a thread)."""
    with engine.connect() as conn:
        tenant = None
        if tenant_id is not None:
            tenant = conn.execute(
                sa.select(tenants.c.uid, tenants.c.status, tenants.c.access_generation).where(
                    tenants.c.id == tenant_id
                )
            ).first()
        place: dict[str, Any] = {}
        if tenant is not None:
            place = {
                "tenant_uid": tenant.uid,
                "tenant_active": tenant.status == "active",
                "tenant_generation": tenant.access_generation,
            }
        if subject.startswith("key:"):
            key = conn.execute(
                sa.select(api_keys.c.tenant_id, api_keys.c.tenant_uid, api_keys.c.role).where(
                    api_keys.c.id == subject[4:],
                    api_keys.c.revoked_at.is_(None),
                )
            ).first()
            if key is None or key.tenant_id != tenant_id:
                return Standing(found=False, **place)
            return Standing(found=True, grant=key.tenant_uid, role=Role(key.role), **place)
        user = conn.execute(
            sa.select(users.c.generation, users.c.is_platform_admin).where(
                users.c.id == subject, users.c.disabled_at.is_(None)
            )
        ).first()
        if user is None:
            return Standing(found=False, **place)
        grant = role = None
        if tenant_id is not None:
            membership = conn.execute(
                sa.select(memberships.c.grant_id, memberships.c.role).where(
                    memberships.c.user_id == subject, memberships.c.tenant_id == tenant_id
                )
            ).first()
            if membership is not None:
                grant, role = membership.grant_id, Role(membership.role)
        return Standing(
            found=True,
            generation=user.generation,
            platform_admin=bool(user.is_platform_admin),
            grant=grant,
            role=role,
            **place,
        )


def read_revoked_keys(engine: sa.Engine) -> frozenset[str]:
    """The signing keys whose access tokens were revoked with them (``rotate(revoke=True)``)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(signing_keys.c.kid).where(signing_keys.c.tokens_revoked.is_(True))
        ).all()
    return frozenset(r.kid for r in rows)


REVOKED = "the token was revoked"


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who a verified access token speaks for, and what it may do now. ``tenant_id`` comes
    only from the token; the role is the one held now."""

    subject: str  # a user id, or key:<id>
    tenant_id: str | None
    role: Role | None
    platform_admin: bool

    def require(self, role: Role) -> None:
        if self.role is None or not self.role.allows(role):
            raise PermissionDeniedError(f"this needs the {role.value} role")


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """The principal a token's claims describe (what it was granted when minted)."""
    role = claims.get("role")
    return Principal(
        subject=str(claims["sub"]),
        tenant_id=claims.get("tid"),
        role=Role(role) if role else None,
        platform_admin=bool(claims.get("adm", False)),
    )


def admit(claims: dict[str, Any], standing: Standing) -> Principal:
    """The token's access as ``standing`` allows it, or why not (``InvalidSignatureError``,
    ``TenantSuspendedError``)."""
    subject = str(claims["sub"])
    tenant_id = claims.get("tid")
    if tenant_id is not None:
        uid = claims.get("tuid")
        if (
            standing.tenant_uid is None
            or not isinstance(uid, str)
            or not hmac.compare_digest(uid, standing.tenant_uid)
        ):
            raise InvalidSignatureError("the token's tenant no longer exists")
        if not standing.tenant_active:
            raise TenantSuspendedError(f"tenant {tenant_id!r} is suspended")
        if claims.get("tgen") != standing.tenant_generation:
            raise InvalidSignatureError(REVOKED)
    if not standing.found:
        raise InvalidSignatureError(REVOKED)
    if subject.startswith("key:"):
        if standing.grant != claims.get("tuid"):
            raise InvalidSignatureError(REVOKED)
        return Principal(
            subject=subject, tenant_id=tenant_id, role=standing.role, platform_admin=False
        )
    if claims.get("ugen") != standing.generation:
        raise InvalidSignatureError(REVOKED)
    if tenant_id is not None:
        if standing.grant is None or claims.get("gid") != standing.grant:
            raise InvalidSignatureError(REVOKED)
        return Principal(
            subject=subject, tenant_id=tenant_id, role=standing.role, platform_admin=False
        )
    admin = bool(claims.get("adm", False))
    if admin and not standing.platform_admin:
        raise InvalidSignatureError(REVOKED)
    return Principal(subject=subject, tenant_id=None, role=None, platform_admin=admin)


@dataclass
class _Entry:
    value: Any  # a Standing; for REVOKED_KEYS, the kids whose tokens were revoked
    at: float  # monotonic: when its read began


Key = tuple[str, str | None]  # (subject, tenant)
REVOKED_KEYS: Key = ("*revoked-signing-keys*", None)  # no token's subject


class AccessGuard:
    """The per-process cache of standings, kept current by changes (see the module)."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        cache_seconds: float,
        tenant_uid: Callable[[str], Awaitable[str]],
        coordination: Coordination | None = None,
        keys_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """``tenant_uid``: a tenant's identity as last known (from the tenant router's
        cache), for a token admitted by its claims while the platform is away.
        ``coordination``: where other processes' changes arrive (``ACCESS_CHANGES``)."""
        self.engine = engine
        self.tenant_uid = tenant_uid
        self.cache_seconds = cache_seconds
        self.coordination = coordination
        self.keys_changed = keys_changed  # the signing keys rotated: fetch them again
        self._entries: dict[Key, _Entry] = {}
        self._loading: dict[Key, asyncio.Future[Any]] = {}
        self._epoch = 0  # moved on by every change: a read begun before one is not kept
        self._lock = threading.Lock()  # changes arrive from platform calls' threads too
        self._subscription: Subscription | None = None  # while subscribed
        self._listener: asyncio.Task[None] | None = None
        self._warned = -math.inf

    # -- changes -----------------------------------------------------------------------------

    def changed(self, change: Change) -> None:
        """Drop what ``change`` touches (from any thread)."""
        with self._lock:
            self._epoch += 1
            if change.kind == "keys":
                self._entries.pop(REVOKED_KEYS, None)
                self.keys_changed()
                return
            for key in list(self._entries):
                subject, tenant_id = key
                if (
                    (change.kind == "user" and subject == change.id)
                    or (change.kind == "key" and subject == f"key:{change.id}")
                    or (change.kind == "tenant" and tenant_id == change.id)
                ):
                    self._entries.pop(key, None)

    def _forget_all(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self.keys_changed()  # a rotation may be among what was missed

    def start(self) -> None:
        """Listen for other processes' changes (idempotent)."""
        if self.coordination is None:
            return
        if self._listener is None or self._listener.done():
            # A fresh context: the listener serves the process, not the request that started it.
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), context=contextvars.Context()
            )

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._listener, CLOSE_SECONDS)
            self._listener = None

    @property
    def proven(self) -> bool:
        """Whether every change published more than ``STALE_SECONDS`` ago has arrived."""
        proven = -math.inf if self._subscription is None else self._subscription.proven
        return time.monotonic() - proven <= STALE_SECONDS

    async def _listen(self) -> None:
        from tenantflow.coordination import ACCESS_CHANGES

        assert self.coordination is not None
        while True:
            try:
                async with self.coordination.subscribe(ACCESS_CHANGES) as subscription:
                    # A (re)subscription to other processes' changes: what was published while
                    # unsubscribed never arrives. (In-process, nothing can be missed, and the
                    # grants last read must stay, to serve through a platform outage.)
                    if self.coordination.shared:
                        self._forget_all()
                    self._subscription = subscription
                    async for message in subscription:
                        change = Change.decode(message)
                        if change is not None:
                            self.changed(change)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn("access changes unreachable; re-reading grants", exc)
                await asyncio.sleep(RECONNECT_SECONDS)
            finally:
                self._subscription = None

    # -- the check ---------------------------------------------------------------------------

    def _fresh(self, entry: _Entry, now: float) -> bool:
        age = now - entry.at
        return age <= STALE_SECONDS or (self.proven and age <= self.cache_seconds)

    async def admit(self, claims: dict[str, Any], kid: str | None) -> Principal:
        """``admit`` against the current standing of the token's subject."""
        if self._listener is None:
            self.start()
        if kid is not None:
            revoked = await self._current(REVOKED_KEYS, lambda: read_revoked_keys(self.engine))
            if revoked is not None and kid in revoked:
                raise InvalidSignatureError(REVOKED)
        subject, tenant_id = str(claims["sub"]), claims.get("tid")
        key = (subject, None if tenant_id is None else str(tenant_id))
        standing = await self._current(key, lambda: read_standing(self.engine, *key))
        if standing is None:  # never read, and the platform is away: by the claims
            return await self._offline(claims)
        return admit(claims, standing)

    async def _current(self, key: Key, read: Callable[[], Any]) -> Any:
        """The cached value of ``key`` while fresh; else read again (one read per key at a
        time, in a thread). With a value already held, a read that takes longer than
        ``REREAD_WAIT_SECONDS`` (the platform slow or away) leaves the request to the value
        held, and goes on for the next ones. None: never read, and unreadable."""
        entry = self._entries.get(key)
        if entry is not None and self._fresh(entry, time.monotonic()):
            return entry.value
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._read(key, read, entry))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        try:
            if entry is None:
                return await asyncio.shield(loading)
            return await asyncio.wait_for(asyncio.shield(loading), REREAD_WAIT_SECONDS)
        except TimeoutError:
            return entry.value if entry is not None else None
        except _Unreadable:
            return None

    async def _read(self, key: Key, read: Callable[[], Any], entry: _Entry | None) -> Any:
        began, epoch = time.monotonic(), self._epoch
        try:
            value = await asyncio.to_thread(read)
        except Exception as exc:
            self._warn("platform unreachable; using the grants last read", exc)
            if entry is None:
                raise _Unreadable() from exc
            # Kept, and read again after STALE_SECONDS rather than on every request.
            value, began = entry.value, time.monotonic()
        with self._lock:
            if epoch == self._epoch:
                self._entries[key] = _Entry(value, began)
        return value

    async def _offline(self, claims: dict[str, Any]) -> Principal:
        """A token's claims, with its tenant's identity checked against the last known."""
        principal = principal_from_claims(claims)
        if principal.tenant_id is not None:
            uid = claims.get("tuid")
            try:
                known = await self.tenant_uid(principal.tenant_id)
            except TenantNotFoundError:
                raise InvalidSignatureError("the token's tenant no longer exists") from None
            if not isinstance(uid, str) or not hmac.compare_digest(uid, known):
                raise InvalidSignatureError("the token's tenant no longer exists")
        return principal

    def _warn(self, event: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_SECONDS:
            self._warned = now
            log.warning(event, error=type(exc).__name__)


class _Unreadable(Exception):
    """No standing was ever read, and the platform database does not answer."""


Announce = Callable[[Change], None]
