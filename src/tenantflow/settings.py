"""One settings object, read from ``TENANTFLOW_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tenantflow.errors import ConfigError

# The platform database's share of ``database_connections`` (its pool's size and overflow).
PLATFORM_CONNECTIONS = 4


class Settings(BaseSettings):
    """Settings of a tenantflow process.

    With nothing set, everything lives in SQLite files under ``home`` (the embedded default).
    """

    model_config = SettingsConfigDict(env_prefix="TENANTFLOW_", frozen=True, extra="ignore")

    home: Path = Field(default=Path(".tenantflow"), description="Folder of the embedded files.")
    database_url: str | None = Field(
        default=None, description="Platform database; unset means SQLite under home."
    )
    queue_url: str | None = Field(default=None, description="Queue; unset means SQLite under home.")
    tenant_db_prefix: str = Field(
        default="tf_",
        pattern="^[a-z][a-z0-9_]{0,20}$",
        description="PostgreSQL: tenant databases are named {prefix}tenant_{id}.",
    )
    tenant_template: str | None = Field(
        default=None, description="PostgreSQL template database; default {prefix}template."
    )
    max_open_tenant_dbs: int = Field(default=32, ge=1, description="Tenant stores kept open.")
    tenant_pool_size: int = Field(default=2, ge=1, description="Connections per tenant pool.")
    database_connections: int = Field(
        default=32,
        ge=PLATFORM_CONNECTIONS + 1,
        description="PostgreSQL connections of a process in total, tenant databases and the "
        "platform database together, however many tenants.",
    )
    database_wait_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a PostgreSQL connection when the budget is in use; then "
        "DatabaseBusyError (HTTP 503).",
    )
    queue_prefix: str = Field(
        default="tf", pattern="^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every Redis key."
    )
    tenant_max_inflight: int = Field(
        default=0, ge=0, description="Messages of one tenant in flight; 0: no cap."
    )
    worker_concurrency: int = Field(default=64, ge=1, le=10_000)
    lease_seconds: float = Field(default=30.0, gt=0, description="Lease of a claimed run.")
    max_deliveries: int = Field(default=10, ge=1, description="Deliveries before dead letter.")
    poll_interval: float = Field(default=0.05, gt=0, description="Idle wait between dequeues.")
    reconcile_interval: float = Field(
        default=5.0, gt=0, description="Seconds between outbox relay and reconciler sweeps."
    )
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    redis_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Longest wait for Redis to connect or answer a command."
    )
    database_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="PostgreSQL: connect timeout, and the longest statement or idle-in-"
        "transaction time of tenantflow's own sessions; 0: no limit.",
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        default="NORMAL",
        description="NORMAL survives a process crash; FULL also a power loss (fsync per commit).",
    )
    # -- platform plane and HTTP API --
    token_ttl_seconds: float = Field(default=900, gt=0, description="Access token lifetime.")
    access_cache_seconds: float = Field(
        default=10,
        gt=0,
        description=(
            "How long an API process keeps a token's grant (membership, role, key) without "
            "reading it again, while Redis proves every change reached it; see docs/platform.md."
        ),
    )
    license_ttl_seconds: float = Field(
        default=7 * 86400, gt=0, description="License lifetime: how long a platform outage lasts."
    )
    license_refresh_seconds: float = Field(
        default=60, gt=0, description="How often the tenant plane fetches licenses and keys."
    )
    api_host: str = Field(default="127.0.0.1")
    api_port: int = Field(default=8000, ge=0, le=65535)
    max_request_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body.")
    rate_limit_per_second: float | None = Field(
        default=None, gt=0, description="Requests per second per tenant, when its plan says none."
    )
    # Sign-in lock-outs (api.signin): failures before each further one locks out the account
    # (the address) for twice as long as the last, from 1 s up to the longest.
    signin_account_failures: int = Field(default=5, ge=1, description="Per account (email).")
    signin_address_failures: int = Field(default=20, ge=1, description="Per client address.")
    signin_lockout_max_seconds: float = Field(
        default=900, gt=0, description="The longest; failures are forgotten this long after."
    )
    signin_concurrency: int = Field(
        default=2, ge=1, le=64, description="Password hashes a process computes at once."
    )
    # -- telemetry --
    stuck_run_seconds: float = Field(
        default=600,
        gt=0,
        description="A queued or running run without progress this long is stuck.",
    )
    queue_lag_seconds: float = Field(
        default=60, gt=0, description="A tenant's oldest unacknowledged message this old is lag."
    )
    health_refresh_seconds: float = Field(
        default=15,
        gt=0,
        description="How often a process surveys stuck runs and queues for /readyz and metrics.",
    )
    metrics_per_tenant: bool = Field(
        default=True, description="A tenant label on run and queue metrics (cardinality)."
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="A worker serves /metrics here; 0: off."
    )
    metrics_host: str = Field(default="127.0.0.1", description="Where a worker's /metrics binds.")
    metrics_token: str | None = Field(
        default=None,
        repr=False,
        description="A bearer secret for scraping the API's /metrics (else platform admins only).",
    )
    tracing: bool = Field(
        default=False,
        description="OpenTelemetry tracing (export configured by the standard OTEL_* variables).",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto",
        description="The worker's and server's event loop: auto takes uvloop when installed "
        "(tenantflow[fast]).",
    )
    log_level: str = Field(default="INFO")
    log_format: str = Field(default="console", pattern="^(console|json)$")

    def resolved_database_url(self) -> str:
        """The platform database's URL: ``database_url``, or SQLite under ``home``."""
        return self.database_url or f"sqlite:///{self.home / 'platform.db'}"

    def resolved_queue_url(self) -> str:
        """The queue's URL: ``queue_url``, or SQLite under ``home``."""
        return self.queue_url or f"sqlite:///{self.home / 'queue.db'}"


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///path`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError(f"not a SQLite URL: {url.split(':', 1)[0]}://…")
    return Path(url[len(prefix) :])
