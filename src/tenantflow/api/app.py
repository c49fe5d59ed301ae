"""The HTTP API: ``create_api(workflows, settings)`` builds the ASGI app.

``/v1`` is the tenant plane (runs, workflows, dead letters, the tenant's audit log),
``/platform/v1`` the platform plane, ``/.well-known/jwks.json`` the public keys, ``/healthz``
(the process answers) and ``/readyz`` (databases, queue and migrations are usable). The OpenAPI
document is at ``/openapi.json``. Every error is ``application/problem+json``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tenantflow import __version__
from tenantflow.api import health as health_routes
from tenantflow.api import openapi, problems
from tenantflow.api import people as people_routes
from tenantflow.api import platform as platform_routes
from tenantflow.api import runs as run_routes
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
from tenantflow.telemetry.tracing import mark_error

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
    api.include_router(people_routes.router)
    api.include_router(platform_routes.wellknown)
    api.include_router(health_routes.router)

    api.middleware("http")(limit_body)
    api.add_middleware(TraceRequests)  # outermost: the span covers the whole request

    return api


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
