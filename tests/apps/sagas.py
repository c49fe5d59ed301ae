"""A saga the tests break in every way: a transfer between two accounts of a ledger kept in
the effects database (``tests.apps.effects``), where every entry has a unique key, so each
debit, credit and compensation takes effect at most once."""

from __future__ import annotations

import asyncio
import os

from tenantflow import App, RetryPolicy, WorkflowContext
from tests.apps import effects

app = App("saga-tests")

UNDO_SECONDS = float(os.environ.get("TENANTFLOW_TEST_UNDO_SECONDS", "0"))
ONCE = RetryPolicy(max_attempts=1)


class Injected(RuntimeError):
    """A failure the test asked for."""


def create_ledger() -> None:
    effects.execute(
        "CREATE TABLE IF NOT EXISTS ledger (key TEXT PRIMARY KEY, account TEXT NOT NULL, "
        "delta INTEGER NOT NULL)"
    )
    effects.applied()  # the effects tables too, before workers race to create them


def _entry(key: str, account: str, delta: int) -> None:
    effects.execute(
        "INSERT INTO ledger (key, account, delta) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (key, account, delta),
    )


def _undo(key: str, undo_key: str) -> None:
    """Reverse the entry ``key`` once, if it exists (nothing to undo is a success)."""
    effects.execute(
        "INSERT INTO ledger (key, account, delta) SELECT ?, account, -delta FROM ledger "
        "WHERE key = ? ON CONFLICT DO NOTHING",
        (undo_key, key),
    )
    effects.record(undo_key, "undo")  # every execution, to count them


@app.step(retry=ONCE)
async def debit(transfer: str, account: str, amount: int, fail: str) -> None:
    if fail == "debit-before":
        raise Injected("debit refused")
    _entry(f"{transfer}:debit", account, -amount)
    if fail == "debit-slow":
        await asyncio.sleep(30)  # cancelled while it runs
    if fail == "debit-after":
        raise Injected("debit applied, then the answer was lost")


@app.step(retry=ONCE, timeout=0.3)
async def credit(transfer: str, account: str, amount: int, fail: str) -> None:
    if fail == "credit-before":
        raise Injected("credit refused")
    _entry(f"{transfer}:credit", account, amount)
    if fail == "credit-after":
        raise Injected("credit applied, then the answer was lost")
    if fail == "credit-timeout":
        await asyncio.sleep(5)  # applied, but the step times out: an ambiguous outcome


@app.step(retry=ONCE)
async def notify(transfer: str, fail: str) -> None:
    if fail == "notify":
        raise Injected("the notification failed")


@app.step(retry=RetryPolicy(max_attempts=3, initial_interval=0.01))
async def undo_debit(transfer: str) -> None:
    if UNDO_SECONDS:
        await asyncio.sleep(UNDO_SECONDS)  # long enough to be killed in
    _undo(f"{transfer}:debit", f"{transfer}:undo-debit")


@app.step(retry=RetryPolicy(max_attempts=3, initial_interval=0.01))
async def undo_credit(transfer: str, fail: str) -> None:
    if fail == "undo-credit-late":
        raise Injected("the compensation cannot reach the bank")
    _undo(f"{transfer}:credit", f"{transfer}:undo-credit")


@app.workflow
async def transfer(
    ctx: WorkflowContext, transfer_id: str, source: str, target: str, amount: int, fail: str = ""
) -> str:
    async with ctx.saga() as saga:
        saga.compensate(undo_debit, transfer_id)
        await debit(transfer_id, source, amount, fail)
        saga.compensate(undo_credit, transfer_id, fail)
        await credit(transfer_id, target, amount, fail)
        if fail == "wait":
            await ctx.wait_for_event("go", timeout=60)  # cancelled while waiting
        if fail == "undo-credit-late":
            raise Injected("failed late")
        await saga.pivot(notify, transfer_id, fail)
        if fail == "after-pivot":
            raise Injected("failed past the pivot")
    return "done"
