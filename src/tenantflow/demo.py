"""``tenantflow demo``: two tenants fulfil orders at once on the embedded default."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tenantflow.client import Client, RunHandle
from tenantflow.examples.orders import Order, Receipt, app, fulfil_order
from tenantflow.platform.provision import database_name
from tenantflow.runtime import Runtime
from tenantflow.settings import Settings
from tenantflow.store.records import RunStatus, StepKind
from tenantflow.worker.worker import Worker

TENANTS = ("acme", "globex")


def where(database_url: str) -> str:
    """A database's place, for people: a file, or a database name (never credentials)."""
    if database_url.startswith("sqlite:///"):
        return database_url.removeprefix("sqlite:///")
    return f"PostgreSQL database {database_name(database_url)}"


@dataclass
class TenantSummary:
    tenant: str
    runs: int = 0
    completed: int = 0
    failed: int = 0
    steps: int = 0
    retries: int = 0
    seconds: float = 0.0


async def run_demo(
    settings: Settings, *, orders: int = 25, console: Console | None = None
) -> list[TenantSummary]:
    console = console or Console()
    runtime = Runtime(settings)
    try:
        await runtime.queue.ping()  # a queue that does not answer: fail now, not hang
    except BaseException:
        await runtime.close()
        raise
    for tenant in TENANTS:
        runtime.registry.ensure(tenant, name=tenant.capitalize())
    worker = Worker(app, runtime)
    worker_task = asyncio.create_task(worker.run())
    started = time.monotonic()
    try:
        handles = await _submit(Client(app, runtime=runtime), orders)
        await _follow(handles, orders, console)
        summaries = await _summarise(handles, orders, time.monotonic() - started)
        places = [f"{t} in {where(runtime.registry.get(t).database_url)}" for t in TENANTS]
    finally:
        worker.stop()
        await worker_task
        await runtime.close()
    _print(console, summaries, places)
    return summaries


async def _submit(client: Client, orders: int) -> dict[str, list[RunHandle[Receipt]]]:
    batch = f"{int(time.time())}"
    handles: dict[str, list[RunHandle[Receipt]]] = {t: [] for t in TENANTS}
    for i in range(orders):
        for tenant in TENANTS:
            order = Order(
                order_id=f"{tenant}-{batch}-{i}",
                sku=f"SKU-{i % 7}",
                quantity=1 + i % 3,
                amount_cents=1999 + 100 * i,
            )
            handle = await client.tenant(tenant).start(
                fulfil_order.options(idempotency_key=order.order_id), order
            )
            handles[tenant].append(handle)
    return handles


async def _follow(
    handles: dict[str, list[RunHandle[Receipt]]], orders: int, console: Console
) -> None:
    """A progress bar per tenant, until every run has ended."""
    with Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars = {t: progress.add_task(t, total=orders) for t in TENANTS}
        pending = {t: list(h) for t, h in handles.items()}
        while any(pending.values()):
            for tenant, items in pending.items():
                still = [h for h in items if not (await h.status()).terminal]
                pending[tenant] = still
                progress.update(bars[tenant], completed=orders - len(still))
            await asyncio.sleep(0.1)


async def _summarise(
    handles: dict[str, list[RunHandle[Receipt]]], orders: int, elapsed: float
) -> list[TenantSummary]:
    summaries = []
    for tenant in TENANTS:
        summary = TenantSummary(tenant=tenant, runs=orders, seconds=elapsed)
        for handle in handles[tenant]:
            status = await handle.status()
            summary.completed += status is RunStatus.COMPLETED
            summary.failed += status is not RunStatus.COMPLETED
            for step in await handle.steps():
                if step.kind is StepKind.STEP:
                    summary.steps += 1
                    summary.retries += step.attempts - 1
        summaries.append(summary)
    return summaries


def _print(console: Console, summaries: list[TenantSummary], places: list[str]) -> None:
    table = Table(title="tenantflow demo: order fulfilment")
    for column in ("tenant", "runs", "completed", "failed", "steps", "retries", "time (s)"):
        table.add_column(column, justify="right" if column != "tenant" else "left")
    for s in summaries:
        table.add_row(
            s.tenant,
            str(s.runs),
            str(s.completed),
            str(s.failed),
            str(s.steps),
            str(s.retries),
            f"{s.seconds:.2f}",
        )
    console.print(table)
    console.print(f"Each tenant's runs live in its own database: {', '.join(places)}.")
    console.print("Try: tenantflow runs list --tenant acme")
