"""Request and response bodies of the HTTP API (separate input and output models)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tenantflow.platform.api_keys import ApiKey
from tenantflow.platform.audit import AuditEntry
from tenantflow.platform.identity import Invitation, Role, User
from tenantflow.platform.licensing import MAX_DISPATCH_WEIGHT, MAX_QUOTA, Plan, Quotas
from tenantflow.platform.registry import TENANT_ID, Tenant
from tenantflow.queue.base import DeadLetter
from tenantflow.sdk.options import MAX_PRIORITY, MIN_PRIORITY
from tenantflow.serde import loads, whole
from tenantflow.store.records import RunRecord, StepRecord

# No control characters in anything used as a key, compared in a query or stored as text
# (PostgreSQL refuses NUL in text): such input is malformed, a 422 on every backend alike.
PLAIN = r"^[^\x00-\x1f\x7f]*$"
PlainText = Annotated[str, Field(pattern=PLAIN)]
TENANT_ID_PATTERN = f"^{TENANT_ID.pattern}$"
# Python's whitespace (``str.isspace``) spelled out, so that the pattern means in the document
# what it means to the server, which strips it from an email before checking the rest.
_SPACE = r"\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_EMAIL_PART = rf"[^@{_SPACE}\x00-\x1f\x7f]"
EMAIL_PATTERN = rf"^[{_SPACE}]*{_EMAIL_PART}{{1,64}}@{_EMAIL_PART}{{1,255}}[{_SPACE}]*$"

INT32_MAX = MAX_QUOTA  # the platform database's integer columns
# Numbers and flags of a body are taken strictly, as the document's JSON Schema says: "yes" is
# not a boolean, true is not a number (Pydantic's lax mode would take both); 900.0 is 900.
# The bounds go before the validator, so that the document shows them.
Priority = Annotated[
    int, Field(strict=True, ge=MIN_PRIORITY, le=MAX_PRIORITY), BeforeValidator(whole)
]
Count = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX), BeforeValidator(whole)]
Positive = Annotated[int, Field(strict=True, ge=1, le=INT32_MAX), BeforeValidator(whole)]
DispatchWeight = Annotated[
    int, Field(strict=True, ge=1, le=MAX_DISPATCH_WEIGHT), BeforeValidator(whole)
]


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workflow: str = Field(min_length=1, max_length=255)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = 0


class StepOut(BaseModel):
    seq: int
    name: str
    kind: str
    status: str
    attempts: int
    started_at: float
    finished_at: float | None
    output: Any = None
    error: dict[str, Any] | None = None

    @staticmethod
    def of(step: StepRecord) -> StepOut:
        return StepOut(
            seq=step.seq,
            name=step.name,
            kind=step.kind.value,
            status=step.status.value,
            attempts=step.attempts,
            started_at=step.started_at,
            finished_at=step.finished_at,
            output=loads(step.output),
            error=step.error_info,
        )


class RunOut(BaseModel):
    id: str
    workflow: str
    status: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    idempotency_key: str | None
    parent_id: str | None
    recoveries: int
    cancel_requested: bool
    stuck_reason: str | None = Field(
        default=None,
        description="Why no worker can take this queued run (its workflow is in no worker's "
        "app); cleared when one claims it.",
    )
    result: Any = None
    error: dict[str, Any] | None = None
    steps: list[StepOut] | None = None

    @staticmethod
    def of(run: RunRecord, steps: list[StepRecord] | None = None) -> RunOut:
        return RunOut(
            id=run.id,
            workflow=run.workflow,
            status=run.status.value,
            created_at=run.created_at,
            updated_at=run.updated_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            idempotency_key=run.idempotency_key,
            parent_id=run.parent_id,
            recoveries=run.recoveries,
            cancel_requested=run.cancel_requested,
            stuck_reason=run.stuck_reason,
            result=loads(run.result),
            error=run.error_info,
            steps=None if steps is None else [StepOut.of(s) for s in steps],
        )


class RunPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None


class WorkflowOut(BaseModel):
    name: str
    parameters: list[str]
    input_schema: dict[str, Any] = Field(
        description='JSON Schema of the run\'s input, ``{"args": [...], "kwargs": {...}}`` '
        "as in ``POST /v1/runs``, from the workflow's signature and type hints."
    )
    output_schema: dict[str, Any] = Field(description="JSON Schema of the run's result.")


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    checks: dict[str, str] = Field(description="Each check: ``ok``, or what is wrong.")
    progress: dict[str, int] | None = Field(
        default=None,
        description="The stuck-run detector's counts (when ready), from the latest background "
        "survey; absent until the first one has finished.",
    )
    progress_age_seconds: float | None = Field(
        default=None, description="How long ago the survey behind ``progress`` started."
    )


class BreakerOut(BaseModel):
    name: str
    state: str
    calls: int
    failure_rate: float | None
    slow_call_rate: float | None
    retry_after: float


class DeadLetterOut(BaseModel):
    id: str
    run_id: str
    deliveries: int
    failed_at: float
    reason: str | None = Field(
        description="Why it was dead-lettered; null for one stored before reasons were kept."
    )
    parked: bool = Field(
        description="Its run waits for a replay; otherwise the reconciler has enqueued the run "
        "again if it still needed a message."
    )

    @staticmethod
    def of(letter: DeadLetter) -> DeadLetterOut:
        return DeadLetterOut(
            id=letter.id,
            run_id=letter.run_id,
            deliveries=letter.deliveries,
            failed_at=letter.failed_at,
            reason=letter.reason,
            parked=letter.parked,
        )


class TokenRequest(BaseModel):
    """``grant_type`` ``password`` (email, password, tenant) or ``api_key`` (api_key)."""

    model_config = ConfigDict(
        extra="forbid",
        # What the token endpoint requires of each grant, as it checks it.
        json_schema_extra={
            "oneOf": [
                {
                    "properties": {
                        "grant_type": {"const": "password"},
                        "email": {"type": "string", "minLength": 1},
                        "password": {"type": "string"},
                    },
                    "required": ["email", "password"],
                },
                {
                    "properties": {
                        "grant_type": {"const": "api_key"},
                        "api_key": {"type": "string", "minLength": 1},
                    },
                    "required": ["api_key"],
                },
            ]
        },
    )

    grant_type: str = Field(pattern="^(password|api_key)$")
    email: PlainText | None = None
    password: str | None = Field(default=None, max_length=1024)
    tenant: PlainText | None = None
    api_key: PlainText | None = Field(default=None, max_length=256)


class TokenOut(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    tenant: str | None
    role: Role | None


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TENANT_ID_PATTERN)
    name: PlainText | None = Field(default=None, max_length=255)
    plan: PlainText | None = None


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: PlainText | None = None


class TenantOut(BaseModel):
    id: str
    name: str
    status: str
    plan: str | None
    server: str | None
    created_at: float
    revision: str | None

    @staticmethod
    def of(t: Tenant) -> TenantOut:
        return TenantOut(
            id=t.id,
            name=t.name,
            status=t.status.value,
            plan=t.plan_id,
            server=t.server_id,
            created_at=t.created_at,
            revision=t.revision,
        )


class ServerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: PlainText = Field(min_length=1, max_length=63)
    url: PlainText = Field(
        min_length=1, max_length=2048, description="A secret: never shown again."
    )


class ServerPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accepting: bool = Field(strict=True)


class ServerOut(BaseModel):
    id: str
    accepting: bool
    tenants: int


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The pattern is published; the identity layer checks it, with a message for people.
    email: str = Field(max_length=320, json_schema_extra={"pattern": EMAIL_PATTERN})
    password: str = Field(min_length=8, max_length=1024)
    platform_admin: bool = Field(default=False, strict=True)


class UserOut(BaseModel):
    id: str
    email: str
    platform_admin: bool
    created_at: float
    disabled: bool

    @staticmethod
    def of(u: User) -> UserOut:
        return UserOut(
            id=u.id,
            email=u.email,
            platform_admin=u.is_platform_admin,
            created_at=u.created_at,
            disabled=u.disabled,
        )


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # After a leak: the access tokens the old keys signed are refused at once.
    revoke_tokens: bool = Field(default=False, strict=True)


class InvitationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: PlainText = Field(max_length=255)
    role: Role


class InvitationOut(BaseModel):
    id: str
    tenant: str
    user_id: str
    role: Role
    invited_by: str
    created_at: float
    expires_at: float

    @staticmethod
    def of(i: Invitation) -> InvitationOut:
        return InvitationOut(
            id=i.id,
            tenant=i.tenant_id,
            user_id=i.user_id,
            role=i.role,
            invited_by=i.invited_by,
            created_at=i.created_at,
            expires_at=i.expires_at,
        )


class MembershipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: PlainText = Field(max_length=255)
    role: Role


class MembershipOut(BaseModel):
    user_id: str
    tenant: str
    role: Role
    created_at: float


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: PlainText = Field(min_length=1, max_length=255)
    role: Role


class ApiKeyOut(BaseModel):
    id: str
    tenant: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None
    secret: str | None = Field(default=None, description="Shown once, at creation.")

    @staticmethod
    def of(k: ApiKey, secret: str | None = None) -> ApiKeyOut:
        return ApiKeyOut(
            id=k.id,
            tenant=k.tenant_id,
            name=k.name,
            role=k.role,
            created_at=k.created_at,
            revoked_at=k.revoked_at,
            secret=secret,
        )


class QuotasModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs_per_month: Count | None = None
    concurrent_runs: Positive | None = None
    seats: Count | None = None
    requests_per_second: float | None = Field(default=None, gt=0, strict=True, allow_inf_nan=False)
    dispatch_weight: DispatchWeight = Field(
        default=1,
        description="The tenants' share of the workers when other tenants have work waiting "
        "too: weight 3 takes three runs to a weight-1 tenant's one (not a limit).",
    )

    def quotas(self) -> Quotas:
        return Quotas(**self.model_dump())


class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=63, pattern="^[a-z0-9][a-z0-9-]*$")
    name: PlainText = Field(min_length=1, max_length=255)
    entitlements: list[PlainText] = Field(default_factory=lambda: ["*"])
    quotas: QuotasModel = Field(default_factory=QuotasModel)


class PlanOut(BaseModel):
    id: str
    name: str
    entitlements: list[str]
    quotas: QuotasModel
    created_at: float

    @staticmethod
    def of(p: Plan) -> PlanOut:
        return PlanOut.model_validate(dataclasses.asdict(p))


class LicenseOut(BaseModel):
    id: str
    tenant: str
    plan: str
    document: str
    issued_at: float
    expires_at: float


class AuditOut(BaseModel):
    id: int
    tenant: str | None
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]
    at: float


class AuditPage(BaseModel):
    entries: list[AuditOut]
    next_cursor: int | None

    @staticmethod
    def of(entries: list[AuditEntry], limit: int) -> AuditPage:
        return AuditPage(
            entries=[
                AuditOut(
                    id=e.id,
                    tenant=e.tenant_id,
                    actor=e.actor,
                    action=e.action,
                    target=e.target,
                    details=e.details,
                    at=e.at,
                )
                for e in entries
            ],
            next_cursor=entries[-1].id if len(entries) == limit else None,
        )
