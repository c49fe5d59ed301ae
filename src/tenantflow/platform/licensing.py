"""Plans and licenses.

A plan lists entitlements (workflow names or feature codes; ``*`` for all) and quotas (runs
per month, concurrent runs, seats, requests per second; None is unlimited), and its tenants'
dispatch weight: their share of the workers when several tenants have work waiting (1 by
default; weight 3 takes three messages to another tenant's one). A tenant on a plan holds a
license: a JWS signed by the platform (Ed25519), with a time to live. The tenant plane
verifies it offline against the JWKS and caches it, so it keeps working through a platform
outage until the cached license expires. A tenant with no plan is not licensed and not limited
(the embedded default needs no platform set-up).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from tenantflow.errors import (
    ConflictError,
    InvalidInputError,
    InvalidSignatureError,
    Issue,
    NotFoundError,
)
from tenantflow.platform.keys import SigningKeys, verify
from tenantflow.platform.schema import licenses, plans, tenants

LICENSE_TYP = "tenantflow-license+jwt"
RENEW_FRACTION = 0.5  # a license past half its life is renewed when fetched
# Beyond this one tenant would all but starve the others of the workers.
MAX_DISPATCH_WEIGHT = 100
MAX_QUOTA = 2**31 - 1  # the platform database's integer columns


@dataclass(frozen=True, kw_only=True)
class Quotas:
    runs_per_month: int | None = None
    concurrent_runs: int | None = None
    seats: int | None = None
    requests_per_second: float | None = None
    # The tenant's share of the workers against other tenants with work waiting (weighted
    # round robin of the queue's dispatch); not a limit, so never None.
    dispatch_weight: int = 1

    @staticmethod
    def from_mapping(values: Mapping[str, Any]) -> Quotas:
        """The quotas a row or a license's claims hold; one that lacks a quota (a license
        signed before it existed) has its default."""
        return Quotas(
            **{
                name: values[name]
                for name in QUOTA_NAMES
                if name in values and values[name] is not None
            }
        )

    def check(self) -> None:
        """Raise ``InvalidInputError`` on a quota that means nothing or that the plan's columns
        cannot hold: a count out of its bounds, a rate that is not a positive finite number,
        a dispatch weight out of bounds (``POST /platform/v1/plans`` checks the same)."""
        issues = [
            Issue(f"quotas.{name}", f"a whole number from {least} to {MAX_QUOTA}")
            for name, least in _LEAST.items()
            if getattr(self, name) is not None and not _whole(getattr(self, name), least, MAX_QUOTA)
        ]
        rate = self.requests_per_second
        if rate is not None and not (
            isinstance(rate, int | float)
            and not isinstance(rate, bool)
            and math.isfinite(rate)
            and rate > 0
        ):
            issues.append(Issue("quotas.requests_per_second", "a positive, finite number"))
        weight = self.dispatch_weight
        if not _whole(weight, 1, MAX_DISPATCH_WEIGHT):
            bounds = f"a whole number from 1 to {MAX_DISPATCH_WEIGHT}"
            issues.append(Issue("quotas.dispatch_weight", bounds))
            raise InvalidInputError(
                f"a plan's dispatch weight is {bounds}, not {weight!r}", issues=issues
            )
        if issues:
            raise InvalidInputError(issues=issues)


def _whole(value: Any, least: int, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


# The least value of each count of a plan (the platform database's integer columns hold the
# greatest, MAX_QUOTA).
_LEAST = {"runs_per_month": 0, "concurrent_runs": 1, "seats": 0}


QUOTA_NAMES = tuple(f.name for f in dataclasses.fields(Quotas))


@dataclass(frozen=True, kw_only=True)
class Plan:
    id: str
    name: str
    entitlements: tuple[str, ...]
    quotas: Quotas
    created_at: float


@dataclass(frozen=True, kw_only=True)
class License:
    id: str
    tenant_id: str
    plan_id: str
    document: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True, kw_only=True)
class LicenseClaims:
    """What a verified license says."""

    license_id: str
    tenant_id: str
    plan_id: str
    entitlements: tuple[str, ...]
    quotas: Quotas
    issued_at: float
    expires_at: float
    tenant_uid: str | None = None  # the identity of the tenant it was issued to

    def entitles(self, code: str) -> bool:
        return "*" in self.entitlements or code in self.entitlements

    @staticmethod
    def from_claims(claims: Mapping[str, Any]) -> LicenseClaims:
        return LicenseClaims(
            license_id=str(claims["jti"]),
            tenant_id=str(claims["tid"]),
            plan_id=str(claims["plan"]),
            entitlements=tuple(claims.get("entitlements") or ()),
            quotas=Quotas.from_mapping(claims.get("quotas") or {}),
            issued_at=float(claims["iat"]),
            expires_at=float(claims["exp"]),
            tenant_uid=str(claims["tuid"]) if "tuid" in claims else None,
        )


def verify_license(
    document: str, keys: Mapping[str, Any], *, tenant_id: str, now: float | None = None
) -> LicenseClaims:
    claims = LicenseClaims.from_claims(verify(document, keys, typ=LICENSE_TYP, now=now))
    if claims.tenant_id != tenant_id:
        raise InvalidSignatureError("the license is another tenant's")
    return claims


def _plan(row: Any) -> Plan:
    return Plan(
        id=row.id,
        name=row.name,
        entitlements=tuple(row.entitlements),
        quotas=Quotas.from_mapping(row._mapping),
        created_at=row.created_at,
    )


def _license(row: Any) -> License:
    return License(
        id=row.id,
        tenant_id=row.tenant_id,
        plan_id=row.plan_id,
        document=row.document,
        issued_at=row.issued_at,
        expires_at=row.expires_at,
    )


class Licensing:
    def __init__(
        self,
        engine: sa.Engine,
        keys: SigningKeys,
        *,
        ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.ttl = ttl
        self.clock = clock

    # -- plans -------------------------------------------------------------------------------

    def create_plan(
        self, plan_id: str, *, name: str, entitlements: Sequence[str], quotas: Quotas
    ) -> Plan:
        quotas.check()
        plan = Plan(
            id=plan_id,
            name=name,
            entitlements=tuple(entitlements),
            quotas=quotas,
            created_at=self.clock(),
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    plans.insert().values(
                        id=plan.id,
                        name=plan.name,
                        entitlements=list(plan.entitlements),
                        **dataclasses.asdict(quotas),
                        created_at=plan.created_at,
                    )
                )
        except sa.exc.IntegrityError:
            raise ConflictError(f"a plan {plan_id!r} exists") from None
        return plan

    def get_plan(self, plan_id: str) -> Plan:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(plans).where(plans.c.id == plan_id)).first()
        if row is None:
            raise NotFoundError(f"no plan {plan_id!r}")
        return _plan(row)

    def list_plans(self) -> list[Plan]:
        with self.engine.connect() as conn:
            return [_plan(r) for r in conn.execute(sa.select(plans).order_by(plans.c.id)).all()]

    # -- licenses ----------------------------------------------------------------------------

    def issue(self, tenant_id: str) -> License:
        """Sign a license for the tenant's current plan."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(tenants.c.plan_id, tenants.c.uid).where(tenants.c.id == tenant_id)
            ).first()
        if row is None:
            raise NotFoundError(f"no tenant {tenant_id!r}")
        if row.plan_id is None:
            raise ConflictError("the tenant has no plan to license")
        plan = self.get_plan(row.plan_id)
        now = self.clock()
        license_id = str(uuid.uuid4())
        document = self.keys.sign(
            {
                "jti": license_id,
                "tid": tenant_id,
                "tuid": row.uid,
                "plan": plan.id,
                "entitlements": list(plan.entitlements),
                "quotas": dataclasses.asdict(plan.quotas),
                "iat": int(now),
                "exp": int(now + self.ttl),
            },
            typ=LICENSE_TYP,
        )
        issued = License(
            id=license_id,
            tenant_id=tenant_id,
            plan_id=plan.id,
            document=document,
            issued_at=now,
            expires_at=float(int(now + self.ttl)),
        )
        with self.engine.begin() as conn:
            conn.execute(
                licenses.insert().values(
                    id=issued.id,
                    tenant_id=tenant_id,
                    plan_id=plan.id,
                    document=document,
                    issued_at=issued.issued_at,
                    expires_at=issued.expires_at,
                )
            )
        return issued

    def current(self, tenant_id: str, *, renew: bool = False) -> License | None:
        """The tenant's newest license; with ``renew``, a fresh one if it is past half its
        life or missing (and the tenant has a plan)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(licenses)
                .where(licenses.c.tenant_id == tenant_id)
                .order_by(licenses.c.issued_at.desc())
            ).first()
            plan_row = conn.execute(
                sa.select(tenants.c.plan_id).where(tenants.c.id == tenant_id)
            ).first()
        latest = None if row is None else _license(row)
        if not renew:
            return latest
        if plan_row is None or plan_row.plan_id is None:
            return None  # not on a plan: not licensed, not limited
        now = self.clock()
        if (
            latest is None
            or latest.plan_id != plan_row.plan_id
            or now > latest.issued_at + (latest.expires_at - latest.issued_at) * RENEW_FRACTION
        ):
            return self.issue(tenant_id)
        return latest

    def history(self, tenant_id: str) -> list[License]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(licenses)
                .where(licenses.c.tenant_id == tenant_id)
                .order_by(licenses.c.issued_at.desc())
            ).all()
        return [_license(r) for r in rows]
