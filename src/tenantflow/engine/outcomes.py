"""What an execution ends with, the signals that end it from inside, and what it needs of the
worker that runs it."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tenantflow.serde import dumps
from tenantflow.store.records import OutboxEntry, RunStatus

if TYPE_CHECKING:
    from tenantflow.resilience.breaker import Breakers
    from tenantflow.resilience.bulkhead import Bulkheads
    from tenantflow.telemetry.metrics import Metrics
    from tenantflow.telemetry.tracing import Tracing


class StoreUnavailable(BaseException):
    """A store call failed (its cause says how), or the lease could not be renewed before it
    ended: give the run back and retry later."""


class WorkflowReleased(BaseException):
    """The worker is shutting down: stop at this step boundary and give the run back."""


class SagaCompensated(BaseException):
    """A saga failed or was cancelled, and every compensation ran: end the run
    ``compensated``. ``args[0]`` is what made it compensate."""


class SagaNeedsAttention(BaseException):
    """A saga cannot be brought to a clean state (a compensation failed after its retries,
    or it failed past its pivot): end the run ``needs_attention``. ``args[0]`` says why."""


class OutcomeKind(enum.Enum):
    FINISHED = "finished"
    SUSPENDED = "suspended"
    RELEASED = "released"
    RETRY = "retry"  # the store failed: the run was given back, try the message again later
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    kind: OutcomeKind
    status: RunStatus | None = None
    wake_at: float | None = None
    wake: tuple[OutboxEntry, ...] = ()
    unavailable: bool = False  # RETRY: the database did not answer (not the message's fault)


class ExecutionHost(Protocol):
    """What an execution needs from the worker that runs it."""

    lease_seconds: float
    stopping: bool
    breakers: Breakers
    bulkheads: Bulkheads
    metrics: Metrics
    tracing: Tracing

    async def publish(self, tenant_id: str, entries: Sequence[OutboxEntry]) -> None: ...


def error_info(exc: BaseException) -> bytes:
    return dumps({"type": type(exc).__name__, "message": str(exc)})
