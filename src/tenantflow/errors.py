"""The exception tree of tenantflow.

Every error tenantflow raises on purpose derives from :class:`TenantflowError`. The docstring of
each class is its default message. Signals that user code must not swallow (suspension of a
workflow, cancellation) derive from :class:`BaseException` instead, so that a bare
``except Exception`` in a workflow cannot eat them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple


class TenantflowError(Exception):
    """A tenantflow error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message())

    @property
    def message(self) -> str:
        """The error's message (its first argument)."""
        return str(self.args[0]) if self.args else ""

    @classmethod
    def default_message(cls) -> str:
        """The message of this error when none is given: its docstring's first paragraph."""
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


class ConfigError(TenantflowError, ValueError):
    """The configuration is invalid.

    A ``ValueError`` too: what was given is a value the setting cannot take."""


class MissingExtraError(ConfigError):
    """The setting needs an optional dependency that is not installed."""


class BackendUnavailableError(TenantflowError):
    """A database or queue server did not answer."""


class DatabaseBusyError(BackendUnavailableError):
    """Every database connection of this process is in use: try again shortly."""

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailableError(BackendUnavailableError):
    """The database did not answer (it is restarting, stopped or unreachable): try again
    shortly."""

    def __init__(self, message: str | None = None, *, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TenantDatabaseMissingError(StoreUnavailableError):
    """The tenant's database is not there (dropped, or lost by its server): the tenant's runs
    can be neither read nor written until it is restored."""

    def __init__(self, message: str | None = None, *, retry_after: float = 30.0) -> None:
        super().__init__(message, retry_after=retry_after)


class NotFoundError(TenantflowError):
    """The object does not exist."""


class TenantNotFoundError(NotFoundError):
    """No such tenant."""


class RunNotFoundError(NotFoundError):
    """No such run."""


class WorkflowNotRegisteredError(NotFoundError):
    """No workflow is registered under this name."""


class InvalidTenantIdError(TenantflowError):
    """A tenant id is 1 to 63 characters of lowercase letters, digits and '-', not starting
    with '-'."""


class TenantExistsError(TenantflowError):
    """A tenant with this id already exists."""


class TenantSuspendedError(TenantflowError):
    """The tenant is suspended; it accepts no new runs."""


class SerializationError(TenantflowError):
    """The value cannot be stored as JSON."""


class Issue(NamedTuple):
    """One thing wrong with an input: where (a dotted path, ``order.quantity``, ``query.cursor``)
    and what, in words meant for the caller."""

    loc: str
    msg: str


class InvalidInputError(TenantflowError, ValueError):
    """The input is not valid.

    ``issues`` says where and what, field by field; the message defaults to the first of them.
    (A ``ValueError`` too, so that code which caught the ``ValueError`` raised before keeps
    working.)
    """

    def __init__(self, message: str | None = None, *, issues: Sequence[Issue] = ()) -> None:
        self.issues = tuple(issues)
        super().__init__(message or summarize(self.issues) or None)


def summarize(issues: Sequence[Issue]) -> str:
    """One line for a list of issues: the first, and how many more there are."""
    if not issues:
        return ""
    first = f"{issues[0].loc}: {issues[0].msg}" if issues[0].loc else issues[0].msg
    return first if len(issues) == 1 else f"{first} (and {len(issues) - 1} more)"


class InvalidArgumentsError(InvalidInputError):
    """The arguments do not fit the workflow's parameters."""


class InvalidCursorError(InvalidInputError):
    """The cursor is not one this API gave out: pass the next_cursor of a previous page."""


class EventPayloadError(InvalidInputError):
    """The payload of the event does not fit the type the workflow waits for.

    Raised in the workflow at its ``wait_for_event``, on the first execution and on every
    replay alike (the payload is checkpointed as it came)."""


class IdempotencyConflictError(TenantflowError):
    """The idempotency key was already used for a run with a different workflow or input."""


class NonDeterminismError(TenantflowError):
    """The workflow did not replay the same steps in the same order as its first execution."""


class RunFailedError(TenantflowError):
    """The run ended without a result."""

    def __init__(
        self, message: str | None = None, *, status: str = "failed", error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class RunCancelledError(RunFailedError):
    """The run was cancelled."""


class ResultTimeoutError(TenantflowError, TimeoutError):
    """The run did not reach a terminal state within the timeout."""


class StepFailedError(TenantflowError):
    """A step failed after its retries.

    Raised in the workflow at the call of the step, on the first execution and on every replay
    alike, so that a workflow handling it behaves the same when it is resumed.
    """

    def __init__(self, step_name: str, error_type: str, error_message: str, attempts: int) -> None:
        super().__init__(
            f"step {step_name!r} failed after {attempts} attempt(s): {error_type}: {error_message}"
        )
        self.step_name = step_name
        self.error_type = error_type
        self.error_message = error_message
        self.attempts = attempts


class StepTimeoutError(TenantflowError, TimeoutError):
    """The step did not finish within its timeout."""


class ChildWorkflowError(TenantflowError):
    """A child workflow ended without a result."""

    def __init__(self, child_id: str, status: str, error: dict[str, Any] | None) -> None:
        detail = f"{error.get('type')}: {error.get('message')}" if error else status
        super().__init__(f"child run {child_id} ended {status}: {detail}")
        self.child_id = child_id
        self.status = status
        self.error = error


class WorkflowTimeoutError(TenantflowError, TimeoutError):
    """The workflow did not finish within its timeout."""


class MaxRecoveryAttemptsExceededError(TenantflowError):
    """The run was recovered after a crash more times than its workflow allows."""


# Control flow. These derive from BaseException on purpose (see the module docstring).


class WorkflowSuspended(BaseException):
    """The workflow waits (durable sleep, event, child) and releases its worker."""


class WorkflowCancelled(BaseException):
    """The run was cancelled; raised at the next step boundary."""


class RunFinishedError(TenantflowError):
    """The run has already ended."""

    def __init__(self, run_id: str, status: str, refused: str) -> None:
        super().__init__(f"run {run_id} has ended ({status}); {refused}")
        self.run_id = run_id
        self.status = status


# -- platform plane: identity, licensing, limits --------------------------------------------


class ConflictError(TenantflowError):
    """The request conflicts with the current state."""


class AuthenticationError(TenantflowError):
    """The credentials are not valid."""


class InvalidSignatureError(AuthenticationError):
    """The signed document is not valid."""


class PermissionDeniedError(TenantflowError):
    """The caller's role does not allow this."""


class LicenseError(TenantflowError):
    """The tenant has no valid license."""


class NotEntitledError(LicenseError):
    """The tenant's plan does not include this."""


class QuotaExceededError(TenantflowError):
    """The tenant's quota is used up."""

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SeatLimitError(QuotaExceededError):
    """The tenant's plan has no seat left."""


class RateLimitedError(QuotaExceededError):
    """Too many requests: slow down."""


class SignInThrottledError(RateLimitedError):
    """Too many failed sign-ins for this account or from this address: wait before trying
    again."""


class CircuitOpenError(TenantflowError):
    """The circuit breaker is open: the call was not made."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; retry in {retry_after:.1f} s")
        self.name = name
        self.retry_after = retry_after


class BulkheadFullError(TenantflowError):
    """Every slot of the bulkhead is taken: the call was not made."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"bulkhead {name!r} is full")
        self.name = name
        self.retry_after = retry_after
