"""Operating an installation: ``status`` (the stuck-run detector) and ``dead-letters``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated, Any

import typer

from tenantflow.api.models import DeadLetterOut
from tenantflow.cli._common import (
    JsonOpt,
    TenantOpt,
    print_json,
    print_result,
    print_table,
    run,
    runtime_of,
    settings,
    stderr,
    time_text,
)
from tenantflow.telemetry.health import TenantHealth

dead_cli = typer.Typer(help="Messages that could not be delivered: list them, replay them.")


def status(as_json: JsonOpt = False) -> None:
    """Per tenant: stuck runs, queue depth and lag, dead letters (the stuck-run detector).
    Exits 1 when a run is stuck, a queue lags or a tenant database does not answer."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tenantflow.telemetry.health import survey

    found = settings()
    # Only the tenants with work have their database read; the bar shows that walk, on a
    # terminal (a script reading stderr gets errors alone).
    bar = Progress(
        TextColumn("reading tenant databases"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    task = bar.add_task("survey", total=None)

    async def main() -> list[Any]:
        async with runtime_of(found, queue=True) as runtime:
            with bar:
                return await survey(
                    runtime,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )

    tenants = run(main())
    if as_json:
        print_json({"tenants": [dataclasses.asdict(t) for t in tenants]})
    else:
        title = (
            f"tenants (stuck: no progress for {found.stuck_run_seconds:g} s; "
            f"lag: oldest message over {found.queue_lag_seconds:g} s)"
        )
        columns = ("tenant", "stuck runs", "oldest stuck", "queue", "lag", "dead letters")
        print_table(title, columns, (_health_row(t) for t in tenants))
    if any(t.stuck_runs or t.lagging or not t.reachable for t in tenants):
        raise typer.Exit(1)


def _health_row(t: TenantHealth) -> list[str]:
    oldest = "-" if t.oldest_stuck_seconds is None else f"{t.oldest_stuck_seconds:.0f} s"
    lag = f"{t.queue_lag_seconds:.1f} s" + (" [red]LAG[/red]" if t.lagging else "")
    stuck = f"[red]{t.stuck_runs}[/red]" if t.stuck_runs else "0"
    if not t.reachable:
        stuck = "[red]database away[/red]"
    return [t.tenant_id, stuck, oldest, str(t.queue_depth), lag, str(t.dead_letters)]


@dead_cli.command("list")
def dead_list(
    tenant: TenantOpt,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List a tenant's dead letters, oldest first."""

    async def main() -> list[Any]:
        async with runtime_of(settings(), queue=True) as runtime:
            runtime.router.tenant(tenant)  # an unknown tenant is an error, not an empty list
            return await runtime.queue.dead_letters(tenant, limit=limit)

    letters = run(main())
    if as_json:
        print_json({"dead_letters": [DeadLetterOut.of(d) for d in letters]})
        return
    print_table(
        f"dead letters of {tenant}",
        ("id", "run", "deliveries", "failed", "waits for replay", "reason"),
        (
            [
                d.id,
                d.run_id,
                str(d.deliveries),
                time_text(d.failed_at),
                getattr(d, "reason", None) or "-",
            ]
            for d in letters
        ),
    )


@dead_cli.command("replay")
def dead_replay(
    dead_letter_id: Annotated[str, typer.Argument(help="The dead letter's id (see list).")],
    tenant: TenantOpt,
) -> None:
    """Deliver a dead letter's run again (its delivery count starts over)."""

    async def main() -> None:
        async with runtime_of(settings(), queue=True) as runtime:
            runtime.router.tenant(tenant)
            await runtime.queue.replay_dead_letter(tenant, dead_letter_id)
            await asyncio.to_thread(
                runtime.platform.audit.record,
                "dead_letter.replayed",
                actor="cli",
                tenant_id=tenant,
                target=dead_letter_id,
            )

    run(main())
    print_result(None, as_json=False, line=f"replayed {dead_letter_id}")
