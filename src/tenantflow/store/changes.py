"""Changes that several operations of the run store make inside their transaction: the fence,
outbox records, waking a parent, ending a run and cancelling its children."""

from __future__ import annotations

from tenantflow.serde import dumps
from tenantflow.store.base import LeaseLost
from tenantflow.store.db import Tx
from tenantflow.store.queries import Q, fetch_all, fetch_one
from tenantflow.store.records import ChildState, Lease, OutboxEntry, RunRecord, RunStatus

CANCELLED_ERROR = dumps({"type": "RunCancelledError", "message": "the run was cancelled"})


def fence(lease: Lease) -> tuple[str, int]:
    """The parameters of ``owned`` (``queries.sql``)."""
    return lease.owner, lease.attempt


async def owned(tx: Tx, run_id: str, lease: Lease, now: float) -> bool:
    """Fence: the run is still ours, in this attempt (its row locked until the transaction
    ends). Returns whether its cancellation was requested."""
    statement = Q["touch_owned"]  # once a checkpoint (SQLite): its row read through ``at``
    row = await tx.one(statement, (now, run_id, *fence(lease)))
    if row is None:
        raise LeaseLost(run_id)
    return bool(row[statement.at["cancel_requested"]])


async def add_outbox(tx: Tx, run_id: str, priority: int, now: float) -> OutboxEntry:
    statement = Q["insert_outbox"]  # once a submit (SQLite): its row read through ``at``
    row = await tx.one(statement, (priority, now, run_id))
    assert row is not None
    at = statement.at
    return OutboxEntry(
        id=int(row[at["id"]]), run_id=run_id, priority=priority, trace=row[at["trace"]]
    )


async def wake(tx: Tx, run_id: str, now: float) -> list[OutboxEntry]:
    """A waiting run becomes queued again, with a message to publish."""
    row = await fetch_one(tx, Q["wake"], (now, run_id))
    return [await add_outbox(tx, run_id, row["priority"], now)] if row else []


async def finish(
    tx: Tx,
    run_id: str,
    status: RunStatus,
    result: bytes | None,
    error: bytes | None,
    now: float,
) -> list[OutboxEntry]:
    """End the run (its children too, if it is cancelled), waking its parent."""
    row = await fetch_one(tx, Q["finish"], (status.value, result, error, now, now, run_id))
    if status in (RunStatus.CANCELLED, RunStatus.COMPENSATED):
        await cancel_children(tx, run_id, now)
    parent_id = row["parent_id"] if row else None
    return await wake(tx, parent_id, now) if parent_id else []


async def cancel_children(tx: Tx, run_id: str, now: float) -> None:
    for child in await fetch_all(tx, Q["open_children"], (run_id,)):
        child_id, status = child["id"], child["status"]
        await tx.run(Q["flag_cancel"], (child_id,))
        if child["compensable"] and status != RunStatus.RUNNING:
            # A saga: a worker must replay it to run its compensations.
            await requeue(tx, child_id, now)
        elif status != RunStatus.RUNNING:
            # Nobody runs it: cancel it here. Its parent is the run being cancelled, so
            # there is no one to wake; its own children follow recursively.
            cancelled = (RunStatus.CANCELLED.value, None, CANCELLED_ERROR, now, now, child_id)
            await tx.run(Q["finish"], cancelled)
            await cancel_children(tx, child_id, now)


async def requeue(tx: Tx, run_id: str, now: float) -> OutboxEntry:
    """Make a run not held by a worker queued again now, with its outbox record."""
    row = await fetch_one(tx, Q["requeue"], (now, run_id))
    return await add_outbox(tx, run_id, int(row["priority"]) if row else 0, now)


async def lock_descendants(tx: Tx, run_id: str) -> None:
    """Before cancelling a run: lock its descendants, deepest first, then (the caller) the
    run. A child's end locks the child, then its parent; taking the same order here means a
    cancel and a child ending never deadlock."""
    await tx.all(Q["lock_descendants"], (run_id,))


async def read_run(tx: Tx, tenant_id: str, run_id: str) -> RunRecord | None:
    statement = Q["get_run"]
    row = await tx.one(statement, (run_id,))
    return RunRecord.from_row(tenant_id, row, statement.at) if row else None


async def child_state(tx: Tx, child_id: str) -> ChildState:
    row = await fetch_one(tx, Q["child_state"], (child_id,))
    assert row is not None
    return ChildState(
        child_id=child_id,
        status=RunStatus(row["status"]),
        result=None if row["result"] is None else bytes(row["result"]),
        error=None if row["error"] is None else bytes(row["error"]),
    )
