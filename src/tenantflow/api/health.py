"""Health over HTTP: ``/healthz`` (the process answers), ``/readyz`` (the platform database,
its migrations and the queue are usable, within a probe's bound) and ``/metrics``
(Prometheus)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from tenantflow.api import problems
from tenantflow.api.deps import BearerCredentials
from tenantflow.api.models import Readiness
from tenantflow.runtime import Runtime
from tenantflow.telemetry.metrics import CONTENT_TYPE

# Kubernetes' default probe timeout is 1 s: every check shares this bound, and /readyz answers
# within it (plus the time to write the answer).
READY_TIMEOUT_SECONDS = 0.9
FIRST_SURVEY_WAIT_SECONDS = 0.5

router = APIRouter()


@router.get(
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


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok"}


@router.get(
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
    from tenantflow.platform.database import platform_revision
    from tenantflow.platform.schema import PLATFORM_HEAD
    from tenantflow.store.schema import HEAD_REVISION

    runtime.registry.ensure_set_up()  # left undone by a start during a platform outage
    revision = platform_revision(runtime.registry.engine)
    if revision != PLATFORM_HEAD:
        raise NotReady(f"platform migrations behind ({revision} < {PLATFORM_HEAD})")
    behind = [t.id for t in runtime.registry.list() if t.revision != HEAD_REVISION]
    if behind:
        raise NotReady(f"{len(behind)} tenant databases behind: run `tenantflow tenants migrate`")
