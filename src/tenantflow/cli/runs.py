"""``tenantflow runs``: start, follow, cancel and signal the runs of one tenant."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

from tenantflow.api.models import RunOut
from tenantflow.cli._common import (
    DEFAULT_APP,
    AppOpt,
    JsonOpt,
    TenantOpt,
    console,
    load_app,
    print_json,
    print_result,
    print_table,
    run,
    runtime_of,
    settings,
    time_text,
)
from tenantflow.client import Client
from tenantflow.errors import ConfigError, RunNotFoundError
from tenantflow.sdk.app import App
from tenantflow.sdk.options import MAX_PRIORITY, MIN_PRIORITY
from tenantflow.serde import loads, parse_json
from tenantflow.store.records import RunStatus, StepRecord

runs_cli = typer.Typer(help="Start, inspect, cancel and signal the runs of a tenant.")

RunIdArg = Annotated[str, typer.Argument(help="The run's id.")]
ACTOR = "cli"
NO_APP = App("tenantflow-cli")  # cancelling and signalling need no workflow's code


def _parsed(value: str, what: str) -> Any:
    """A JSON command-line value, or a one-line ConfigError."""
    try:
        return parse_json(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None


def _json_option(value: str | None, what: str, kind: type) -> Any:
    """A JSON command-line value of the given kind, or a one-line ConfigError."""
    if value is None:
        return kind()
    parsed = _parsed(value, what)
    if not isinstance(parsed, kind):
        raise ConfigError(f"{what} must be a JSON {'array' if kind is list else 'object'}")
    return parsed


@runs_cli.command("start")
def runs_start(
    workflow: Annotated[str, typer.Argument(help="The workflow's name (see --app).")],
    tenant: TenantOpt,
    args: Annotated[
        str | None,
        typer.Option(help='The positional arguments, a JSON array: \'[{"order_id": "1"}]\'.'),
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option(help="The keyword arguments, a JSON object.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="A second start with the same key returns the first run."),
    ] = None,
    priority: Annotated[
        int,
        typer.Option(
            min=MIN_PRIORITY, max=MAX_PRIORITY, help="Higher runs first within the tenant."
        ),
    ] = 0,
    wait: Annotated[
        float | None,
        typer.Option(
            min=0, help="Wait up to this many seconds for the run to end (a worker must run)."
        ),
    ] = None,
    app: AppOpt = DEFAULT_APP,
    as_json: JsonOpt = False,
) -> None:
    """Submit a run of WORKFLOW for a tenant; prints its id (and, with --wait, its end)."""
    positional = _json_option(args, "--args", list)
    named = _json_option(kwargs, "--kwargs", dict)
    the_app = load_app(app)
    wf = the_app.get_workflow(workflow)
    wf.codec.check_input(positional, named)  # bad input: one line, and no run

    async def main() -> RunOut:
        async with runtime_of(settings(), queue=True) as runtime:
            client = Client(the_app, runtime=runtime).tenant(tenant)
            bound = wf.options(idempotency_key=idempotency_key, priority=priority)
            handle = await client.start(bound, *positional, **named)
            await runtime.outbox.published()
            if wait is not None:
                try:
                    await handle.result(timeout=wait)
                except Exception:  # the run's end is reported below, whatever it is
                    pass
            return RunOut.of(await handle.describe())

    out = run(main())
    print_result(out, as_json=as_json, line=f"{out.id}  {out.workflow}  {out.status}")
    if wait is not None and out.status != RunStatus.COMPLETED.value:
        raise typer.Exit(1)


@runs_cli.command("list")
def runs_list(
    tenant: TenantOpt,
    status: Annotated[RunStatus | None, typer.Option(help="Only runs in this status.")] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many runs.")] = 50,
    before: Annotated[
        str | None, typer.Option(help="The next page: runs older than this run id.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List a tenant's runs, newest first."""

    async def main() -> list[Any]:
        async with runtime_of(settings()) as runtime:
            store = runtime.router.store(tenant)
            return await store.list_runs(
                status=status, workflow=workflow, limit=limit, before=before
            )

    runs = run(main())
    if as_json:
        more = runs[-1].id if len(runs) == limit else None
        print_json({"runs": [RunOut.of(r) for r in runs], "next_cursor": more})
        return
    print_table(
        f"runs of {tenant}",
        ("id", "workflow", "status", "created", "finished"),
        (
            [r.id, r.workflow, r.status.value, time_text(r.created_at), time_text(r.finished_at)]
            for r in runs
        ),
    )
    if len(runs) == limit:
        console.print(f"more: --before {runs[-1].id}")


@runs_cli.command("show")
def runs_show(run_id: RunIdArg, tenant: TenantOpt, as_json: JsonOpt = False) -> None:
    """Show one run: status, steps, result or error."""

    async def main() -> tuple[Any, list[Any]]:
        async with runtime_of(settings()) as runtime:
            store = runtime.router.store(tenant)
            found = await store.get_run(run_id)
            if found is None:
                raise RunNotFoundError(f"no run {run_id} in tenant {tenant}")
            return found, await store.get_steps(run_id)

    r, steps = run(main())
    if as_json:
        print_json(RunOut.of(r, steps))
        return
    console.print(f"[bold]{r.id}[/bold]  {r.workflow}  [bold]{r.status.value}[/bold]")
    console.print(
        f"created {time_text(r.created_at)}  started {time_text(r.started_at)}  "
        f"finished {time_text(r.finished_at)}  recoveries {r.recoveries}"
    )
    print_table(
        "steps",
        ("seq", "kind", "name", "status", "attempts", "ms"),
        (
            [str(s.seq), s.kind.value, s.name, s.status.value, str(s.attempts), _ms(s)]
            for s in steps
        ),
    )
    if r.result is not None:
        console.print("result:", loads(r.result))
    if r.error is not None:
        console.print("error:", r.error_info)


def _ms(step: StepRecord) -> str:
    if step.finished_at is None:
        return "-"
    return f"{(step.finished_at - step.started_at) * 1000:.1f}"


@runs_cli.command("cancel")
def runs_cancel(run_id: RunIdArg, tenant: TenantOpt, as_json: JsonOpt = False) -> None:
    """Ask a run to stop: it ends cancelled at its next step boundary (its saga, if any,
    compensates first)."""

    async def main() -> RunOut:
        async with runtime_of(settings(), queue=True) as runtime:
            handle = Client(NO_APP, runtime=runtime).tenant(tenant).handle(run_id)
            await handle.cancel()
            await asyncio.to_thread(
                runtime.platform.audit.record,
                "run.cancelled",
                actor=ACTOR,
                tenant_id=tenant,
                target=run_id,
            )
            return RunOut.of(await handle.describe())

    out = run(main())
    print_result(out, as_json=as_json, line=f"{out.id}  {out.status}  cancel requested")


@runs_cli.command("event")
def runs_event(
    run_id: RunIdArg,
    name: Annotated[str, typer.Argument(help="The event's name, as ctx.wait_for_event has it.")],
    tenant: TenantOpt,
    payload: Annotated[
        str | None, typer.Option(help="The event's payload, as JSON (default null).")
    ] = None,
) -> None:
    """Send an event to a run waiting for it with ctx.wait_for_event(NAME)."""
    value: Any = None
    if payload is not None:
        value = _parsed(payload, "--payload")

    async def main() -> None:
        async with runtime_of(settings(), queue=True) as runtime:
            handle = Client(NO_APP, runtime=runtime).tenant(tenant).handle(run_id)
            await handle.send_event(name, value)
            await runtime.outbox.published()

    run(main())
    print_result(None, as_json=False, line=f"event {name!r} sent to {run_id}")
