"""Provisioning and migrating tenant databases, on both backends."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tenantflow import Runtime, Settings
from tenantflow.platform.provision import PostgresProvisioner, sqlalchemy_url
from tenantflow.platform.registry import TenantRegistry
from tenantflow.store.migrate import alembic_config
from tenantflow.store.schema import HEAD_REVISION
from tests.conftest import settings_env

ROOT = Path(__file__).resolve().parents[2]


def downgrade(url: str, revision: str) -> None:
    import sqlalchemy as sa
    from alembic import command

    engine = sa.create_engine(sqlalchemy_url(url))
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    finally:
        engine.dispose()


async def test_migrate_all_reports_each_tenant_and_survives_failures(
    runtime: Runtime, settings: Settings
) -> None:
    registry = runtime.registry
    for i in range(4):
        registry.create(f"t{i}")
    all_ids = ["acme", "globex", "t0", "t1", "t2", "t3"]
    assert {t.id for t in registry.list()} == set(all_ids)
    assert all(t.revision == HEAD_REVISION for t in registry.list())

    report = registry.migrate_all(parallel=3)
    assert report.migrated == [] and report.failed == {}
    assert report.at_head == all_ids

    downgrade(registry.get("t1").database_url, "0001")  # one tenant is behind
    assert registry.provisioner.revision(registry.get("t1").database_url) == "0001"
    registry.provisioner.drop_database("t2")  # one tenant's database is gone
    report = registry.migrate_all(parallel=3)
    assert report.migrated == ["t1"], report
    assert list(report.failed) == ["t2"]
    assert report.at_head == ["acme", "globex", "t0", "t3"]
    assert registry.provisioner.revision(registry.get("t1").database_url) == HEAD_REVISION


async def test_migrate_command_prints_a_report(runtime: Runtime, settings: Settings) -> None:
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tenantflow", "tenants", "migrate"],
        cwd=ROOT,
        env={**settings_env(settings), "PATH": "/usr/bin:/bin", "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "0 migrated, 2 already at head, 0 failed" in out.stdout


async def test_tenant_databases_are_separate(runtime: Runtime, settings: Settings) -> None:
    acme, globex = runtime.registry.get("acme"), runtime.registry.get("globex")
    assert acme.database_url != globex.database_url
    if isinstance(runtime.registry.provisioner, PostgresProvisioner):
        assert acme.database_url.endswith(f"/{settings.tenant_db_prefix}tenant_acme")


def test_long_tenant_ids_get_distinct_databases() -> None:
    provisioner = PostgresProvisioner("postgresql://localhost/x", "tf_")
    base = "a" * 60
    names = {provisioner.database(base + suffix) for suffix in ("", "-b", "-c")}
    assert len(names) == 3
    assert all(len(name.encode()) <= 63 for name in names)
    assert provisioner.database("acme") == "tf_tenant_acme"


def test_tenant_ids_are_checked_whole() -> None:
    import pytest

    from tenantflow import InvalidTenantIdError
    from tenantflow.platform.registry import check_tenant_id

    for bad in ("acme\n", "Acme", "-acme", "a_b", "", "a" * 64):
        with pytest.raises(InvalidTenantIdError):
            check_tenant_id(bad)
    assert check_tenant_id("a" * 63) == "a" * 63


def test_a_platform_connection_in_use_when_the_registry_closes_is_closed_on_return(
    settings: Settings,
) -> None:
    """A thread reading the platform while the registry closes (a read nobody can interrupt)
    gives its connection back to a disposed pool: it is closed then, not left open."""
    registry = TenantRegistry(settings)
    holding = threading.Event()
    done = threading.Event()
    used: list[Any] = []

    def read() -> None:
        with registry.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            used.append(conn.connection.dbapi_connection)
            holding.set()
            done.wait(10)

    reader = threading.Thread(target=read)
    reader.start()
    assert holding.wait(10)
    registry.close()
    done.set()
    reader.join(10)
    assert len(used) == 1
    connection = used[0]
    if isinstance(connection, sqlite3.Connection):  # the embedded default
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            connection.cursor()
    else:
        assert connection.closed
