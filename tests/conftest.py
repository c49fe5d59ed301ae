"""Fixtures shared by the suite. ``backend`` runs a test against the embedded default (SQLite
files) and against production (PostgreSQL database per tenant + Redis Streams), on the real
servers: in CI a server that does not answer fails the test, it never skips it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tenantflow import App, Runtime, Settings, Worker
from tenantflow.store.schema import HEAD_REVISION

POSTGRES_URL = os.environ.get(
    "TENANTFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TENANTFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Migrated once, shared by every test's tenant databases; one per schema revision, so that
# checkouts at different revisions testing against one server do not migrate it to and fro.
TEMPLATE = f"tftest_template_{HEAD_REVISION}"


def production_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings with a platform database, tenant databases and Redis keys of this test only."""
    from tenantflow.platform.provision import with_database

    uid = uuid.uuid4().hex[:10]
    values: dict[str, object] = {
        "home": tmp_path / "home",
        "database_url": with_database(POSTGRES_URL, f"tftest_{uid}_platform"),
        "queue_url": REDIS_URL,
        "queue_prefix": f"tftest{uid}",
        "tenant_db_prefix": f"tftest_{uid}_",
        "tenant_template": TEMPLATE,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess the same settings."""
    return {
        f"TENANTFLOW_{name.upper()}": str(value)
        for name, value in settings.model_dump().items()
        if value is not None
    }


def cleanup_production(settings: Settings) -> None:
    import psycopg

    from tenantflow.platform.provision import PostgresProvisioner, database_name

    assert settings.database_url is not None
    PostgresProvisioner(settings.database_url, settings.tenant_db_prefix).drop_all()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(
            f'DROP DATABASE IF EXISTS "{database_name(settings.database_url)}" WITH (FORCE)'
        )
    cleanup_redis(settings)


def cleanup_redis(settings: Settings) -> None:
    """Delete the Redis keys of these settings' prefix."""
    import redis

    assert settings.queue_url is not None
    client = redis.Redis.from_url(settings.queue_url)
    try:
        keys = list(client.scan_iter(match=f"{settings.queue_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["embedded", "production"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path) -> Iterator[Settings]:
    common = {
        "lease_seconds": 2.0,
        "poll_interval": 0.02,
        "shutdown_grace_seconds": 2.0,
        "reconcile_interval": 0.5,
    }
    if backend == "embedded":
        yield Settings(home=tmp_path / "home", **common)  # type: ignore[arg-type]
        return
    settings = production_settings(tmp_path, **common)
    yield settings
    cleanup_production(settings)


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    rt.registry.create("acme")
    rt.registry.create("globex")
    yield rt
    await rt.close()


@contextlib.asynccontextmanager
async def running_worker(
    app: App, runtime: Runtime, *, concurrency: int | None = None
) -> AsyncIterator[Worker]:
    """A worker on the test's event loop, stopped (gracefully) at the end of the block."""
    worker = Worker(app, runtime, concurrency=concurrency)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


def run_python(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """``python *args`` as a user runs it, with none of this process's TENANTFLOW_* or OTEL_*
    variables (plus ``env``); its output, once it exited 0."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TENANTFLOW_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
