"""The audit log: who did what, when, per tenant, in the platform database.

Entries name actors and targets by id (a user id, ``key:<id>`` for an API key, ``system``)
and carry small details; never a secret, never a run's payload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from tenantflow.platform.schema import audit_log


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    id: int
    tenant_id: str | None
    actor: str
    action: str
    target: str | None
    details: dict[str, Any] = field(default_factory=dict)
    at: float


class AuditLog:
    def __init__(self, engine: sa.Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock

    def record(
        self,
        action: str,
        *,
        actor: str,
        tenant_id: str | None,
        target: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                audit_log.insert().values(
                    tenant_id=tenant_id,
                    actor=actor,
                    action=action,
                    target=target,
                    details=dict(details or {}),
                    at=self.clock(),
                )
            )

    def query(
        self,
        *,
        tenant_id: str | None,
        action: str | None = None,
        after: int | None = None,
        limit: int = 100,
        platform_wide: bool = False,
    ) -> list[AuditEntry]:
        """A tenant's entries (or, with ``platform_wide``, every entry), oldest first, after
        the entry id ``after`` (the cursor)."""
        query = sa.select(audit_log).order_by(audit_log.c.id).limit(limit)
        if not platform_wide:
            query = query.where(audit_log.c.tenant_id == tenant_id)
        if action is not None:
            query = query.where(audit_log.c.action == action)
        if after is not None:
            query = query.where(audit_log.c.id > after)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            AuditEntry(
                id=r.id,
                tenant_id=r.tenant_id,
                actor=r.actor,
                action=r.action,
                target=r.target,
                details=dict(r.details or {}),
                at=r.at,
            )
            for r in rows
        ]
