"""The run store in SQL, written once for SQLite and PostgreSQL (see ``store.db``); its
statements are named in ``queries.sql``."""

from __future__ import annotations

import calendar
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tenantflow.errors import (
    IdempotencyConflictError,
    QuotaExceededError,
    RunFinishedError,
    RunNotFoundError,
)
from tenantflow.serde import dumps, loads
from tenantflow.store import changes
from tenantflow.store.base import LeaseLost
from tenantflow.store.changes import CANCELLED_ERROR, fence
from tenantflow.store.db import Database, Tx
from tenantflow.store.queries import Q, Statement, fetch_all, fetch_one
from tenantflow.store.records import (
    TERMINAL,
    ChildState,
    Claim,
    ClaimOutcome,
    EventWait,
    Finished,
    Lease,
    NewRun,
    OutboxEntry,
    RunRecord,
    RunStatus,
    StepKind,
    StepRecord,
    StepStatus,
    SuspendOutcome,
    Wait,
    WaitKind,
)
from tenantflow.store.upkeep import Upkeep

# The filters ``list_runs`` takes, each a condition of ``queries.sql``.
LIST_FILTERS: tuple[tuple[str, Statement], ...] = (
    ("status", Q["list_runs_status"]),
    ("workflow", Q["list_runs_workflow"]),
    ("before", Q["list_runs_before"]),
)


def _next_month(now: float) -> float:
    """The start (UTC) of the month after the one ``now`` is in."""
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def _exhausted(
    recoveries: int, max_recoveries: int, deadline: float | None, now: float
) -> bytes | None:
    """Why a run may not go on (the error to end it with): recovered too often, or past its
    deadline."""
    if recoveries > max_recoveries:
        return dumps(
            {
                "type": "MaxRecoveryAttemptsExceededError",
                "message": f"the run was recovered {recoveries - 1} times after crashes; its "
                f"workflow allows {max_recoveries}",
            }
        )
    if deadline is not None and deadline <= now:
        return dumps(
            {
                "type": "WorkflowTimeoutError",
                "message": "the workflow did not finish within its timeout",
            }
        )
    return None


def _pending(
    run_id: str, seq: int, name: str, kind: StepKind, output: bytes, now: float
) -> StepRecord:
    """The checkpoint of a wait that has begun (an event, a child)."""
    return StepRecord(
        run_id=run_id,
        seq=seq,
        name=name,
        kind=kind,
        status=StepStatus.PENDING,
        output=output,
        error=None,
        attempts=1,
        started_at=now,
        finished_at=None,
    )


