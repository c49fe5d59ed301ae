"""The ``tenantflow`` command."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import sys
from collections.abc import Coroutine
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tenantflow._extras import require
from tenantflow.errors import TenantflowError
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.sdk.serde import loads
from tenantflow.settings import Settings
from tenantflow.store.records import RunStatus
from tenantflow.telemetry.logging import configure_logging

cli = typer.Typer(
    help="tenantflow: multi-tenant durable workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
runs_cli = typer.Typer(help="Inspect runs of a tenant.", no_args_is_help=True)
tenants_cli = typer.Typer(help="Manage tenants.", no_args_is_help=True)
cli.add_typer(runs_cli, name="runs")
cli.add_typer(tenants_cli, name="tenants")
console = Console()

TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant id.")]


def _settings() -> Settings:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def load_app(spec: str) -> App:
    """Import ``module:attribute`` and return the App it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise typer.BadParameter("expected module:attribute, e.g. myproject.workflows:app")
    sys.path.insert(0, ".")
    app = getattr(importlib.import_module(module_name), attr, None)
    if not isinstance(app, App):
        raise typer.BadParameter(f"{spec} is not a tenantflow App")
    return app


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@cli.command()
def demo(orders: Annotated[int, typer.Option(min=1, max=10_000)] = 25) -> None:
    """Provision two tenants and fulfil orders for both at once (embedded default)."""
    from tenantflow.demo import run_demo

    settings = _settings()
    if settings.log_level.upper() == "INFO":  # the progress bar tells the story
        configure_logging("WARNING", settings.log_format)
    summaries = asyncio.run(run_demo(settings, orders=orders, console=console))
    if any(s.failed for s in summaries):
        raise typer.Exit(1)


AppOpt = Annotated[
    str, typer.Option("--app", help="The App whose workflows to serve, as module:attribute.")
]
DEFAULT_APP = "tenantflow.examples.orders:app"


@cli.command()
def dev(
    app: AppOpt = DEFAULT_APP,
    port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
) -> None:
    """Serve the HTTP API and a worker in one process (embedded default unless configured).
    The first start creates demo tenants and an admin, and prints their credentials once."""
    from tenantflow.dev import bootstrap, serve

    settings = _settings()
    the_app = load_app(app)
    runtime = Runtime(settings)
    try:
        made = bootstrap(runtime)
    finally:
        asyncio.run(runtime.close())
    url = f"http://{settings.api_host}:{port or settings.api_port}"
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
    console.print(
        f"API on {url} (OpenAPI at {url}/docs); a worker runs alongside. Ctrl-C stops.",
        soft_wrap=True,
    )
    _run_loop(serve(the_app, settings, port=port), settings)


@cli.command()
def api(
    app: AppOpt = DEFAULT_APP,
    port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
) -> None:
    """Serve the HTTP API only (run workers with `tenantflow worker`)."""
    import uvicorn

    from tenantflow.api.app import create_api

    settings = _settings()
    uvicorn.run(
        create_api(load_app(app), settings),
        host=settings.api_host,
        port=port or settings.api_port,
        log_level="warning",
    )


@cli.command()
def worker(
    app: AppOpt = DEFAULT_APP,
    concurrency: Annotated[int | None, typer.Option(min=1)] = None,
) -> None:
    """Run a worker until SIGTERM or Ctrl-C."""
    from tenantflow.worker.worker import Worker

    settings = _settings()
    the_app = load_app(app)

    async def main() -> None:
        runtime = Runtime(settings)
        w = Worker(the_app, runtime, concurrency=concurrency)
        w.install_signal_handlers()
        try:
            await w.run()
        finally:
            await runtime.close()

    _run_loop(main(), settings)


@runs_cli.command("list")
def runs_list(
    tenant: TenantOpt,
    status: Annotated[RunStatus | None, typer.Option(help="Only runs in this status.")] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    before: Annotated[str | None, typer.Option(help="Continue after this run id.")] = None,
) -> None:
    """List a tenant's runs, newest first."""

    async def main() -> None:
        runtime = Runtime(_settings())
        try:
            store = runtime.router.store(tenant)
            runs = await store.list_runs(
                status=status, workflow=workflow, limit=limit, before=before
            )
        finally:
            await runtime.close()
        table = Table(title=f"runs of {tenant}")
        table.add_column("id", no_wrap=True)
        for column in ("workflow", "status", "created", "finished"):
            table.add_column(column)
        for run in runs:
            table.add_row(
                run.id,
                run.workflow,
                run.status.value,
                _time(run.created_at),
                _time(run.finished_at),
            )
        console.print(table)
        if len(runs) == limit:
            console.print(f"more: --before {runs[-1].id}")

    _run(main())


