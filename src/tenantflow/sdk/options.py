"""Options of workflows, steps and starts: frozen, keyword-only records."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tenantflow.errors import ConfigError, SerializationError

MIN_PRIORITY, MAX_PRIORITY = -1000, 1000


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a failing step is retried: exponential backoff with jitter, capped.

    The delay before attempt ``n + 1`` is ``initial_interval * backoff_coefficient ** (n - 1)``,
    capped at ``max_interval``, then spread by ``± jitter`` (a fraction). Exceptions that are
    instances of ``non_retryable`` fail the step at once; others retry only when they are
    instances of ``retry_on``.
    """

    max_attempts: int = 3
    initial_interval: float = 0.5
    backoff_coefficient: float = 2.0
    max_interval: float = 30.0
    jitter: float = 0.2
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_interval < 0 or self.max_interval < 0:
            raise ConfigError("RetryPolicy intervals must not be negative")
        if self.backoff_coefficient < 1:
            raise ConfigError("RetryPolicy.backoff_coefficient must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("RetryPolicy.jitter is a fraction between 0 and 1")

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (1-based), which raised ``exc``, is retried."""
        if attempt >= self.max_attempts:
            return False
        if isinstance(exc, (SerializationError, *self.non_retryable)):
            return False
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(
            self.initial_interval * self.backoff_coefficient ** (attempt - 1), self.max_interval
        )
        spread = base * self.jitter
        return max(0.0, base + random.uniform(-spread, spread))


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """Options of a step: its retry policy, a timeout per attempt (seconds), and the circuit
    breaker guarding its dependency (``breaker_per_tenant``: each tenant its own)."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None
    breaker: str | None = None
    breaker_per_tenant: bool = False
    bulkhead: str | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("a step timeout must be positive")


@dataclass(frozen=True, kw_only=True)
class WorkflowOptions:
    """Options of a workflow.

    ``timeout`` counts from the first start of the run, durable sleeps included. A run that is
    recovered after a crash more than ``max_recovery_attempts`` times fails.
    """

    timeout: float | None = None
    max_recovery_attempts: int = 10

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("a workflow timeout must be positive")
        if self.max_recovery_attempts < 0:
            raise ConfigError("max_recovery_attempts must not be negative")


@dataclass(frozen=True, kw_only=True)
class StartOptions:
    """Options of one start: an idempotency key and a priority (higher runs first)."""

    idempotency_key: str | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        key = self.idempotency_key
        if key is not None and not (1 <= len(key) <= 255):
            raise ConfigError("an idempotency key is 1 to 255 characters")
        priority = self.priority
        if (
            isinstance(priority, bool)
            or not isinstance(priority, int)
            or not MIN_PRIORITY <= priority <= MAX_PRIORITY
        ):
            raise ConfigError(f"a priority is a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}")
