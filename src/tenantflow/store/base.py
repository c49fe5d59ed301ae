"""The interface of a tenant's run store. One store serves exactly one tenant's database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from tenantflow.store.records import (
    ChildState,
    Claim,
    EventWait,
    ExpectedMessage,
    Finished,
    Lease,
    NewRun,
    OutboxEntry,
    RunRecord,
    RunStatus,
    StepRecord,
    SuspendOutcome,
    Wait,
)


class LeaseLost(BaseException):
    """The run is no longer executed under this lease: another worker, or another attempt
    of this one, claimed it after the lease lapsed (or it ended meanwhile)."""


class RunStore(Protocol):
    """Runs, step checkpoints and events of one tenant.

    Every method that changes a claimed run takes the ``lease`` its claim gave (owner and
    attempt) and raises :class:`LeaseLost` when the run is no longer executed under it: that
    fences a worker paused past its lease, and an older attempt in the same process.
    """

    tenant_id: str

    async def create_run(
        self, run: NewRun, *, now: float, monthly_quota: int | None = None
    ) -> tuple[RunRecord, bool, tuple[OutboxEntry, ...]]:
        """Insert ``run`` with its outbox record; with an idempotency key already used, return
        the existing run.

        Returns the run, whether it was created, and what to publish. Raises
        ``IdempotencyConflictError`` when the key was used with a different workflow or input,
        and ``QuotaExceededError`` (creating nothing) when ``monthly_quota`` runs were already
        created this month (UTC); a repeated key does not count.
        """
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[RunRecord]:
        """Newest first; ``before`` is a run id to continue after (cursor pagination)."""
        ...

    async def count_runs(self, *, status: RunStatus | None = None) -> int: ...

    async def get_steps(self, run_id: str) -> list[StepRecord]: ...

    async def claim_run(self, run_id: str, *, owner: str, now: float, lease: float) -> Claim:
        """Take the run for execution under a lease, or say why not (see ``ClaimOutcome``).
        A claim starts a new attempt: ``Claim.lease`` carries its token."""
        ...

    async def renew_leases(
        self, leases: Mapping[str, Lease], *, until: float
    ) -> tuple[set[str], set[str]]:
        """Extend the leases of these runs (run id -> lease) to ``until``; returns (runs whose
        cancellation was requested, runs no longer executed under the lease given)."""
        ...

    async def record_step(self, step: StepRecord, *, lease: Lease) -> bool:
        """Commit a step's checkpoint; returns whether cancellation of the run was requested."""
        ...

    async def wait_event(
        self, run_id: str, seq: int, name: str, deadline: float | None, *, lease: Lease, now: float
    ) -> EventWait: ...

    async def start_child(
        self, parent_id: str, seq: int, child: NewRun, *, lease: Lease, now: float
    ) -> ChildState: ...

    async def suspend_run(
        self, run_id: str, wait: Wait, *, lease: Lease, now: float
    ) -> SuspendOutcome:
        """Release the run until ``wait`` is met, unless it already is or a cancel came."""
        ...

    async def stuck_runs(self, *, before: float) -> tuple[int, float | None]:
        """Runs queued or running without progress since ``before``: how many, and when the
        oldest last moved."""
        ...

    async def mark_compensable(self, run_id: str, *, lease: Lease, now: float) -> None:
        """Mark a run as a saga (it registered a compensation): cancelling it then wakes it
        to compensate. Raises ``LeaseLost`` if it is no longer executed under ``lease``."""
        ...

    async def release_run(
        self,
        run_id: str,
        *,
        lease: Lease,
        now: float,
        stuck_reason: str | None = None,
        step: StepRecord | None = None,
    ) -> None:
        """Give the run back (a worker shutting down): queued again, lease cleared; nothing
        if it is no longer executed under ``lease``. With ``stuck_reason``, the run says why
        no worker can take it (until one claims it). With ``step``, a checkpoint whose own
        commit failed is committed with the release, under the same fence."""
        ...

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
        """End the run (and commit ``step``, its last checkpoint, in the same transaction)."""
        ...

    async def request_cancel(self, run_id: str, *, now: float) -> tuple[RunRecord, Finished]:
        """Ask a run (and its children) to stop; a run no worker holds is cancelled at once.
        Asking again while it is being cancelled changes nothing; a run that has ended raises
        ``RunFinishedError``."""
        ...

    async def send_event(self, run_id: str, name: str, payload: bytes, *, now: float) -> Finished:
        """Store an event for the run (and wake it up if it waits)."""
        ...

    async def cancel_requested(self, run_ids: Sequence[str]) -> set[str]: ...

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget outbox records whose messages were published."""
        ...

    async def pending_outbox(self, *, older_than: float, limit: int = 500) -> list[OutboxEntry]:
        """Outbox records written before ``older_than`` and still not published."""
        ...

    async def stalled_runs(
        self, *, now: float, grace: float, limit: int = 1000
    ) -> list[tuple[str, int, str | None]]:
        """Runs that should have a message by now; (run id, priority, trace)."""
        ...

    async def expected_messages(
        self, *, after: str = "", limit: int = 1000
    ) -> list[ExpectedMessage]:
        """Every unfinished run that should have a message, whatever its age, in id order
        from after ``after``: what rebuilds a queue that lost its data."""
        ...

    async def has_unfinished(self) -> bool:
        """Whether any run has not ended yet, or any outbox record is left."""
        ...

    async def ping(self) -> None:
        """One round trip to the database: returns once it answers (within the store's own
        bound, else the store's error)."""
        ...

    async def close(self) -> None: ...
