"""Rows of a tenant database as frozen, keyword-only records."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tenantflow.serde import loads


class RunStatus(enum.StrEnum):
    """Where a run is: queued, running, waiting (asleep, for an event or a child), or ended."""

    QUEUED = "queued"
    RUNNING = "running"
    SLEEPING = "sleeping"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPENSATED = "compensated"  # a saga failed or was cancelled, and was undone
    NEEDS_ATTENTION = "needs_attention"  # a saga's compensation failed: a person must look

    @property
    def terminal(self) -> bool:
        """Whether the run has ended (it changes no more)."""
        return self in TERMINAL


TERMINAL = frozenset(
    {
        RunStatus.COMPLETED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.COMPENSATED,
        RunStatus.NEEDS_ATTENTION,
    }
)


class StepKind(enum.StrEnum):
    STEP = "step"
    SLEEP = "sleep"
    EVENT = "event"
    CHILD = "child"


class StepStatus(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    PENDING = "pending"  # a wait (event, child) that has begun but not ended


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """A run as stored: its status, input and result (JSON bytes), times (epoch seconds),
    and how often it was recovered and executed."""

    id: str
    tenant_id: str
    workflow: str
    status: RunStatus
    input: bytes
    result: bytes | None
    error: bytes | None
    idempotency_key: str | None
    parent_id: str | None
    priority: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    deadline: float | None
    wake_at: float | None
    recoveries: int
    executions: int
    cancel_requested: bool
    compensable: bool = False  # registered a compensation (a saga)
    # Why no worker can take this queued run (its workflow is in no worker's app); cleared
    # when one claims it.
    stuck_reason: str | None = None

    @classmethod
    def from_row(cls, tenant_id: str, row: Sequence[Any], at: Mapping[str, int]) -> RunRecord:
        """The run in a row with ``run_columns`` (``queries.sql``), read by column name: ``at``
        gives each column's place (a statement's, built once; a dict a row costs more)."""
        return cls(
            id=row[at["id"]],
            tenant_id=tenant_id,
            workflow=row[at["workflow"]],
            status=RunStatus(row[at["status"]]),
            input=bytes(row[at["input"]]),
            result=_bytes(row[at["result"]]),
            error=_bytes(row[at["error"]]),
            idempotency_key=row[at["idempotency_key"]],
            parent_id=row[at["parent_id"]],
            priority=row[at["priority"]],
            created_at=row[at["created_at"]],
            updated_at=row[at["updated_at"]],
            started_at=row[at["started_at"]],
            finished_at=row[at["finished_at"]],
            deadline=row[at["deadline"]],
            wake_at=row[at["wake_at"]],
            recoveries=row[at["recoveries"]],
            executions=row[at["executions"]],
            cancel_requested=bool(row[at["cancel_requested"]]),
            compensable=bool(row[at["compensable"]]),
            stuck_reason=row[at["stuck_reason"]],
        )

    @classmethod
    def new(cls, tenant_id: str, run: NewRun, now: float) -> RunRecord:
        """The run that inserting ``run`` at ``now`` creates."""
        return cls(
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

    @property
    def error_info(self) -> dict[str, Any] | None:
        """The error as a dict (``type``, ``message``), or None."""
        value: dict[str, Any] | None = loads(self.error)
        return value


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """A checkpoint of a run: a step's result or error, a sleep, an event or a child, at its
    position ``seq``."""

    run_id: str
    seq: int
    name: str
    kind: StepKind
    status: StepStatus
    output: bytes | None
    error: bytes | None
    attempts: int
    started_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any], at: Mapping[str, int]) -> StepRecord:
        """The checkpoint in a row with ``step_columns`` (``queries.sql``), read by column
        name, ``at`` giving each column's place."""
        return cls(
            run_id=row[at["run_id"]],
            seq=row[at["seq"]],
            name=row[at["name"]],
            kind=StepKind(row[at["kind"]]),
            status=StepStatus(row[at["status"]]),
            output=_bytes(row[at["output"]]),
            error=_bytes(row[at["error"]]),
            attempts=row[at["attempts"]],
            started_at=row[at["started_at"]],
            finished_at=row[at["finished_at"]],
        )

    def params(self) -> tuple[Any, ...]:
        """The values of ``step_columns``, in their order (a unit test holds the two alike)."""
        return (
            self.run_id,
            self.seq,
            self.name,
            self.kind.value,
            self.status.value,
            self.output,
            self.error,
            self.attempts,
            self.started_at,
            self.finished_at,
        )

    @property
    def error_info(self) -> dict[str, Any] | None:
        """The error as a dict (``type``, ``message``), or None."""
        value: dict[str, Any] | None = loads(self.error)
        return value


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


