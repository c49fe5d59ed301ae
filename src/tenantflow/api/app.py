"""The HTTP API: ``create_api(workflows, settings)`` builds the ASGI app.

``/v1`` is the tenant plane (runs, workflows, dead letters, the tenant's audit log),
``/platform/v1`` the platform plane, ``/.well-known/jwks.json`` the public keys, ``/healthz``
(the process answers) and ``/readyz`` (databases, queue and migrations are usable). The OpenAPI
document is at ``/openapi.json``. Every error is ``application/problem+json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantflow import __version__
from tenantflow.api import openapi, problems
from tenantflow.api import platform as platform_routes
from tenantflow.api import runs as run_routes
from tenantflow.api.deps import BearerCredentials
from tenantflow.api.models import Readiness
from tenantflow.api.ratelimit import RateLimiter
from tenantflow.api.signin import (
    LocalSignInLimits,
    RedisSignInLimits,
    SignInGuard,
    SignInLimits,
)
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.settings import Settings
from tenantflow.telemetry.metrics import CONTENT_TYPE
from tenantflow.telemetry.tracing import mark_error

# Kubernetes' default probe timeout is 1 s: every check shares this bound, and /readyz answers
# within it (plus the time to write the answer).
READY_TIMEOUT_SECONDS = 0.9
FIRST_SURVEY_WAIT_SECONDS = 0.5
BODY_METHODS = {"POST", "PUT", "PATCH"}


def create_api(
    workflows: App, settings: Settings | None = None, *, runtime: Runtime | None = None
) -> FastAPI:
    """The API for the workflows of ``workflows``. With ``runtime``, the caller owns it (and
    closes it); otherwise the app opens its own on startup and closes it on shutdown."""
    own_runtime = runtime is None

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings)
        _attach(api, rt, workflows)
        rt.health.start()  # the first survey is under way before the first probe
        try:
            yield
        finally:
            api.state.signin.close()
            if own_runtime:
                await rt.close()

    # /docs and /redoc load Swagger UI and ReDoc from files fastapi-offline ships, served by
    # this app: FastAPI's own pages fetch them from a CDN, which a closed network never reaches.
    api = FastAPIOffline(
        title="tenantflow",
        version=__version__,
        lifespan=lifespan,
        description="Durable workflows for many tenants: the tenant plane and the platform plane.",
        static_url="/docs/assets",
        # No validator badge: it would send the document to an outside service.
        swagger_ui_parameters={"validatorUrl": None},
    )
    openapi.install(api, workflows)
    api.state.workflows = workflows
    if runtime is not None:  # usable without the lifespan (tests drive the app directly)
        _attach(api, runtime, workflows)
    problems.install(api)
    api.include_router(run_routes.router)
    api.include_router(platform_routes.router)
    api.include_router(platform_routes.wellknown)

    @api.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Refuse a body larger than ``max_request_bytes`` before reading it (by its
        declared length) or while reading it (a chunked one)."""
        if request.method in BODY_METHODS:
            limit = request.app.state.runtime.settings.max_request_bytes
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                return problems.problem(413, "too-large", f"the body exceeds {limit} bytes")
            if declared is None:
                body = b""
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        return problems.problem(413, "too-large", f"the body exceeds {limit} bytes")
                request._body = body  # read once; the route reads it from here
        return await call_next(request)

    api.add_middleware(TraceRequests)  # outermost: the span covers the whole request

    @api.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses=problems.responses(401, 403),
    )
    async def metrics(request: Request, credentials: BearerCredentials) -> Response:
        """Prometheus metrics of this process, and the shared gauges (queues, dead letters,
        breakers). For the scraper (``Authorization: Bearer $TENANTFLOW_METRICS_TOKEN``) or a
        platform admin: tenant ids are in the labels."""
        rt: Runtime = request.app.state.runtime
        await _authorize_scrape(request, rt, credentials)
        # The gauges of shared state are set by the background survey, never on this path:
        # a scrape waits only for the very first survey, and not for long.
        await rt.health.current(wait=FIRST_SURVEY_WAIT_SECONDS)
        return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE)

    @api.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive and serving."""
        return {"status": "ok"}

    @api.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A check failed."}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Ready when the platform database answers and its migrations are at head, and the
        queue answers; 503 with the failing checks otherwise. Answers within
        ``READY_TIMEOUT_SECONDS`` whatever the number of tenants: the stuck-run counts are
        the background survey's latest (``progress_age_seconds`` says how old)."""
        rt: Runtime = request.app.state.runtime
        began = time.monotonic()
        checks = await asyncio.gather(
            _check("platform_database", lambda: asyncio.to_thread(_platform_ready, rt)),
            _check("queue", lambda: rt.queue.depth("-readyz-")),
        )
        report = dict(checks)
        ok = all(v == "ok" for v in report.values())
        body: dict[str, Any] = {"status": "ready" if ok else "unready", "checks": report}
        if ok:
            left = READY_TIMEOUT_SECONDS - (time.monotonic() - began)
            found = await rt.health.current(wait=max(0.0, min(left, FIRST_SURVEY_WAIT_SECONDS)))
            if found is not None:
                body["progress"] = found.counts()
                body["progress_age_seconds"] = round(max(0.0, time.time() - found.taken_at), 3)
        return JSONResponse(body, status_code=200 if ok else 503)

    return api