class SqlRunStore(Upkeep):
    """A tenant's runs in its own database. See :class:`tenantflow.store.base.RunStore`."""

    def __init__(self, tenant_id: str, db: Database) -> None:
        self.tenant_id = tenant_id
        self.db = db

    def _run(self, statement: Statement, row: Sequence[Any]) -> RunRecord:
        return RunRecord.from_row(self.tenant_id, row, statement.at)

    async def mark_compensable(self, run_id: str, *, lease: Lease, now: float) -> None:
        async with self.db.transaction() as tx:
            await changes.owned(tx, run_id, lease, now)
            await tx.run(Q["mark_compensable"], (run_id,))

    # -- runs --------------------------------------------------------------------------------

    async def create_run(
        self, run: NewRun, *, now: float, monthly_quota: int | None = None
    ) -> tuple[RunRecord, bool, tuple[OutboxEntry, ...]]:
        params = run.params(now)
        if self.db.dialect == "postgresql" and monthly_quota is None:
            statement = Q["create_run_pg"]
            inserted = await self.db.batched(statement, (*params, now))
            if inserted is not None:  # the new run is exactly what was inserted
                entry_id = int(inserted[statement.at["id"]])
                entry = OutboxEntry(
                    id=entry_id, run_id=run.id, priority=run.priority, trace=run.trace
                )
                return RunRecord.new(self.tenant_id, run, now), True, (entry,)
        else:
            async with self.db.transaction() as tx:
                statement = Q["insert_run_returning"]
                row = await tx.one(statement, params)
                if row is not None:
                    if monthly_quota is not None:
                        # Counted in the run's transaction: a refusal creates nothing, and
                        # concurrent submits queue on the counter's row.
                        await self._count_run(tx, now, monthly_quota)
                    entry = await changes.add_outbox(tx, run.id, run.priority, now)
                    return self._run(statement, row), True, (entry,)
        return await self._existing(run), False, ()

    @staticmethod
    async def _count_run(tx: Tx, now: float, quota: int) -> None:
        period = time.strftime("%Y-%m", time.gmtime(now))
        row = await fetch_one(tx, Q["count_run"], (period,))
        assert row is not None
        if int(row["runs"]) > quota:
            raise QuotaExceededError(
                f"the tenant's plan allows {quota} runs a month, all used",
                retry_after=_next_month(now) - now,
            )

    async def _existing(self, run: NewRun) -> RunRecord:
        """The run that already holds ``run``'s id or idempotency key, if it is the same
        request; an ``IdempotencyConflictError`` otherwise."""
        statement = Q["get_run_by_key"]
        async with self.db.autocommit() as tx:
            row = await tx.one(statement, (run.idempotency_key,))
        if row is None:
            raise IdempotencyConflictError(f"run id {run.id} is already taken")
        existing = self._run(statement, row)
        if existing.workflow != run.workflow or loads(existing.input) != loads(run.input):
            raise IdempotencyConflictError(
                f"idempotency key {run.idempotency_key!r} was used for run {existing.id} with "
                "a different workflow or input"
            )
        return existing

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self.db.autocommit() as tx:
            return await changes.read_run(tx, self.tenant_id, run_id)

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        given = {"status": status.value if status else None, "workflow": workflow, "before": before}
        asked = [
            (condition, given[key]) for key, condition in LIST_FILTERS if given[key] is not None
        ]
        filters = f"WHERE {' AND '.join(c for c, _ in asked)}" if asked else ""
        statement = Q["list_runs"]
        async with self.db.autocommit() as tx:
            rows = await tx.all(
                statement.fill(filters=filters),
                (*(value for _, value in asked), max(1, min(limit, 1000))),
            )
        return [self._run(statement, r) for r in rows]

    async def count_runs(self, *, status: RunStatus | None = None) -> int:
        async with self.db.autocommit() as tx:
            if status is None:
                row = await fetch_one(tx, Q["count_runs"])
            else:
                row = await fetch_one(tx, Q["count_runs_with_status"], (status.value,))
        return int(row["count"]) if row else 0

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        async with self.db.autocommit() as tx:
            return await self._steps(tx, run_id)

    @staticmethod
    async def _steps(tx: Tx, run_id: str) -> list[StepRecord]:
        statement = Q["steps_of_run"]
        return [StepRecord.from_row(r, statement.at) for r in await tx.all(statement, (run_id,))]

    # -- execution ---------------------------------------------------------------------------

    async def claim_run(self, run_id: str, *, owner: str, now: float, lease: float) -> Claim:
        # Not durable: a claim lost in a database crash leaves the run queued, its message
        # redelivered, and this worker's next write fenced (it no longer holds the lease).
        statement = Q["claim_queued"]
        row = await self.db.batched(
            statement, (owner, now + lease, now, now, now, run_id, now), durable=False
        )
        if row is None:
            return await self._claim_other(run_id, owner=owner, now=now, lease=lease)
        # The common case: a queued run.
        claimed = self._run(statement, row)
        steps: tuple[StepRecord, ...] = ()
        if claimed.executions > 1:  # it ran before (released, woken up): replay
            steps = tuple(await self.get_steps(run_id))
        return Claim(
            outcome=ClaimOutcome.CLAIMED,
            run=claimed,
            steps=steps,
            lease=Lease(owner=owner, attempt=claimed.executions),
        )

    async def _claim_other(self, run_id: str, *, owner: str, now: float, lease: float) -> Claim:
        """A claim of a run that is not simply queued: recovered, woken, exhausted, or not to
        be taken (yet)."""
        async with self.db.transaction() as tx:
            read = Q["claim_read"]
            row = await tx.one(read, (run_id,))
            if row is None:
                return Claim(outcome=ClaimOutcome.DROP)
            run = self._run(read, row)
            lease_until, timeout = row[read.at["lease_until"]], row[read.at["timeout"]]
            status = run.status
            if status in TERMINAL:
                return Claim(outcome=ClaimOutcome.DROP, run=run)
            if status is RunStatus.RUNNING and lease_until > now:
                # Held by a live worker. This delivery may be the very message of that run
                # (its visibility ended a moment before the lease): keep it until the lease
                # ends, so that if the holder dies this message recovers the run.
                return Claim(outcome=ClaimOutcome.DEFER, run=run, not_before=lease_until)
            if status in (RunStatus.SLEEPING, RunStatus.WAITING):
                if run.wake_at is None:
                    return Claim(outcome=ClaimOutcome.DROP, run=run)
                if run.wake_at > now:
                    return Claim(outcome=ClaimOutcome.DEFER, run=run, not_before=run.wake_at)
            recoveries = run.recoveries + (1 if status is RunStatus.RUNNING else 0)
            deadline = run.deadline
            if deadline is None and timeout is not None:
                deadline = now + timeout
            failure = _exhausted(recoveries, row[read.at["max_recoveries"]], deadline, now)
            if failure is not None:
                wake = await changes.finish(tx, run_id, RunStatus.FAILED, None, failure, now)
                return Claim(
                    outcome=ClaimOutcome.EXHAUSTED,
                    run=await changes.read_run(tx, self.tenant_id, run_id),
                    wake=tuple(wake),
                )
            claim = Q["claim"]
            params = (owner, now + lease, recoveries, now, deadline, now, run_id)
            taken = await tx.one(claim, params)
            assert taken is not None
            steps = tuple(await self._steps(tx, run_id))
        claimed = self._run(claim, taken)
        return Claim(
            outcome=ClaimOutcome.CLAIMED,
            run=claimed,
            steps=steps,
            recovered=status is RunStatus.RUNNING,
            lease=Lease(owner=owner, attempt=claimed.executions),
        )

    async def renew_leases(
        self, leases: Mapping[str, Lease], *, until: float
    ) -> tuple[set[str], set[str]]:
        if not leases:
            return set(), set()
        statement = Q["renew_leases"]
        params = (until, *(p for run_id, lease in leases.items() for p in (run_id, *fence(lease))))
        async with self.db.transaction() as tx:
            rows = await fetch_all(tx, statement, params, text=statement.many(len(leases)))
        ours = {r["id"] for r in rows}
        return {r["id"] for r in rows if r["cancel_requested"]}, set(leases) - ours

    async def record_step(self, step: StepRecord, *, lease: Lease) -> bool:
        now = step.finished_at or step.started_at
        if self.db.dialect == "postgresql":
            statement = Q["record_step_pg"]
            row = await self.db.batched(
                statement, (now, step.run_id, *fence(lease), *step.params())
            )
            if row is None:
                raise LeaseLost(step.run_id)
            return bool(row[statement.at["cancel_requested"]])
        async with self.db.transaction() as tx:
            cancel = await changes.owned(tx, step.run_id, lease, now)
            await tx.run(Q["upsert_step"], step.params())
        return cancel

    async def wait_event(
        self, run_id: str, seq: int, name: str, deadline: float | None, *, lease: Lease, now: float
    ) -> EventWait:
        async with self.db.transaction() as tx:
            await changes.owned(tx, run_id, lease, now)
            row = await fetch_one(tx, Q["step_output"], (run_id, seq))
            if row is None:
                pending = _pending(run_id, seq, name, StepKind.EVENT, dumps(deadline), now)
                await tx.run(Q["upsert_step"], pending.params())
            else:
                deadline = loads(row["output"])
            event = await fetch_one(tx, Q["next_event"], (run_id, name))
            if event is not None:
                payload = bytes(event["payload"])
                await tx.run(Q["consume_event"], (seq, event["id"]))
                await tx.run(Q["receive_event_step"], (payload, now, run_id, seq))
                return EventWait(received=True, payload=payload)
            if deadline is not None and deadline <= now:
                await tx.run(Q["time_out_event_step"], (now, run_id, seq))
                return EventWait(received=False, timed_out=True)
            return EventWait(received=False, deadline=deadline)

    async def start_child(
        self, parent_id: str, seq: int, child: NewRun, *, lease: Lease, now: float
    ) -> ChildState:
        async with self.db.transaction() as tx:
            await changes.owned(tx, parent_id, lease, now)
            pending = _pending(parent_id, seq, child.workflow, StepKind.CHILD, dumps(child.id), now)
            await tx.run(Q["insert_step_once"], pending.params())
            inserted = dataclasses.replace(child, idempotency_key=None, parent_id=parent_id)
            created = await tx.one(Q["insert_child"], inserted.params(now))
            wake = [await changes.add_outbox(tx, child.id, child.priority, now)] if created else []
            state = await changes.child_state(tx, child.id)
            if state.status in TERMINAL:
                failed = state.status is not RunStatus.COMPLETED
                await tx.run(
                    Q["end_child_step"],
                    (
                        (StepStatus.FAILED if failed else StepStatus.COMPLETED).value,
                        state.result,
                        state.error or (CANCELLED_ERROR if failed else None),
                        now,
                        parent_id,
                        seq,
                    ),
                )
        return dataclasses.replace(state, wake=tuple(wake))

    async def suspend_run(
        self, run_id: str, wait: Wait, *, lease: Lease, now: float
    ) -> SuspendOutcome:
        async with self.db.transaction() as tx:
            child_done = False
            if wait.kind is WaitKind.CHILD and wait.child_id is not None:
                # Lock the child's row before the parent's, the order in which the child's end
                # takes them: a child ending right now is seen ended here, or sees its parent
                # waiting and wakes it. Either way no wake-up is lost, and no deadlock.
                row = await fetch_one(tx, Q["child_status_shared"], (wait.child_id,))
                child_done = row is not None and RunStatus(row["status"]) in TERMINAL
            # The run's own row is locked next: an event sent meanwhile waits for this
            # transaction, then finds the run waiting and wakes it.
            if await changes.owned(tx, run_id, lease, now):
                return SuspendOutcome.CANCEL
            if child_done:
                return SuspendOutcome.READY
            if wait.kind is WaitKind.EVENT and await tx.one(
                Q["next_event"], (run_id, wait.event_name)
            ):
                return SuspendOutcome.READY
            status = RunStatus.SLEEPING if wait.kind is WaitKind.SLEEP else RunStatus.WAITING
            await tx.run(Q["suspend"], (status.value, wait.wake_at, now, run_id))
        return SuspendOutcome.SUSPENDED

    async def release_run(
        self,
        run_id: str,
        *,
        lease: Lease,
        now: float,
        stuck_reason: str | None = None,
        step: StepRecord | None = None,
    ) -> None:
        async with self.db.transaction() as tx:
            released = await tx.run(Q["release"], (stuck_reason, now, run_id, *fence(lease)))
            if released and step is not None:
                await tx.run(Q["upsert_step"], step.params())

    async def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        *,
        result: bytes | None,
        error: bytes | None,
        lease: Lease,
        now: float,
        step: StepRecord | None = None,
    ) -> Finished:
        finish = (status.value, result, error, now, now, run_id, *fence(lease))
        cancels = status in (RunStatus.CANCELLED, RunStatus.COMPENSATED)
        if not cancels and await self._finish_alone(finish, step):
            return Finished()  # no children to cancel, no parent to wake
        async with self.db.transaction() as tx:
            if cancels:
                await changes.lock_descendants(tx, run_id)
            await changes.owned(tx, run_id, lease, now)
            if step is not None:
                await tx.run(Q["upsert_step"], step.params())
            wake = await changes.finish(tx, run_id, status, result, error, now)
        return Finished(wake=tuple(wake))

    async def _finish_alone(self, finish: tuple[Any, ...], step: StepRecord | None) -> bool:
        """The end of a run without a parent, fenced, in one statement (PostgreSQL, in the
        group commit) or a short transaction; False: it has a parent (or the lease is lost),
        for the general transaction to settle."""
        if self.db.dialect == "postgresql":
            if step is None:
                return await self.db.batched(Q["finish_owned"], finish) is not None
            statement = Q["finish_with_step_pg"]
            return await self.db.batched(statement, (*finish, *step.params())) is not None
        async with self.db.transaction() as tx:
            if await tx.one(Q["finish_owned"], finish) is None:
                return False
            if step is not None:
                await tx.run(Q["upsert_step"], step.params())
        return True

    # -- control from clients ----------------------------------------------------------------

    async def request_cancel(self, run_id: str, *, now: float) -> tuple[RunRecord, Finished]:
        async with self.db.transaction() as tx:
            await changes.lock_descendants(tx, run_id)
            lock = Q["lock_run"]
            row = await tx.one(lock, (run_id,))
            if row is None:
                raise RunNotFoundError(f"no run {run_id} in this tenant")
            run = self._run(lock, row)
            if run.status in TERMINAL:
                raise RunFinishedError(run_id, run.status.value, "it cannot be cancelled")
            first = not run.cancel_requested
            if first:
                await tx.run(Q["request_cancel"], (now, run_id))
            wake: list[OutboxEntry] = []
            if run.status is RunStatus.RUNNING:
                pass  # its worker stops it at the next step boundary
            elif run.compensable:
                # A saga with nobody running it: wake it, so that a worker replays it and runs
                # its compensations before it ends. Only once: asked again, it may be between
                # two compensations (a durable wait) that must not be cut short.
                if first:
                    wake = [await changes.requeue(tx, run_id, now)]
            else:
                wake = await changes.finish(
                    tx, run_id, RunStatus.CANCELLED, None, CANCELLED_ERROR, now
                )
            run = await changes.read_run(tx, self.tenant_id, run_id) or run
        return run, Finished(wake=tuple(wake))

    async def send_event(self, run_id: str, name: str, payload: bytes, *, now: float) -> Finished:
        async with self.db.transaction() as tx:
            row = await fetch_one(tx, Q["lock_run_status"], (run_id,))
            if row is None:
                raise RunNotFoundError(f"no run {run_id} in this tenant")
            if RunStatus(row["status"]) in TERMINAL:
                raise RunFinishedError(run_id, row["status"], "it takes no events")
            await tx.run(Q["insert_event"], (run_id, name, payload, now))
            wake = await changes.wake(tx, run_id, now)
        return Finished(wake=tuple(wake))

    async def cancel_requested(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        statement = Q["cancel_requested"]
        async with self.db.autocommit() as tx:
            rows = await fetch_all(tx, statement, tuple(run_ids), text=statement.many(len(run_ids)))
        return {r["id"] for r in rows}

    async def close(self) -> None:
        await self.db.close()
