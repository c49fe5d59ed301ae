"""tenantflow: multi-tenant durable workflows for Python.

A workflow is plain async Python whose steps are checkpointed in its tenant's own database, so
a crash resumes exactly where it stopped.
"""

from tenantflow.client import Client, RunHandle, TenantClient
from tenantflow.errors import (
    BackendUnavailableError,
    BulkheadFullError,
    ChildWorkflowError,
    CircuitOpenError,
    ConfigError,
    DatabaseBusyError,
    EventPayloadError,
    IdempotencyConflictError,
    InvalidArgumentsError,
    InvalidCursorError,
    InvalidInputError,
    InvalidTenantIdError,
    MaxRecoveryAttemptsExceededError,
    NonDeterminismError,
    NotFoundError,
    ResultTimeoutError,
    RunCancelledError,
    RunFailedError,
    RunFinishedError,
    RunNotFoundError,
    SerializationError,
    StepFailedError,
    StepTimeoutError,
    StoreUnavailableError,
    TenantDatabaseMissingError,
    TenantflowError,
    TenantNotFoundError,
    TenantSuspendedError,
    WorkflowNotRegisteredError,
    WorkflowTimeoutError,
)
from tenantflow.resilience.breaker import BreakerConfig
from tenantflow.resilience.bulkhead import BulkheadConfig
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App, Step, Workflow
from tenantflow.sdk.context import Saga, StepContext, WorkflowContext, current_step
from tenantflow.sdk.options import RetryPolicy, StartOptions, StepOptions, WorkflowOptions
from tenantflow.settings import Settings
from tenantflow.store.records import RunRecord, RunStatus, StepRecord
from tenantflow.worker.worker import Worker

__all__ = [
    "App",
    "BackendUnavailableError",
    "BreakerConfig",
    "BulkheadConfig",
    "BulkheadFullError",
    "ChildWorkflowError",
    "CircuitOpenError",
    "Client",
    "ConfigError",
    "DatabaseBusyError",
    "EventPayloadError",
    "IdempotencyConflictError",
    "InvalidArgumentsError",
    "InvalidCursorError",
    "InvalidInputError",
    "InvalidTenantIdError",
    "MaxRecoveryAttemptsExceededError",
    "NonDeterminismError",
    "NotFoundError",
    "ResultTimeoutError",
    "RetryPolicy",
    "RunCancelledError",
    "RunFailedError",
    "RunFinishedError",
    "RunHandle",
    "RunNotFoundError",
    "RunRecord",
    "RunStatus",
    "Runtime",
    "Saga",
    "SerializationError",
    "Settings",
    "StartOptions",
    "Step",
    "StepContext",
    "StepFailedError",
    "StepOptions",
    "StepRecord",
    "StepTimeoutError",
    "StoreUnavailableError",
    "TenantClient",
    "TenantDatabaseMissingError",
    "TenantNotFoundError",
    "TenantSuspendedError",
    "TenantflowError",
    "Worker",
    "Workflow",
    "WorkflowContext",
    "WorkflowNotRegisteredError",
    "WorkflowOptions",
    "WorkflowTimeoutError",
    "current_step",
]
__version__ = "0.1.0"