async def _authorize_scrape(
    request: Request, runtime: Runtime, credentials: BearerCredentials
) -> None:
    import hmac

    from tenantflow.api.deps import get_principal
    from tenantflow.errors import PermissionDeniedError

    secret = runtime.settings.metrics_token
    header = request.headers.get("authorization", "")
    if secret and hmac.compare_digest(header.encode(), f"Bearer {secret}".encode()):
        return
    principal = await get_principal(request, runtime, credentials)
    if not principal.platform_admin:
        raise PermissionDeniedError("metrics are for the scraper and platform admins")


def _attach(api: FastAPI, runtime: Runtime, workflows: App) -> None:
    """The app's state: the runtime, the request rate limits and the sign-in guard (on the
    runtime's coordination backend: shared through Redis with the Redis queue, this process's
    own on the embedded default)."""
    for name, config in workflows.breakers.items():
        runtime.breakers.configure(name, config)
    runtime.health.watch_breakers(workflows.breakers)
    api.state.runtime = runtime
    coordination = runtime.coordination
    longest = runtime.settings.signin_lockout_max_seconds
    limits: SignInLimits
    if coordination.shared:
        limits = RedisSignInLimits(coordination, longest)
    else:
        limits = LocalSignInLimits(longest)
    api.state.limiter = RateLimiter(coordination)

    async def record(scope: str, subject: str, details: dict[str, Any]) -> None:
        await asyncio.to_thread(runtime.platform.record_lockout, scope, subject, details)

    api.state.signin = SignInGuard(limits, runtime.settings, record)


class TraceRequests:
    """A server span per HTTP request when tracing is on (the client's ``traceparent``, if
    valid, is its parent). Named by the route's template, never by the ids in the path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if scope["type"] != "http" or runtime is None or not runtime.tracing.enabled:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        origin = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                origin = value.decode("latin-1")
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with runtime.tracing.span(
            method,
            kind="server",
            origin=origin,
            link=False,
            attributes={"http.request.method": method},
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                if span is not None:
                    if template is not None:
                        span.update_name(f"{method} {template}")
                        span.set_attribute("http.route", template)
                    span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    mark_error(span, str(status))


class NotReady(Exception):
    """A check's own finding (its message is safe to show)."""


async def _check(name: str, probe: Callable[[], Awaitable[Any]]) -> tuple[str, str]:
    try:
        await asyncio.wait_for(probe(), READY_TIMEOUT_SECONDS)
    except TimeoutError:
        return name, f"no answer within {READY_TIMEOUT_SECONDS} s"
    except NotReady as exc:
        return name, str(exc)
    except Exception as exc:  # the type only: a driver's message may name hosts or users
        return name, f"failed: {type(exc).__name__}"
    return name, "ok"


def _platform_ready(runtime: Runtime) -> None:
    from tenantflow.platform.registry import _platform_revision
    from tenantflow.platform.schema import PLATFORM_HEAD
    from tenantflow.store.schema import HEAD_REVISION

    runtime.registry.ensure_set_up()  # left undone by a start during a platform outage
    revision = _platform_revision(runtime.registry.engine)
    if revision != PLATFORM_HEAD:
        raise NotReady(f"platform migrations behind ({revision} < {PLATFORM_HEAD})")
    behind = [t.id for t in runtime.registry.list() if t.revision != HEAD_REVISION]
    if behind:
        raise NotReady(f"{len(behind)} tenant databases behind: run `tenantflow tenants migrate`")
