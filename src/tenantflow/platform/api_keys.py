"""API keys: a tenant's credentials for programs, each with a role in that tenant.

A key is ``tfk_<id>_<secret>``: the id is public and names the key; the secret (256 random
bits) is shown once and stored as a SHA-256 hash, which is enough for a secret that cannot be
guessed (argon2 protects low-entropy passwords).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from tenantflow.errors import AuthenticationError, NotFoundError, TenantNotFoundError
from tenantflow.platform.identity import Role
from tenantflow.platform.schema import api_keys, tenants

API_KEY = re.compile(r"tfk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    id: str
    tenant_id: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None
    tenant_uid: str | None = None  # the identity of the tenant it was made in


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        tenant_uid=row.tenant_uid,
    )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    def __init__(self, engine: sa.Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def create(self, tenant_id: str, name: str, role: Role) -> tuple[ApiKey, str]:
        """A new key and its full secret, which is shown this once and never stored."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(
            id=key_id,
            tenant_id=tenant_id,
            name=name,
            role=role,
            created_at=self.clock(),
            revoked_at=None,
        )
        with self.engine.begin() as conn:
            tenant = conn.execute(sa.select(tenants.c.uid).where(tenants.c.id == tenant_id)).first()
            if tenant is None:
                raise TenantNotFoundError()
            key = dataclasses.replace(key, tenant_uid=tenant.uid)
            conn.execute(
                api_keys.insert().values(
                    id=key_id,
                    tenant_id=tenant_id,
                    tenant_uid=tenant.uid,
                    name=name,
                    role=role.value,
                    secret_hash=_digest(secret),
                    created_at=key.created_at,
                )
            )
        return key, f"tfk_{key_id}_{secret}"

    def of_tenant(self, tenant_id: str) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(api_keys)
                .where(api_keys.c.tenant_id == tenant_id)
                .order_by(api_keys.c.created_at)
            ).all()
        return [_key(r) for r in rows]

    def revoke(self, tenant_id: str, key_id: str) -> ApiKey:
        with self.engine.begin() as conn:
            conn.execute(
                api_keys.update()
                .where(
                    api_keys.c.id == key_id,
                    api_keys.c.tenant_id == tenant_id,
                    api_keys.c.revoked_at.is_(None),
                )
                .values(revoked_at=self.clock())
            )
            row = conn.execute(
                sa.select(api_keys).where(
                    api_keys.c.id == key_id, api_keys.c.tenant_id == tenant_id
                )
            ).first()
        if row is None:
            raise NotFoundError("no such API key")
        return _key(row)

    def authenticate(self, presented: str) -> ApiKey:
        match = API_KEY.fullmatch(presented.strip())
        if match is None:
            raise AuthenticationError("invalid API key")
        key_id, secret = match.groups()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
            raise AuthenticationError("invalid API key")
        if row.revoked_at is not None:
            raise AuthenticationError("this API key was revoked")
        return _key(row)