@dataclass(frozen=True, kw_only=True)
class NewRun:
    """A run to insert: what a submit (or a parent starting a child) provides."""

    id: str
    workflow: str
    input: bytes
    idempotency_key: str | None = None
    parent_id: str | None = None
    priority: int = 0
    timeout: float | None = None
    max_recoveries: int = 10
    trace: str | None = None  # W3C traceparent of the span that started it (tracing on)

    def params(self, now: float) -> tuple[Any, ...]:
        """The values of ``insert_run`` (``queries.sql``), created at ``now``."""
        return (
            self.id,
            self.workflow,
            self.input,
            self.idempotency_key,
            self.parent_id,
            self.priority,
            self.timeout,
            self.max_recoveries,
            now,
            now,
            self.trace,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """Who executes a run, and which attempt: the worker process (``owner``) and the attempt
    token, the run's ``executions`` count, which every claim increments. A write fenced by a
    lease goes through only while both are still the run's, so neither another process nor an
    older attempt in the same process (a stale claim, a delivery that came back) can write."""

    owner: str
    attempt: int


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"
    DROP = "drop"  # nothing to do for this delivery: a duplicate, or the run is terminal
    DEFER = "defer"  # too early: the run sleeps, or a live worker holds it, until ``not_before``
    EXHAUSTED = "exhausted"  # the run failed: recovered too often, or past its deadline


@dataclass(frozen=True, kw_only=True)
class Claim:
    outcome: ClaimOutcome
    run: RunRecord | None = None
    steps: tuple[StepRecord, ...] = ()
    not_before: float | None = None
    wake: tuple[OutboxEntry, ...] = ()
    recovered: bool = False  # taken over: the run was running under a lease that lapsed
    lease: Lease | None = None  # claimed: the lease of this attempt, for its every write


class SuspendOutcome(enum.Enum):
    SUSPENDED = "suspended"
    READY = "ready"  # what the run waits for has already happened: run on
    CANCEL = "cancel"  # cancellation was requested meanwhile


class WaitKind(enum.Enum):
    SLEEP = "sleep"
    EVENT = "event"
    CHILD = "child"


@dataclass(frozen=True, kw_only=True)
class Wait:
    """What a suspended run waits for; ``wake_at`` is its deadline (a sleep's end, a timeout)."""

    kind: WaitKind
    wake_at: float | None
    event_name: str | None = None
    child_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class EventWait:
    """The outcome of looking for an event: received, timed out, or still to wait until
    ``deadline`` (``None``: no timeout)."""

    received: bool
    payload: bytes | None = None
    timed_out: bool = False
    deadline: float | None = None


@dataclass(frozen=True, kw_only=True)
class ChildState:
    """A child run as its parent sees it at a step boundary."""

    child_id: str
    status: RunStatus
    result: bytes | None
    error: bytes | None
    wake: tuple[OutboxEntry, ...] = ()


@dataclass(frozen=True, kw_only=True)
class OutboxEntry:
    """A message to publish, written in the same transaction as the change that needs it."""

    id: int
    run_id: str
    priority: int = 0
    trace: str | None = None


@dataclass(frozen=True, kw_only=True)
class Finished:
    """After a change: messages to publish now (a parent woken up, a child started...)."""

    wake: tuple[OutboxEntry, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ExpectedMessage:
    """The message an unfinished run should have in the queue, and when it is due (``None``:
    now): a queued run's now, a sleeping or waiting run's at its wake-up, a running run's when
    its lease ends (the delivery that recovers it if its worker is gone)."""

    run_id: str
    priority: int
    trace: str | None
    due_at: float | None
