"""What a base install (no extras) does: every public module imports, and a setting that
needs an extra says which one to install, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "base_install.py"


def without_extras(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--without-extras", *args],
        cwd=cwd,
        env={**base, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_public_module_imports_without_the_extras(tmp_path: Path) -> None:
    done = without_extras("imports", cwd=tmp_path, env={})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith(" modules; 0 failed\n"), done.stdout


@pytest.mark.parametrize(
    ("command", "env", "line"),
    [
        (
            ["status"],
            {"TENANTFLOW_DATABASE_URL": "postgresql://tf:s3cret@127.0.0.1:5432/tf"},
            "TENANTFLOW_DATABASE_URL=postgresql://… needs psycopg, which is not installed: "
            "pip install 'tenantflow[postgres]'",
        ),
        (
            ["status"],
            {"TENANTFLOW_QUEUE_URL": "redis://127.0.0.1:6379/0"},
            "TENANTFLOW_QUEUE_URL=redis://… needs redis, which is not installed: "
            "pip install 'tenantflow[redis]'",
        ),
        (
            ["status"],
            {"TENANTFLOW_TRACING": "true"},
            "TENANTFLOW_TRACING=true needs opentelemetry.sdk, which is not installed: "
            "pip install 'tenantflow[tracing]'",
        ),
        (
            ["worker"],
            {"TENANTFLOW_EVENT_LOOP": "uvloop"},
            "TENANTFLOW_EVENT_LOOP=uvloop needs uvloop, which is not installed: "
            "pip install 'tenantflow[fast]'",
        ),
    ],
)
def test_a_missing_extra_is_one_line(
    tmp_path: Path, command: list[str], env: dict[str, str], line: str
) -> None:
    done = without_extras("cli", *command, cwd=tmp_path, env=env)
    assert (done.returncode, done.stderr) == (2, f"error: {line}\n")
    assert "s3cret" not in done.stdout + done.stderr


def test_the_base_install_serves_the_embedded_default(tmp_path: Path) -> None:
    done = without_extras("cli", "demo", "--orders", "2", cwd=tmp_path, env={})
    assert done.returncode == 0, done.stderr
    assert "acme" in done.stdout and "globex" in done.stdout
