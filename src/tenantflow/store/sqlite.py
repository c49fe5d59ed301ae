"""The run store on SQLite: one file per tenant (the embedded default)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenantflow import _sqlite
from tenantflow.errors import IdempotencyConflictError, RunFinishedError, RunNotFoundError
from tenantflow.sdk.serde import dumps, loads
from tenantflow.store.base import LeaseLost
from tenantflow.store.records import (
    TERMINAL,
    ChildState,
    Claim,
    ClaimOutcome,
    EventWait,
    Finished,
    NewRun,
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
    "executions, cancel_requested"
)
STEP_COLUMNS = "run_id, seq, name, kind, status, output, error, attempts, started_at, finished_at"

SQL_TOUCH_OWNED = (
    "UPDATE runs SET updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running' "
    "RETURNING cancel_requested"
)
SQL_UPSERT_STEP = (
    f"INSERT INTO steps ({STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, seq) DO UPDATE SET status = excluded.status, "
    "output = excluded.output, error = excluded.error, attempts = excluded.attempts, "
    "finished_at = excluded.finished_at"
)
SQL_INSERT_RUN = (
    "INSERT INTO runs (id, workflow, status, input, idempotency_key, parent_id, priority, "
    "timeout, max_recoveries, created_at, updated_at) "
    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"
)
SQL_CLAIM_READ = (
    f"SELECT {RUN_COLUMNS}, lease_until, timeout, max_recoveries FROM runs WHERE id = ?"
)
SQL_CLAIM = (
    "UPDATE runs SET status = 'running', lease_owner = ?, lease_until = ?, recoveries = ?, "
    "executions = executions + 1, started_at = COALESCE(started_at, ?), deadline = ?, "
    "wake_at = NULL, updated_at = ? WHERE id = ?"
)
SQL_STEPS_OF_RUN = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY seq"
SQL_FINISH = (
    "UPDATE runs SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?, "
    "lease_owner = NULL, lease_until = NULL, wake_at = NULL WHERE id = ? RETURNING parent_id"
)
SQL_WAKE_PARENT = (
    "UPDATE runs SET status = 'queued', wake_at = NULL, updated_at = ? "
    "WHERE id = ? AND status = 'waiting' RETURNING id"
)
SQL_OPEN_CHILDREN = (
    "SELECT id, status FROM runs WHERE parent_id = ? "
    "AND status NOT IN ('completed', 'failed', 'cancelled')"
)
SQL_NEXT_EVENT = (
    "SELECT id, payload FROM events WHERE run_id = ? AND name = ? AND consumed_seq IS NULL "
    "ORDER BY id LIMIT 1"
)

CANCELLED_ERROR = dumps({"type": "RunCancelledError", "message": "the run was cancelled"})


def _run(tenant_id: str, row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=row[0],
        tenant_id=tenant_id,
        workflow=row[1],
        status=RunStatus(row[2]),
        input=row[3],
        result=row[4],
        error=row[5],
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
    )


def _step(row: Sequence[Any]) -> StepRecord:
    return StepRecord(
        run_id=row[0],
        seq=row[1],
        name=row[2],
        kind=StepKind(row[3]),
        status=StepStatus(row[4]),
        output=row[5],
        error=row[6],
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


class SqliteRunStore:
    """A tenant's runs in one SQLite file. See :class:`tenantflow.store.base.RunStore`."""

    def __init__(self, tenant_id: str, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.tenant_id = tenant_id
        self.path = path
        self._conn = _sqlite.connect(path, synchronous=synchronous)

    # -- helpers -----------------------------------------------------------------------------

    def _owned(self, cur: sqlite3.Cursor, run_id: str, owner: str, now: float) -> bool:
        """Fence: the run is still ours. Returns whether its cancellation was requested."""
        row = cur.execute(SQL_TOUCH_OWNED, (now, run_id, owner)).fetchone()
        if row is None:
            raise LeaseLost(run_id)
        return bool(row[0])

    def _finish(
        self,
        cur: sqlite3.Cursor,
        run_id: str,
        status: RunStatus,
        result: bytes | None,
        error: bytes | None,
        now: float,
    ) -> list[str]:
        row = cur.execute(SQL_FINISH, (status.value, result, error, now, now, run_id)).fetchone()
        wake: list[str] = []
        if status is RunStatus.CANCELLED:
            wake.extend(self._cancel_children(cur, run_id, now))
        parent_id = row[0] if row else None
        if parent_id and cur.execute(SQL_WAKE_PARENT, (now, parent_id)).fetchone():
            wake.append(parent_id)
        return wake

    def _cancel_children(self, cur: sqlite3.Cursor, run_id: str, now: float) -> list[str]:
        wake: list[str] = []
        for child_id, status in cur.execute(SQL_OPEN_CHILDREN, (run_id,)).fetchall():
            cur.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (child_id,))
            if status != RunStatus.RUNNING:
                # Nobody runs it: cancel it here. Its parent is the run being cancelled, so
                # there is no one to wake; its own children follow recursively.
                cur.execute(SQL_FINISH, ("cancelled", None, CANCELLED_ERROR, now, now, child_id))
                wake.extend(self._cancel_children(cur, child_id, now))
        return wake

    def _get(self, cur: sqlite3.Cursor | sqlite3.Connection, run_id: str) -> RunRecord | None:
        row = cur.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _run(self.tenant_id, row) if row else None

    # -- runs --------------------------------------------------------------------------------

    async def create_run(self, run: NewRun, *, now: float) -> tuple[RunRecord, bool]:
        with _sqlite.transaction(self._conn) as cur:
            if run.idempotency_key is not None:
                row = cur.execute(
                    f"SELECT {RUN_COLUMNS} FROM runs WHERE idempotency_key = ?",
                    (run.idempotency_key,),
                ).fetchone()
                if row is not None:
                    existing = _run(self.tenant_id, row)
                    if existing.workflow != run.workflow or loads(existing.input) != loads(
                        run.input
                    ):
                        raise IdempotencyConflictError(
                            f"idempotency key {run.idempotency_key!r} was used for run "
                            f"{existing.id} with a different workflow or input"
                        )
                    return existing, False
            cur.execute(
                SQL_INSERT_RUN,
                (
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
                ),
            )
            created = self._get(cur, run.id)
        assert created is not None
        return created, True

    async def get_run(self, run_id: str) -> RunRecord | None:
        return self._get(self._conn, run_id)

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            f"SELECT {RUN_COLUMNS} FROM runs {clause} ORDER BY id DESC LIMIT ?",
            (*params, max(1, min(limit, 1000))),
        ).fetchall()
        return [_run(self.tenant_id, r) for r in rows]

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        return [_step(r) for r in self._conn.execute(SQL_STEPS_OF_RUN, (run_id,)).fetchall()]

    # -- execution ---------------------------------------------------------------------------

    async def claim_run(self, run_id: str, *, owner: str, now: float, lease: float) -> Claim:
        with _sqlite.transaction(self._conn) as cur:
            row = cur.execute(SQL_CLAIM_READ, (run_id,)).fetchone()
            if row is None:
                return Claim(outcome=ClaimOutcome.DROP)
            run = _run(self.tenant_id, row)
            lease_until, timeout, max_recoveries = row[18], row[19], row[20]
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
                wake = self._finish(cur, run_id, RunStatus.FAILED, None, dumps(failure), now)
                return Claim(
                    outcome=ClaimOutcome.EXHAUSTED, run=self._get(cur, run_id), wake=tuple(wake)
                )
            cur.execute(SQL_CLAIM, (owner, now + lease, recoveries, now, deadline, now, run_id))
            claimed = self._get(cur, run_id)
            steps = tuple(_step(r) for r in cur.execute(SQL_STEPS_OF_RUN, (run_id,)).fetchall())
        return Claim(outcome=ClaimOutcome.CLAIMED, run=claimed, steps=steps)

    async def renew_leases(
        self, run_ids: Sequence[str], *, owner: str, until: float
    ) -> tuple[set[str], set[str]]:
        if not run_ids:
            return set(), set()
        marks = ",".join("?" * len(run_ids))
        with _sqlite.transaction(self._conn) as cur:
            rows = cur.execute(
                f"UPDATE runs SET lease_until = ? WHERE lease_owner = ? AND status = 'running' "
                f"AND id IN ({marks}) RETURNING id, cancel_requested",
                (until, owner, *run_ids),
            ).fetchall()
        ours = {r[0] for r in rows}
        return {r[0] for r in rows if r[1]}, set(run_ids) - ours

    async def record_step(self, step: StepRecord, *, owner: str) -> bool:
        with _sqlite.transaction(self._conn) as cur:
            cancel = self._owned(cur, step.run_id, owner, step.finished_at or step.started_at)
            cur.execute(SQL_UPSERT_STEP, _step_params(step))
        return cancel

    async def wait_event(
        self, run_id: str, seq: int, name: str, deadline: float | None, *, owner: str, now: float
    ) -> EventWait:
        with _sqlite.transaction(self._conn) as cur:
            self._owned(cur, run_id, owner, now)
            row = cur.execute(
                "SELECT output FROM steps WHERE run_id = ? AND seq = ?", (run_id, seq)
            ).fetchone()
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
                cur.execute(SQL_UPSERT_STEP, _step_params(pending))
            else:
                deadline = loads(row[0])
            event = cur.execute(SQL_NEXT_EVENT, (run_id, name)).fetchone()
            if event is not None:
                cur.execute("UPDATE events SET consumed_seq = ? WHERE id = ?", (seq, event[0]))
                cur.execute(
                    "UPDATE steps SET status = 'completed', output = ?, finished_at = ? "
                    "WHERE run_id = ? AND seq = ?",
                    (event[1], now, run_id, seq),
                )
                return EventWait(received=True, payload=event[1])
            if deadline is not None and deadline <= now:
                cur.execute(
                    "UPDATE steps SET status = 'completed', output = NULL, "
                    "finished_at = ? WHERE run_id = ? AND seq = ?",
                    (now, run_id, seq),
                )
                return EventWait(received=False, timed_out=True)
            return EventWait(received=False, deadline=deadline)

    async def start_child(
        self, parent_id: str, seq: int, child: NewRun, *, owner: str, now: float
    ) -> ChildState:
        with _sqlite.transaction(self._conn) as cur:
            self._owned(cur, parent_id, owner, now)
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
            cur.execute(
                SQL_UPSERT_STEP.split(" ON CONFLICT")[0] + " ON CONFLICT DO NOTHING",
                _step_params(pending),
            )
            cur.execute(
                SQL_INSERT_RUN + " ON CONFLICT (id) DO NOTHING",
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
                ),
            )
            state = self._child_state(cur, child.id)
            if state.status in TERMINAL:
                failed = state.status is not RunStatus.COMPLETED
                cur.execute(
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
        return state

    def _child_state(self, cur: sqlite3.Cursor, child_id: str) -> ChildState:
        row = cur.execute(
            "SELECT status, result, error FROM runs WHERE id = ?", (child_id,)
        ).fetchone()
        return ChildState(child_id=child_id, status=RunStatus(row[0]), result=row[1], error=row[2])

    async def suspend_run(
        self, run_id: str, wait: Wait, *, owner: str, now: float
    ) -> SuspendOutcome:
        with _sqlite.transaction(self._conn) as cur:
            if self._owned(cur, run_id, owner, now):
                return SuspendOutcome.CANCEL
            if (
                wait.kind is WaitKind.EVENT
                and cur.execute(SQL_NEXT_EVENT, (run_id, wait.event_name)).fetchone()
            ):
                return SuspendOutcome.READY
            if wait.kind is WaitKind.CHILD and wait.child_id is not None:
                if self._child_state(cur, wait.child_id).status in TERMINAL:
                    return SuspendOutcome.READY
            status = RunStatus.SLEEPING if wait.kind is WaitKind.SLEEP else RunStatus.WAITING
            cur.execute(
                "UPDATE runs SET status = ?, wake_at = ?, lease_owner = NULL, "
                "lease_until = NULL, updated_at = ? WHERE id = ?",
                (status.value, wait.wake_at, now, run_id),
            )
        return SuspendOutcome.SUSPENDED

    async def release_run(self, run_id: str, *, owner: str, now: float) -> None:
        with _sqlite.transaction(self._conn) as cur:
            cur.execute(
                "UPDATE runs SET status = 'queued', lease_owner = NULL, lease_until = NULL, "
                "updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running'",
                (now, run_id, owner),
            )

    async def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        *,
        result: bytes | None,
        error: bytes | None,
        owner: str,
        now: float,
    ) -> Finished:
        with _sqlite.transaction(self._conn) as cur:
            self._owned(cur, run_id, owner, now)
            wake = self._finish(cur, run_id, status, result, error, now)
        return Finished(wake=tuple(wake))

    # -- control from clients ----------------------------------------------------------------

    async def request_cancel(self, run_id: str, *, now: float) -> tuple[RunRecord, Finished]:
        with _sqlite.transaction(self._conn) as cur:
            run = self._get(cur, run_id)
            if run is None:
                raise RunNotFoundError(f"no run {run_id} in this tenant")
            wake: list[str] = []
            if run.status not in TERMINAL:
                cur.execute(
                    "UPDATE runs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    (now, run_id),
                )
                if run.status is not RunStatus.RUNNING:
                    wake = self._finish(
                        cur, run_id, RunStatus.CANCELLED, None, CANCELLED_ERROR, now
                    )
                run = self._get(cur, run_id)
        assert run is not None
        return run, Finished(wake=tuple(wake))

    async def send_event(self, run_id: str, name: str, payload: bytes, *, now: float) -> bool:
        with _sqlite.transaction(self._conn) as cur:
            row = cur.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFoundError(f"no run {run_id} in this tenant")
            if RunStatus(row[0]) in TERMINAL:
                raise RunFinishedError(f"run {run_id} has ended ({row[0]}); it takes no events")
            cur.execute(
                "INSERT INTO events (run_id, name, payload, created_at) VALUES (?, ?, ?, ?)",
                (run_id, name, payload, now),
            )
            woken = cur.execute(
                "UPDATE runs SET status = 'queued', wake_at = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'waiting' RETURNING id",
                (now, run_id),
            ).fetchone()
        return woken is not None

    async def cancel_requested(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        marks = ",".join("?" * len(run_ids))
        rows = self._conn.execute(
            f"SELECT id FROM runs WHERE cancel_requested = 1 AND id IN ({marks})", tuple(run_ids)
        ).fetchall()
        return {r[0] for r in rows}

    async def close(self) -> None:
        self._conn.close()
