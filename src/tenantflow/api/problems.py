"""Errors over HTTP: RFC 9457 ``application/problem+json`` with a stable ``type`` per kind.

Messages are the exceptions' own, which never carry secrets or another tenant's data; an
unexpected error answers a bare 500 and is logged, never echoed. A 422 says what is wrong in one
line (``detail``) and field by field (``errors``: ``loc``, a dotted path such as
``body.priority``, ``query.cursor`` or, for a workflow's arguments, ``order.quantity``; and
``msg``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from tenantflow import errors
from tenantflow.backends import reason, unavailable
from tenantflow.serde import NOT_JSON_NUMBER, issues_of

log = structlog.get_logger(__name__)

PROBLEM = "application/problem+json"
TYPE_PREFIX = "urn:tenantflow:problem:"

# Most specific first: the first class an error is an instance of decides.
_MAPPING: list[tuple[type[Exception], int, str]] = [
    (errors.InvalidSignatureError, 401, "invalid-token"),
    (errors.AuthenticationError, 401, "unauthenticated"),
    (errors.PermissionDeniedError, 403, "forbidden"),
    (errors.NotEntitledError, 403, "not-entitled"),
    (errors.LicenseError, 403, "license-invalid"),
    (errors.SignInThrottledError, 429, "sign-in-throttled"),
    (errors.RateLimitedError, 429, "rate-limited"),
    (errors.SeatLimitError, 409, "seats-exhausted"),
    (errors.QuotaExceededError, 429, "quota-exceeded"),
    (errors.TenantSuspendedError, 409, "tenant-suspended"),
    (errors.IdempotencyConflictError, 409, "idempotency-conflict"),
    (errors.TenantExistsError, 409, "conflict"),
    (errors.ConflictError, 409, "conflict"),
    (errors.RunFinishedError, 409, "run-finished"),
    (errors.NotFoundError, 404, "not-found"),
    (errors.InvalidInputError, 422, "invalid-request"),
    (errors.InvalidTenantIdError, 422, "invalid-request"),
    (errors.SerializationError, 422, "invalid-request"),
    (errors.ConfigError, 422, "invalid-request"),
    (errors.DatabaseBusyError, 503, "database-busy"),
    (errors.TenantDatabaseMissingError, 503, "tenant-database-missing"),
    (errors.StoreUnavailableError, 503, "database-unavailable"),
]

_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Unavailable",
}


class Issue(BaseModel):
    """One thing wrong with a request: where (``loc``, a dotted path to the value:
    ``args.0.quantity``, ``body.priority``, ``query.cursor``) and what."""

    loc: str
    msg: str


class Problem(BaseModel):
    """An RFC 9457 problem document, as every error answer carries it."""

    # RFC 9457 lets a problem type add members of its own.
    model_config = ConfigDict(extra="allow")

    type: str = Field(pattern=f"^{TYPE_PREFIX}", examples=[f"{TYPE_PREFIX}not-found"])
    title: str
    status: int = Field(ge=400, le=599)
    detail: str | None = None
    errors: list[Issue] | None = Field(
        default=None, description="What is wrong with the request (invalid-request only)."
    )


# What each documented status means across the API; a route lists the ones it can answer.
_MEANINGS = {
    400: "The body cannot be read: it is not UTF-8 (`http-error`).",
    401: "No valid access token (`unauthenticated`, `invalid-token`).",
    403: "The token's role or scope does not allow this, or the tenant's license does not "
    "(`forbidden`, `not-entitled`, `license-invalid`).",
    404: "Not found, or not visible to this caller (`not-found`).",
    409: "Conflicts with the current state (`conflict`, `idempotency-conflict`, "
    "`tenant-suspended`, `run-finished`, `seats-exhausted`).",
    413: "The body exceeds the configured limit (`too-large`).",
    422: "The request is not valid: its parameters or body (`invalid-request`).",
    429: "The tenant's request rate or monthly quota is used up (`rate-limited`, "
    "`quota-exceeded`), or sign-ins of the account or from the address are locked out "
    "(`sign-in-throttled`); `Retry-After` says when to try again.",
    503: "A database is out of reach for now: every connection of this process is in use "
    "(`database-busy`), or the database does not answer, restarting or stopped "
    "(`database-unavailable`), or the tenant's database is gone (`tenant-database-missing`). "
    "Nothing was done; `Retry-After` says when to try again.",
}
_RETRY_AFTER = {"description": "Seconds to wait.", "schema": {"type": "integer"}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}
PROBLEM_SCHEMA = {"$ref": f"#/components/schemas/{Problem.__name__}"}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route or router that may answer these problem statuses."""
    return {
        status: {
            "description": _MEANINGS[status],
            "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}},
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def problem(
    status: int,
    slug: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"{TYPE_PREFIX}{slug}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def classify(exc: Exception) -> tuple[int, str] | None:
    for cls, status, slug in _MAPPING:
        if isinstance(exc, cls):
            return status, slug
    return None


def install(app: FastAPI) -> None:
    """Every error the app can answer becomes a problem document."""

    @app.exception_handler(errors.TenantflowError)
    async def _tenantflow(request: Request, exc: errors.TenantflowError) -> JSONResponse:
        return _known(exc)

    async def _data(request: Request, exc: Exception) -> JSONResponse:
        # The driver's message may quote the value: it is not echoed.
        return problem(422, "invalid-request", "a value the database cannot store")

    app.add_exception_handler(sa_exc.DataError, _data)

    @app.exception_handler(sa_exc.TimeoutError)
    async def _platform_busy(request: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        # The platform database's pool, which is a share of the connection budget, is full.
        return _known(errors.DatabaseBusyError())

    @app.exception_handler(sa_exc.OperationalError)
    async def _platform_away(request: Request, exc: sa_exc.OperationalError) -> JSONResponse:
        # The platform plane's own calls (identity, tenants, plans) on a platform database
        # that does not answer; anything else of the kind is a bug, logged.
        if unavailable(exc) is None:
            return await _unexpected(request, exc)
        return _known(
            errors.StoreUnavailableError(f"the platform database did not answer: {reason(exc)}")
        )

    try:
        import psycopg
    except ImportError:  # the PostgreSQL driver is an extra
        pass
    else:
        app.add_exception_handler(psycopg.DataError, _data)

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        # Not one of ours (those are InvalidInputError): its text was written for developers
        # and may quote the input, so it is logged, not echoed.
        log.warning("request refused on a ValueError", path=request.url.path, exc_info=exc)
        return problem(422, "invalid-request", "a value in the request is not valid")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Field paths and messages only: the offending input itself is not echoed.
        issues = issues_of(_readable(e) for e in exc.errors())
        return problem(422, "invalid-request", errors.summarize(issues), errors=_listed(issues))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem(exc.status_code, slug, detail, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed", path=request.url.path)
        return problem(500, "internal", "an unexpected error; it was logged")


def _known(exc: Exception) -> JSONResponse:
    found = classify(exc)
    if found is None:
        log.exception("request failed", error=type(exc).__name__)
        return problem(500, "internal", "an unexpected error; it was logged")
    status, slug = found
    headers = None
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after is not None:
        headers = {"Retry-After": str(max(1, round(retry_after)))}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    extra = {}
    if isinstance(exc, errors.InvalidInputError) and exc.issues:
        extra["errors"] = _listed(exc.issues)
    return problem(status, slug, str(exc) or None, headers=headers, **extra)


def _listed(issues: Sequence[errors.Issue]) -> list[dict[str, str]]:
    return [{"loc": i.loc, "msg": i.msg} for i in issues]


def _readable(error: Mapping[str, Any]) -> Mapping[str, Any]:
    """FastAPI's error for a body that is not JSON, located at the body, not at a position
    (and saying why when it is a number JSON has not: the reason hardest to see)."""
    if error.get("type") == "json_invalid":
        position = error["loc"][-1] if len(error.get("loc", ())) > 1 else None
        where = f" (at character {position})" if isinstance(position, int) else ""
        why = f": {NOT_JSON_NUMBER}" if error.get("ctx", {}).get("error") == NOT_JSON_NUMBER else ""
        return {"loc": ("body",), "msg": f"not valid JSON{why}{where}"}
    return error
