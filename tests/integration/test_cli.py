"""The quickstart's main job and the inspection commands, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def tenantflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "tenantflow", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_then_inspect_runs(tmp_path: Path) -> None:
    demo = tenantflow("demo", "--orders", "6", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    for tenant in ("acme", "globex"):
        assert tenant in demo.stdout
        assert (tmp_path / ".tenantflow" / "tenants" / f"{tenant}.db").exists()
    assert "retries" in demo.stdout

    listing = tenantflow("runs", "list", "--tenant", "acme", "--status", "completed", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    run_ids = [line.split()[1] for line in listing.stdout.splitlines() if "fulfil_order" in line]
    assert len(run_ids) == 6

    shown = tenantflow("runs", "show", run_ids[0], "--tenant", "acme", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for part in ("completed", "reserve_stock", "charge_card", "sleep", "ship", "tracking"):
        assert part in shown.stdout

    # The other tenant cannot see this run: its database does not hold it.
    other = tenantflow("runs", "show", run_ids[0], "--tenant", "globex", cwd=tmp_path)
    assert other.returncode == 2 and "no run" in other.stdout

    missing = tenantflow("runs", "list", "--tenant", "nobody", cwd=tmp_path)
    assert missing.returncode == 2 and "no tenant" in missing.stdout


def test_demo_runs_unchanged_on_postgresql_and_redis(tmp_path: Path) -> None:
    from tests.conftest import cleanup_production, production_settings, settings_env

    settings = production_settings(tmp_path)
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")},
            **settings_env(settings),
            "COLUMNS": "200",
        }
        demo = subprocess.run(
            [sys.executable, "-m", "tenantflow", "demo", "--orders", "5"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stderr
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "tenantflow",
                "runs",
                "list",
                "--tenant",
                "globex",
                "--status",
                "completed",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.stdout.count("fulfil_order") == 5, listing.stdout
        assert not (tmp_path / ".tenantflow" / "tenants").exists()  # nothing went to SQLite
    finally:
        cleanup_production(settings)