@runs_cli.command("show")
def runs_show(run_id: str, tenant: TenantOpt) -> None:
    """Show one run: status, steps, result or error."""

    async def main() -> None:
        runtime = Runtime(_settings())
        try:
            store = runtime.router.store(tenant)
            run = await store.get_run(run_id)
            steps = await store.get_steps(run_id) if run else []
        finally:
            await runtime.close()
        if run is None:
            raise TenantflowError(f"no run {run_id} in tenant {tenant}")
        console.print(f"[bold]{run.id}[/bold]  {run.workflow}  [bold]{run.status.value}[/bold]")
        console.print(
            f"created {_time(run.created_at)}  started {_time(run.started_at)}  "
            f"finished {_time(run.finished_at)}  recoveries {run.recoveries}"
        )
        table = Table(title="steps")
        for column in ("seq", "kind", "name", "status", "attempts", "ms"):
            table.add_column(column)
        for s in steps:
            ms = "-" if s.finished_at is None else f"{(s.finished_at - s.started_at) * 1000:.1f}"
            table.add_row(str(s.seq), s.kind.value, s.name, s.status.value, str(s.attempts), ms)
        console.print(table)
        if run.result is not None:
            console.print("result:", loads(run.result))
        if run.error is not None:
            console.print("error:", run.error_info)

    _run(main())


@cli.command()
def status() -> None:
    """Per tenant: stuck runs, queue depth and lag, dead letters (the stuck-run detector)."""
    from tenantflow.telemetry.health import survey

    async def main() -> None:
        runtime = Runtime(_settings())
        try:
            found = await survey(runtime)
        finally:
            await runtime.close()
        settings = runtime.settings
        table = Table(
            title=f"tenants (stuck: no progress for {settings.stuck_run_seconds:g} s; "
            f"lag: oldest message over {settings.queue_lag_seconds:g} s)"
        )
        for column in ("tenant", "stuck runs", "oldest stuck", "queue", "lag", "dead letters"):
            table.add_column(column)
        for t in found:
            oldest = "-" if t.oldest_stuck_seconds is None else f"{t.oldest_stuck_seconds:.0f} s"
            lag = f"{t.queue_lag_seconds:.1f} s" + (" [red]LAG[/red]" if t.lagging else "")
            stuck = f"[red]{t.stuck_runs}[/red]" if t.stuck_runs else "0"
            table.add_row(t.tenant_id, stuck, oldest, str(t.queue_depth), lag, str(t.dead_letters))
        console.print(table)
        if any(t.stuck_runs or t.lagging for t in found):
            raise typer.Exit(1)

    _run(main())


@tenants_cli.command("create")
def tenants_create(
    tenant_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    plan: Annotated[str | None, typer.Option(help="The plan to license the tenant on.")] = None,
) -> None:
    """Create a tenant and its database (recorded in the audit log, actor "cli")."""
    runtime = Runtime(_settings())
    try:
        tenant = runtime.platform.create_tenant("cli", tenant_id, name=name, plan_id=plan)
    except TenantflowError as exc:
        _fail(exc)
    finally:
        asyncio.run(runtime.close())
    console.print(f"created tenant {tenant.id}")


@tenants_cli.command("migrate")
def tenants_migrate(
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Databases at a time.")] = 8,
) -> None:
    """Bring every tenant database to the newest schema, in parallel batches."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    runtime = Runtime(_settings())
    try:
        total = len(runtime.registry.list())
        with Progress(
            BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            bar = progress.add_task("migrate", total=total)
            report = runtime.registry.migrate_all(
                parallel=parallel, progress=lambda _: progress.advance(bar)
            )
    finally:
        asyncio.run(runtime.close())
    console.print(
        f"{len(report.migrated)} migrated, {len(report.at_head)} already at head, "
        f"{len(report.failed)} failed"
    )
    for tenant_id, error in sorted(report.failed.items()):
        console.print(f"[red]failed[/red] {tenant_id}: {error}")
    if report.failed:
        raise typer.Exit(1)


@tenants_cli.command("list")
def tenants_list() -> None:
    """List tenants."""
    runtime = Runtime(_settings())
    try:
        tenants = runtime.registry.list()
    finally:
        asyncio.run(runtime.close())
    table = Table(title="tenants")
    for column in ("id", "name", "status", "created"):
        table.add_column(column)
    for t in tenants:
        table.add_row(t.id, t.name, t.status.value, _time(t.created_at))
    console.print(table)


def _run_loop(coro: Coroutine[Any, Any, None], settings: Settings) -> None:
    """Run a long-lived loop on uvloop when it is installed (``tenantflow[fast]``) or asked
    for: the same asyncio API with a faster loop; the standard loop otherwise."""
    if settings.event_loop == "uvloop":
        require("fast", "TENANTFLOW_EVENT_LOOP=uvloop")
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def _run(coro: object) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except TenantflowError as exc:
        _fail(exc)


def _fail(exc: TenantflowError) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
