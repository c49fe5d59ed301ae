"""The long-running commands: ``dev`` (API and worker in one process), ``api``, ``worker``."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import structlog
import typer

from tenantflow._extras import require
from tenantflow.backends import reason, redact_url, unavailable
from tenantflow.cli._common import DEFAULT_APP, AppOpt, console, load_app, settings
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.settings import Settings
from tenantflow.telemetry.logging import configure_logging

log = structlog.get_logger(__name__)

PortOpt = Annotated[
    int | None,
    typer.Option(min=1, max=65535, help="Port of the HTTP API (default TENANTFLOW_API_PORT)."),
]
STARTUP_RETRY_MAX_SECONDS = 30.0


def describe(app: App, found: Settings, *, serving: str) -> str:
    """What a process serves, in one line: the app, its workflows, the backends (without
    secrets), and where it listens."""
    workflows = ", ".join(sorted(app.workflows)) or "none"
    return (
        f"{serving}: app {app.name!r} (workflows: {workflows}); "
        f"platform database {redact_url(found.resolved_database_url())}; "
        f"queue {redact_url(found.resolved_queue_url())}"
    )


def dev(app: AppOpt = DEFAULT_APP, port: PortOpt = None) -> None:
    """Serve the HTTP API and a worker in one process (embedded default unless configured).
    The first start creates demo tenants and an admin, and prints their credentials once."""
    from tenantflow.dev import bootstrap, serve

    found = settings()
    the_app = load_app(app)
    runtime = Runtime(found)
    try:
        made = bootstrap(runtime)
    finally:
        asyncio.run(runtime.close())
    url = f"http://{found.api_host}:{port or found.api_port}"
    if made.admin_password is not None:
        console.print("[bold]First start: these credentials are shown once.[/bold]")
        console.print(
            f"  platform admin  {made.admin_email}  password {made.admin_password}",
            soft_wrap=True,
        )
        for tenant_id, secret in made.api_keys.items():
            console.print(f"  API key of {tenant_id} (operator)  {secret}", soft_wrap=True)
    else:
        console.print("Credentials were printed on the first start (only hashes are kept).")
    console.print(describe(the_app, found, serving="dev"), soft_wrap=True, markup=False)
    console.print(
        f"API on {url} (OpenAPI at {url}/docs); a worker runs alongside. Ctrl-C stops.",
        soft_wrap=True,
    )
    run_loop(lambda: serve(the_app, found, port=port), found)


def demo(
    orders: Annotated[
        int, typer.Option(min=1, max=10_000, help="Orders to fulfil for each tenant.")
    ] = 25,
) -> None:
    """Provision two tenants and fulfil orders for both at once, with a progress bar per
    tenant (embedded default unless configured)."""
    from tenantflow.demo import run_demo

    found = settings()
    if found.log_level.upper() == "INFO":  # the progress bar tells the story
        configure_logging("WARNING", found.log_format)
    summaries = asyncio.run(run_demo(found, orders=orders, console=console))
    if any(s.failed for s in summaries):
        raise typer.Exit(1)


def api(app: AppOpt = DEFAULT_APP, port: PortOpt = None) -> None:
    """Serve the HTTP API only (run workers with `tenantflow worker`)."""
    from tenantflow.dev import serve

    found = settings()
    the_app = load_app(app)
    url = f"http://{found.api_host}:{port or found.api_port}"
    console.print(describe(the_app, found, serving=f"api on {url}"), soft_wrap=True, markup=False)
    run_loop(lambda: serve(the_app, found, port=port, worker=False), found)


def worker(
    app: AppOpt = DEFAULT_APP,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Runs in flight at once (default TENANTFLOW_WORKER_CONCURRENCY)."),
    ] = None,
) -> None:
    """Run a worker until SIGTERM or Ctrl-C. A backend that does not answer yet is waited
    for, with a line per attempt."""
    from tenantflow.worker.worker import Worker

    # SIGTERM while starting (loading the app, waiting for the backends) is a request to
    # stop, answered with a clean exit, not the default death by signal.
    stop_asked: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stop_asked.append(signum))
    found = settings()
    the_app = load_app(app)
    console.print(
        describe(the_app, found, serving="worker")
        + f"; concurrency {concurrency or found.worker_concurrency}",
        soft_wrap=True,
        markup=False,
    )

    async def main() -> None:
        opening = asyncio.ensure_future(open_retrying(found))
        while not opening.done():
            await asyncio.wait({opening}, timeout=0.1)
            if stop_asked and not opening.done():
                opening.cancel()
                return
        runtime = opening.result()
        w = Worker(the_app, runtime, concurrency=concurrency)
        w.install_signal_handlers()
        if stop_asked:
            w.stop()
        try:
            await w.run()
        finally:
            await runtime.close()

    run_loop(main, found)


async def open_retrying(found: Settings) -> Runtime:
    """A runtime, waiting (backing off, one log line each time) while its backends do not
    answer: a worker started before its database or Redis is up starts when they are."""
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(Runtime, found)
        except Exception as exc:
            backend = unavailable(exc)
            if backend is None:
                raise
            log.warning(
                "backend unavailable; retrying",
                backend=backend,
                error=reason(exc),
                retry_in=delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, STARTUP_RETRY_MAX_SECONDS)


def run_loop(main: Callable[[], Coroutine[Any, Any, None]], found: Settings) -> None:
    """Run a long-lived ``main()`` on uvloop when it is installed (``tenantflow[fast]``) or
    asked for: the same asyncio API with a faster loop; the standard loop otherwise."""
    # What is loaded by now (the modules, the app) lives as long as the process: kept out of
    # the garbage collector's full passes, each of which otherwise stalls the loop for tens
    # of milliseconds on a busy worker.
    gc.collect()
    gc.freeze()
    if found.event_loop == "uvloop":
        require("fast", "TENANTFLOW_EVENT_LOOP=uvloop")
    if found.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main())
            return
    asyncio.run(main())
