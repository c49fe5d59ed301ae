"""The run store in SQL, written once for SQLite and PostgreSQL (see ``store.db``)."""

from __future__ import annotations

import calendar
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
from tenantflow.store.base import LeaseLost
from tenantflow.store.db import Database, Row, Tx
from tenantflow.store.records import (
    TERMINAL,
    ChildState,
    Claim,
    ClaimOutcome,
    EventWait,
    ExpectedMessage,
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

# -- statements (the hot path first) -------------------------------------------------------

RUN_COLUMNS = (
    "id, workflow, status, input, result, error, idempotency_key, parent_id, priority, "
    "created_at, updated_at, started_at, finished_at, deadline, wake_at, recoveries, "
    "executions, cancel_requested, compensable, stuck_reason"
)
RUN_WIDTH = RUN_COLUMNS.count(",") + 1  # columns read after them follow at this index
STEP_COLUMNS = "run_id, seq, name, kind, status, output, error, attempts, started_at, finished_at"

# The fence: the run is executed under this lease, its owner and its attempt (``executions``,
# which every claim increments). Checked by the very statement that writes, or first in the
# transaction, whose row lock then holds it.
OWNED = "lease_owner = ? AND executions = ? AND status = 'running'"
SQL_TOUCH_OWNED = (
    f"UPDATE runs SET updated_at = ? WHERE id = ? AND {OWNED} RETURNING cancel_requested"
)
SQL_INSERT_STEP = f"INSERT INTO steps ({STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
SQL_UPSERT_STEP = (
    f"{SQL_INSERT_STEP} ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status, "
    "output = excluded.output, error = excluded.error, attempts = excluded.attempts, "
    "finished_at = excluded.finished_at"
)
SQL_INSERT_RUN = (
    "INSERT INTO runs (id, workflow, status, input, idempotency_key, parent_id, priority, "
    "timeout, max_recoveries, created_at, updated_at, trace) "
    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The record carries the run's trace context (its origin's traceparent) to the message.
SQL_INSERT_OUTBOX = (
    "INSERT INTO outbox (run_id, priority, created_at, trace) "
    "SELECT id, ?, ?, trace FROM runs WHERE id = ? RETURNING id, trace"
)
SQL_GET_RUN = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"
SQL_CLAIM_READ = (
    f"SELECT {RUN_COLUMNS}, lease_until, timeout, max_recoveries FROM runs WHERE id = ? "
    "{for_update}"
)
SQL_CLAIM = (
    "UPDATE runs SET status = 'running', lease_owner = ?, lease_until = ?, recoveries = ?, "
    "executions = executions + 1, started_at = COALESCE(started_at, ?), deadline = ?, "
    f"wake_at = NULL, stuck_reason = NULL, updated_at = ? WHERE id = ? RETURNING {RUN_COLUMNS}"
)
SQL_STEPS_OF_RUN = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq"
SQL_FINISH = (
    "UPDATE runs SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?, "
    "lease_owner = NULL, lease_until = NULL, wake_at = NULL WHERE id = ? RETURNING parent_id"
)
_UNFINISHED = ", ".join(f"'{s.value}'" for s in RunStatus if s not in TERMINAL)
SQL_WAKE = (
    "UPDATE runs SET status = 'queued', wake_at = NULL, updated_at = ? "
    "WHERE id = ? AND status = 'waiting' RETURNING id, priority"
)
SQL_OPEN_CHILDREN = (
    "SELECT id, status, compensable FROM runs WHERE parent_id = ? "
    "AND status NOT IN ('completed', 'failed', 'cancelled', 'compensated', 'needs_attention')"
)
# Child ids extend their parent's ("{parent}.{seq}"), so descending id order is deepest first.
SQL_LOCK_DESCENDANTS = (
    "WITH RECURSIVE tree(id) AS (SELECT id FROM runs WHERE parent_id = ? "
    "UNION SELECT r.id FROM runs r JOIN tree t ON r.parent_id = t.id) "
    "SELECT id FROM runs WHERE id IN (SELECT id FROM tree) ORDER BY id DESC {for_update}"
)
SQL_NEXT_EVENT = (
    "SELECT id, payload FROM events WHERE run_id = ? AND name = ? AND consumed_seq IS NULL "
    "ORDER BY id LIMIT 1"
)
SQL_CHILD_STATE = "SELECT status, result, error FROM runs WHERE id = ?"

# Fast paths: one statement (one round trip, one implicit transaction) for the common case;
# the general transaction handles everything else.
SQL_CREATE_PG = (
    f"WITH ins AS ({SQL_INSERT_RUN} ON CONFLICT DO NOTHING RETURNING id, priority, trace), "
    "ob AS (INSERT INTO outbox (run_id, priority, created_at, trace) "
    "SELECT id, priority, ?, trace FROM ins RETURNING id) "
    "SELECT ob.id FROM ob"
)
SQL_COUNT_RUN = (
    "INSERT INTO usage (period, runs) VALUES (?, 1) "
    "ON CONFLICT (period) DO UPDATE SET runs = usage.runs + 1 RETURNING runs"
)
SQL_CLAIM_QUEUED = (
    "UPDATE runs SET status = 'running', lease_owner = ?, lease_until = ?, "
    "executions = executions + 1, started_at = COALESCE(started_at, ?), "
    "deadline = COALESCE(deadline, ? + timeout), wake_at = NULL, stuck_reason = NULL, "
    "updated_at = ? WHERE id = ? AND status = 'queued' AND (deadline IS NULL OR deadline > ?) "
    f"RETURNING {RUN_COLUMNS}"
)


def _insert_step_from(source: str) -> str:
    """PostgreSQL: insert a step checkpoint only if ``source`` (a CTE) returned a row."""
    return (
        f"INSERT INTO steps ({STEP_COLUMNS}) SELECT ?::text, ?::int, ?::text, ?::text, "
        f"?::text, ?::bytea, ?::bytea, ?::int, ?::float8, ?::float8 FROM {source} "
        "ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status, "
        "output = excluded.output, error = excluded.error, attempts = excluded.attempts, "
        "finished_at = excluded.finished_at RETURNING 1"
    )


SQL_RECORD_STEP_PG = (
    f"WITH owned AS ({SQL_TOUCH_OWNED}), "
    f"ins AS ({_insert_step_from('owned')}) SELECT cancel_requested FROM owned"
)
SQL_FINISH_OWNED = (
    "UPDATE runs SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?, "
    "lease_owner = NULL, lease_until = NULL, wake_at = NULL "
    f"WHERE id = ? AND {OWNED} AND parent_id IS NULL RETURNING id"
)
SQL_RELEASE = (
    "UPDATE runs SET status = 'queued', lease_owner = NULL, lease_until = NULL, "
    f"stuck_reason = ?, updated_at = ? WHERE id = ? AND {OWNED}"
)

SQL_FINISH_WITH_STEP_PG = (
    f"WITH fin AS ({SQL_FINISH_OWNED}), ins AS ({_insert_step_from('fin')}) SELECT id FROM fin"
)

# A waiting run without a wake-up (an event without a timeout, a child) is woken by what it
# waits for, whose change enqueues it: it expects no message.
SQL_EXPECTED_MESSAGES = (
    "SELECT id, priority, trace, CASE status WHEN 'queued' THEN NULL "
    "WHEN 'running' THEN lease_until ELSE wake_at END FROM runs "
    "WHERE (status IN ('queued', 'running') "
    "OR (status IN ('sleeping', 'waiting') AND wake_at IS NOT NULL)) AND id > ? "
    "ORDER BY id LIMIT ?"
)

CANCELLED_ERROR = dumps({"type": "RunCancelledError", "message": "the run was cancelled"})


def _next_month(now: float) -> float:
    """The start (UTC) of the month after the one ``now`` is in."""
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def _run(tenant_id: str, row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=row[0],
        tenant_id=tenant_id,
        workflow=row[1],
        status=RunStatus(row[2]),
        input=bytes(row[3]),
        result=_bytes(row[4]),
        error=_bytes(row[5]),
        idempotency_key=row[6],
        parent_id=row[7],
        priority=row[8],
        created_at=row[9],
        updated_at=row[10],
        started_at=row[11],
        finished_at=row[12],
        deadline=row[13],
        wake_at=row[14],
        recoveries=row[15],
        executions=row[16],
        cancel_requested=bool(row[17]),
        compensable=bool(row[18]),
        stuck_reason=row[19],
    )


def _new_record(tenant_id: str, run: NewRun, now: float) -> RunRecord:
    return RunRecord(
        id=run.id,
        tenant_id=tenant_id,
        workflow=run.workflow,
        status=RunStatus.QUEUED,
        input=run.input,
        result=None,
        error=None,
        idempotency_key=run.idempotency_key,
        parent_id=run.parent_id,
        priority=run.priority,
        created_at=now,
        updated_at=now,
        started_at=None,
        finished_at=None,
        deadline=None,
        wake_at=None,
        recoveries=0,
        executions=0,
        cancel_requested=False,
    )


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _step(row: Sequence[Any]) -> StepRecord:
    return StepRecord(
        run_id=row[0],
        seq=row[1],
        name=row[2],
        kind=StepKind(row[3]),
        status=StepStatus(row[4]),
        output=_bytes(row[5]),
        error=_bytes(row[6]),
        attempts=row[7],
        started_at=row[8],
        finished_at=row[9],
    )


def _step_params(s: StepRecord) -> tuple[Any, ...]:
    return (
        s.run_id,
        s.seq,
        s.name,
        s.kind.value,
        s.status.value,
        s.output,
        s.error,
        s.attempts,
        s.started_at,
        s.finished_at,
    )


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _fence(lease: Lease) -> tuple[str, int]:
    """The parameters of ``OWNED``."""
    return lease.owner, lease.attempt


class SqlRunStore:
    """A tenant's runs in its own database. See :class:`tenantflow.store.base.RunStore`."""

    def __init__(self, tenant_id: str, db: Database) -> None:
        self.tenant_id = tenant_id
        self.db = db

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    async def _owned(tx: Tx, run_id: str, lease: Lease, now: float) -> bool:
        """Fence: the run is still ours, in this attempt (its row locked until the transaction
        ends). Returns whether its cancellation was requested."""
        row = await tx.one(SQL_TOUCH_OWNED, (now, run_id, *_fence(lease)))
        if row is None:
            raise LeaseLost(run_id)
        return bool(row[0])

    @staticmethod
    async def _outbox(tx: Tx, run_id: str, priority: int, now: float) -> OutboxEntry:
        row = await tx.one(SQL_INSERT_OUTBOX, (priority, now, run_id))
        assert row is not None
        return OutboxEntry(id=int(row[0]), run_id=run_id, priority=priority, trace=row[1])

    async def _wake(self, tx: Tx, run_id: str, now: float) -> list[OutboxEntry]:
        """A waiting run becomes queued again, with a message to publish."""
        row = await tx.one(SQL_WAKE, (now, run_id))
        return [await self._outbox(tx, run_id, row[1], now)] if row else []

    async def _finish(
        self,
        tx: Tx,
        run_id: str,
        status: RunStatus,
        result: bytes | None,
        error: bytes | None,
        now: float,
    ) -> list[OutboxEntry]:
        row = await tx.one(SQL_FINISH, (status.value, result, error, now, now, run_id))
        wake: list[OutboxEntry] = []
        if status in (RunStatus.CANCELLED, RunStatus.COMPENSATED):
            await self._cancel_children(tx, run_id, now)
        parent_id = row[0] if row else None
        if parent_id:
            wake.extend(await self._wake(tx, parent_id, now))
        return wake

    async def _cancel_children(self, tx: Tx, run_id: str, now: float) -> None:
        for child_id, status, compensable in await tx.all(SQL_OPEN_CHILDREN, (run_id,)):
            await tx.run("UPDATE runs SET cancel_requested = TRUE WHERE id = ?", (child_id,))
            if compensable and status != RunStatus.RUNNING:
                # A saga: a worker must replay it to run its compensations.
                await self._requeue(tx, child_id, now)
            elif status != RunStatus.RUNNING:
                # Nobody runs it: cancel it here. Its parent is the run being cancelled, so
                # there is no one to wake; its own children follow recursively.
                await tx.run(SQL_FINISH, ("cancelled", None, CANCELLED_ERROR, now, now, child_id))
                await self._cancel_children(tx, child_id, now)

    async def _requeue(self, tx: Tx, run_id: str, now: float) -> OutboxEntry:
        """Make a run not held by a worker queued again now, with its outbox record."""
        row = await tx.one(
            "UPDATE runs SET status = 'queued', wake_at = NULL, updated_at = ? WHERE id = ? "
            "RETURNING priority",
            (now, run_id),
        )
        return await self._outbox(tx, run_id, int(row[0]) if row else 0, now)

    async def mark_compensable(self, run_id: str, *, lease: Lease, now: float) -> None:
        async with self.db.transaction() as tx:
            await self._owned(tx, run_id, lease, now)
            await tx.run("UPDATE runs SET compensable = TRUE WHERE id = ?", (run_id,))

    @staticmethod
    async def _lock_descendants(tx: Tx, run_id: str) -> None:
        """Before cancelling a run: lock its descendants, deepest first, then (the caller) the
        run. A child's end locks the child, then its parent; taking the same order here means
        a cancel and a child ending never deadlock."""
        await tx.all(SQL_LOCK_DESCENDANTS, (run_id,))

    async def _get(self, tx: Tx, run_id: str) -> RunRecord | None:
        row = await tx.one(SQL_GET_RUN, (run_id,))
        return _run(self.tenant_id, row) if row else None

    # -- runs --------------------------------------------------------------------------------

    async def create_run(
        self, run: NewRun, *, now: float, monthly_quota: int | None = None
    ) -> tuple[RunRecord, bool, tuple[OutboxEntry, ...]]:
        params = (
            run.id,
            run.workflow,
            run.input,
            run.idempotency_key,
            run.parent_id,
            run.priority,
            run.timeout,
            run.max_recoveries,
            now,
            now,
            run.trace,
        )
        if self.db.dialect == "postgresql" and monthly_quota is None:
            inserted = await self.db.batched(SQL_CREATE_PG, (*params, now))
            if inserted is not None:  # the new run is exactly what was inserted
                entry = OutboxEntry(
                    id=int(inserted[0]), run_id=run.id, priority=run.priority, trace=run.trace
                )
                return _new_record(self.tenant_id, run, now), True, (entry,)
        else:
            async with self.db.transaction() as tx:
                inserted = await tx.one(
                    f"{SQL_INSERT_RUN} ON CONFLICT DO NOTHING RETURNING {RUN_COLUMNS}", params
                )
                if inserted is not None:
                    if monthly_quota is not None:
                        # Counted in the run's transaction: a refusal creates nothing, and
                        # concurrent submits queue on the counter's row.
                        await self._count_run(tx, now, monthly_quota)
                    entry = await self._outbox(tx, run.id, run.priority, now)
                    return _run(self.tenant_id, inserted), True, (entry,)
        return await self._existing(run), False, ()

    @staticmethod
    async def _count_run(tx: Tx, now: float, quota: int) -> None:
        period = time.strftime("%Y-%m", time.gmtime(now))
        row = await tx.one(SQL_COUNT_RUN, (period,))
        assert row is not None
        if int(row[0]) > quota:
            raise QuotaExceededError(
                f"the tenant's plan allows {quota} runs a month, all used",
                retry_after=_next_month(now) - now,
            )

    async def _existing(self, run: NewRun) -> RunRecord:
        """The run that already holds ``run``'s id or idempotency key, if it is the same
        request; an ``IdempotencyConflictError`` otherwise."""
        async with self.db.autocommit() as tx:
            row = await tx.one(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE idempotency_key = ?",
                (run.idempotency_key,),
            )
        if row is None:
            raise IdempotencyConflictError(f"run id {run.id} is already taken")
        existing = _run(self.tenant_id, row)
        if existing.workflow != run.workflow or loads(existing.input) != loads(run.input):
            raise IdempotencyConflictError(
                f"idempotency key {run.idempotency_key!r} was used for run {existing.id} with "
                "a different workflow or input"
            )
        return existing

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self.db.autocommit() as tx:
            return await self._get(tx, run_id)

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (
            ("status = ?", status.value if status else None),
            ("workflow = ?", workflow),
            ("id < ?", before),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        async with self.db.autocommit() as tx:
            rows = await tx.all(
                f"SELECT {RUN_COLUMNS} FROM runs {condition} ORDER BY id DESC LIMIT ?",
                (*params, max(1, min(limit, 1000))),
            )
        return [_run(self.tenant_id, r) for r in rows]

    async def count_runs(self, *, status: RunStatus | None = None) -> int:
        async with self.db.autocommit() as tx:
            if status is None:
                row = await tx.one("SELECT COUNT(*) FROM runs")
            else:
                row = await tx.one("SELECT COUNT(*) FROM runs WHERE status = ?", (status.value,))
        return int(row[0]) if row else 0

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        async with self.db.autocommit() as tx:
            return [_step(r) for r in await tx.all(SQL_STEPS_OF_RUN, (run_id,))]

    # -- execution ---------------------------------------------------------------------------

    async def claim_run(self, run_id: str, *, owner: str, now: float, lease: float) -> Claim:
        # Not durable: a claim lost in a database crash leaves the run queued, its message
        # redelivered, and this worker's next write fenced (it no longer holds the lease).
        row = await self.db.batched(
            SQL_CLAIM_QUEUED, (owner, now + lease, now, now, now, run_id, now), durable=False
        )
        if row is not None:  # the common case: a queued run
            claimed = _run(self.tenant_id, row)
            steps: tuple[StepRecord, ...] = ()
            if claimed.executions > 1:  # it ran before (released, woken up): replay
                steps = tuple(await self.get_steps(run_id))
            return Claim(
                outcome=ClaimOutcome.CLAIMED,
                run=claimed,
                steps=steps,
                lease=Lease(owner=owner, attempt=claimed.executions),
            )
        async with self.db.transaction() as tx:
            row = await tx.one(SQL_CLAIM_READ, (run_id,))
            if row is None:
                return Claim(outcome=ClaimOutcome.DROP)
            run = _run(self.tenant_id, row)
            lease_until, timeout, max_recoveries = row[RUN_WIDTH : RUN_WIDTH + 3]
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
            failure: dict[str, str] | None = None
            if recoveries > max_recoveries:
                failure = {
                    "type": "MaxRecoveryAttemptsExceededError",
                    "message": f"the run was recovered {recoveries - 1} times after "
                    f"crashes; its workflow allows {max_recoveries}",
                }
            elif deadline is not None and deadline <= now:
                failure = {
                    "type": "WorkflowTimeoutError",
                    "message": "the workflow did not finish within its timeout",
                }
            if failure is not None:
                wake = await self._finish(tx, run_id, RunStatus.FAILED, None, dumps(failure), now)
                return Claim(
                    outcome=ClaimOutcome.EXHAUSTED,
                    run=await self._get(tx, run_id),
                    wake=tuple(wake),
                )
            taken = await tx.one(
                SQL_CLAIM, (owner, now + lease, recoveries, now, deadline, now, run_id)
            )
            assert taken is not None
            steps = tuple(_step(r) for r in await tx.all(SQL_STEPS_OF_RUN, (run_id,)))
        claimed = _run(self.tenant_id, taken)
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
        rows_of = ", ".join(["(?, ?, ?)"] * len(leases))
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "UPDATE runs SET lease_until = ? WHERE status = 'running' "
                f"AND (id, lease_owner, executions) IN (VALUES {rows_of}) "
                "RETURNING id, cancel_requested",
                (until, *(p for run_id, lease in leases.items() for p in (run_id, *_fence(lease)))),
            )
        ours = {r[0] for r in rows}
        return {r[0] for r in rows if r[1]}, set(leases) - ours

    async def record_step(self, step: StepRecord, *, lease: Lease) -> bool:
        now = step.finished_at or step.started_at
        if self.db.dialect == "postgresql":
            row = await self.db.batched(
                SQL_RECORD_STEP_PG, (now, step.run_id, *_fence(lease), *_step_params(step))
            )
            if row is None:
                raise LeaseLost(step.run_id)
            return bool(row[0])
        async with self.db.transaction() as tx:
            cancel = await self._owned(tx, step.run_id, lease, now)
            await tx.run(SQL_UPSERT_STEP, _step_params(step))
        return cancel

    async def wait_event(
        self, run_id: str, seq: int, name: str, deadline: float | None, *, lease: Lease, now: float
    ) -> EventWait:
        async with self.db.transaction() as tx:
            await self._owned(tx, run_id, lease, now)
            row = await tx.one(
                "SELECT output FROM steps WHERE run_id = ? AND seq = ?", (run_id, seq)
            )
            if row is None:
                pending = StepRecord(
                    run_id=run_id,
                    seq=seq,
                    name=name,
                    kind=StepKind.EVENT,
                    status=StepStatus.PENDING,
                    output=dumps(deadline),
                    error=None,
                    attempts=1,
                    started_at=now,
                    finished_at=None,
                )
                await tx.run(SQL_UPSERT_STEP, _step_params(pending))
            else:
                deadline = loads(row[0])
            event = await tx.one(SQL_NEXT_EVENT, (run_id, name))
            if event is not None:
                payload = bytes(event[1])
                await tx.run("UPDATE events SET consumed_seq = ? WHERE id = ?", (seq, event[0]))
                await tx.run(
                    "UPDATE steps SET status = 'completed', output = ?, "
                    "finished_at = ? WHERE run_id = ? AND seq = ?",
                    (payload, now, run_id, seq),
                )
                return EventWait(received=True, payload=payload)
            if deadline is not None and deadline <= now:
                await tx.run(
                    "UPDATE steps SET status = 'completed', output = NULL, "
                    "finished_at = ? WHERE run_id = ? AND seq = ?",
                    (now, run_id, seq),
                )
                return EventWait(received=False, timed_out=True)
            return EventWait(received=False, deadline=deadline)

    async def start_child(
        self, parent_id: str, seq: int, child: NewRun, *, lease: Lease, now: float
    ) -> ChildState:
        async with self.db.transaction() as tx:
            await self._owned(tx, parent_id, lease, now)
            pending = StepRecord(
                run_id=parent_id,
                seq=seq,
                name=child.workflow,
                kind=StepKind.CHILD,
                status=StepStatus.PENDING,
                output=dumps(child.id),
                error=None,
                attempts=1,
                started_at=now,
                finished_at=None,
            )
            await tx.run(f"{SQL_INSERT_STEP} ON CONFLICT DO NOTHING", _step_params(pending))
            created = await tx.one(
                f"{SQL_INSERT_RUN} ON CONFLICT (id) DO NOTHING RETURNING id",
                (
                    child.id,
                    child.workflow,
                    child.input,
                    None,
                    parent_id,
                    child.priority,
                    child.timeout,
                    child.max_recoveries,
                    now,
                    now,
                    child.trace,
                ),
            )
            wake = [await self._outbox(tx, child.id, child.priority, now)] if created else []
            state = await self._child_state(tx, child.id)
            if state.status in TERMINAL:
                failed = state.status is not RunStatus.COMPLETED
                await tx.run(
                    "UPDATE steps SET status = ?, output = ?, error = ?, finished_at = ? "
                    "WHERE run_id = ? AND seq = ?",
                    (
                        "failed" if failed else "completed",
                        state.result,
                        state.error or (CANCELLED_ERROR if failed else None),
                        now,
                        parent_id,
                        seq,
                    ),
                )
        return ChildState(
            child_id=state.child_id,
            status=state.status,
            result=state.result,
            error=state.error,
            wake=tuple(wake),
        )

    @staticmethod
    async def _child_state(tx: Tx, child_id: str) -> ChildState:
        row = await tx.one(SQL_CHILD_STATE, (child_id,))
        assert row is not None
        return ChildState(
            child_id=child_id, status=RunStatus(row[0]), result=_bytes(row[1]), error=_bytes(row[2])
        )

    async def suspend_run(
        self, run_id: str, wait: Wait, *, lease: Lease, now: float
    ) -> SuspendOutcome:
        async with self.db.transaction() as tx:
            child_done = False
            if wait.kind is WaitKind.CHILD and wait.child_id is not None:
                # Lock the child's row before the parent's, the order in which the child's end
                # takes them: a child ending right now is seen ended here, or sees its parent
                # waiting and wakes it. Either way no wake-up is lost, and no deadlock.
                row = await tx.one(
                    "SELECT status FROM runs WHERE id = ? {for_share}", (wait.child_id,)
                )
                child_done = row is not None and RunStatus(row[0]) in TERMINAL
            # The run's own row is locked next: an event sent meanwhile waits for this
            # transaction, then finds the run waiting and wakes it.
            if await self._owned(tx, run_id, lease, now):
                return SuspendOutcome.CANCEL
            if child_done:
                return SuspendOutcome.READY
            if wait.kind is WaitKind.EVENT and await tx.one(
                SQL_NEXT_EVENT, (run_id, wait.event_name)
            ):
                return SuspendOutcome.READY
            status = RunStatus.SLEEPING if wait.kind is WaitKind.SLEEP else RunStatus.WAITING
            await tx.run(
                "UPDATE runs SET status = ?, wake_at = ?, lease_owner = NULL, "
                "lease_until = NULL, updated_at = ? WHERE id = ?",
                (status.value, wait.wake_at, now, run_id),
            )
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
            released = await tx.run(SQL_RELEASE, (stuck_reason, now, run_id, *_fence(lease)))
            if released and step is not None:
                await tx.run(SQL_UPSERT_STEP, _step_params(step))

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
        finish = (status.value, result, error, now, now, run_id, *_fence(lease))
        cancels = status in (RunStatus.CANCELLED, RunStatus.COMPENSATED)
        if not cancels:  # no children to cancel
            if self.db.dialect == "postgresql":
                if step is None:
                    done = await self.db.batched(SQL_FINISH_OWNED, finish)
                else:
                    done = await self.db.batched(
                        SQL_FINISH_WITH_STEP_PG, (*finish, *_step_params(step))
                    )
                if done is not None:
                    return Finished()  # no parent to wake either
            else:
                async with self.db.transaction() as tx:
                    if await tx.one(SQL_FINISH_OWNED, finish) is not None:
                        if step is not None:
                            await tx.run(SQL_UPSERT_STEP, _step_params(step))
                        return Finished()
        async with self.db.transaction() as tx:
            if cancels:
                await self._lock_descendants(tx, run_id)
            await self._owned(tx, run_id, lease, now)
            if step is not None:
                await tx.run(SQL_UPSERT_STEP, _step_params(step))
            wake = await self._finish(tx, run_id, status, result, error, now)
        return Finished(wake=tuple(wake))

    # -- control from clients ----------------------------------------------------------------

    async def request_cancel(self, run_id: str, *, now: float) -> tuple[RunRecord, Finished]:
        async with self.db.transaction() as tx:
            await self._lock_descendants(tx, run_id)
            row = await tx.one(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ? {{for_update}}", (run_id,)
            )
            if row is None:
                raise RunNotFoundError(f"no run {run_id} in this tenant")
            run = _run(self.tenant_id, row)
            if run.status in TERMINAL:
                raise RunFinishedError(run_id, run.status.value, "it cannot be cancelled")
            first = not run.cancel_requested
            if first:
                await tx.run(
                    "UPDATE runs SET cancel_requested = TRUE, updated_at = ? WHERE id = ?",
                    (now, run_id),
                )
            wake: list[OutboxEntry] = []
            if run.status is RunStatus.RUNNING:
                pass  # its worker stops it at the next step boundary
            elif run.compensable:
                # A saga with nobody running it: wake it, so that a worker replays it and runs
                # its compensations before it ends. Only once: asked again, it may be between
                # two compensations (a durable wait) that must not be cut short.
                if first:
                    wake = [await self._requeue(tx, run_id, now)]
            else:
                wake = await self._finish(
                    tx, run_id, RunStatus.CANCELLED, None, CANCELLED_ERROR, now
                )
            run = await self._get(tx, run_id) or run
        return run, Finished(wake=tuple(wake))

    async def send_event(self, run_id: str, name: str, payload: bytes, *, now: float) -> Finished:
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT status FROM runs WHERE id = ? {for_update}", (run_id,))
            if row is None:
                raise RunNotFoundError(f"no run {run_id} in this tenant")
            if RunStatus(row[0]) in TERMINAL:
                raise RunFinishedError(run_id, row[0], "it takes no events")
            await tx.run(
                "INSERT INTO events (run_id, name, payload, created_at) VALUES (?, ?, ?, ?)",
                (run_id, name, payload, now),
            )
            wake = await self._wake(tx, run_id, now)
        return Finished(wake=tuple(wake))

    async def cancel_requested(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        async with self.db.autocommit() as tx:
            rows = await tx.all(
                f"SELECT id FROM runs WHERE cancel_requested AND id IN ({_marks(len(run_ids))})",
                tuple(run_ids),
            )
        return {r[0] for r in rows}

    # -- outbox and reconciliation -----------------------------------------------------------

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            async with self.db.autocommit() as tx:
                await tx.run(f"DELETE FROM outbox WHERE id IN ({_marks(len(ids))})", tuple(ids))

    async def pending_outbox(self, *, older_than: float, limit: int = 500) -> list[OutboxEntry]:
        async with self.db.autocommit() as tx:
            rows = await tx.all(
                "SELECT id, run_id, priority, trace FROM outbox WHERE created_at < ? "
                "ORDER BY id LIMIT ?",
                (older_than, limit),
            )
        return [OutboxEntry(id=r[0], run_id=r[1], priority=r[2], trace=r[3]) for r in rows]

    async def stalled_runs(
        self, *, now: float, grace: float, limit: int = 1000
    ) -> list[tuple[str, int, str | None]]:
        """Runs that should have a message by now: queued, running with a lapsed lease, or
        sleeping/waiting past their wake-up time, for longer than ``grace`` seconds."""
        cutoff = now - grace
        async with self.db.autocommit() as tx:
            rows: list[Row] = await tx.all(
                "SELECT id, priority, trace FROM runs WHERE "
                "(status = 'queued' AND updated_at < ?) "
                "OR (status = 'running' AND lease_until < ?) "
                "OR (status IN ('sleeping', 'waiting') AND wake_at < ?) "
                "ORDER BY id LIMIT ?",
                (cutoff, cutoff, cutoff, limit),
            )
        return [(r[0], r[1], r[2]) for r in rows]

    async def expected_messages(
        self, *, after: str = "", limit: int = 1000
    ) -> list[ExpectedMessage]:
        async with self.db.autocommit() as tx:
            rows: list[Row] = await tx.all(SQL_EXPECTED_MESSAGES, (after, limit))
        return [ExpectedMessage(run_id=r[0], priority=r[1], trace=r[2], due_at=r[3]) for r in rows]

    async def has_unfinished(self) -> bool:
        async with self.db.autocommit() as tx:
            row = await tx.one(
                f"SELECT EXISTS (SELECT 1 FROM runs WHERE status IN ({_UNFINISHED})) "
                "OR EXISTS (SELECT 1 FROM outbox)"
            )
        return bool(row and row[0])

    async def ping(self) -> None:
        async with self.db.autocommit() as tx:
            await tx.one("SELECT 1")

    async def stuck_runs(self, *, before: float) -> tuple[int, float | None]:
        """How many runs are queued or running without progress since ``before``, and when
        the oldest of them last moved."""
        async with self.db.autocommit() as tx:
            row = await tx.one(
                "SELECT COUNT(*), MIN(updated_at) FROM runs "
                "WHERE status IN ('queued', 'running') AND updated_at < ?",
                (before,),
            )
        assert row is not None
        return int(row[0]), row[1]

    async def close(self) -> None:
        await self.db.close()
