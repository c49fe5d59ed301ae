"""Running the ``tenantflow`` command as a user does, for the tests of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.servers import free_port

ROOT = Path(__file__).parents[1]
__all__ = ["ROOT", "as_json", "free_port", "ok", "tenantflow"]


def tenantflow(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, in ``cwd``, with only the TENANTFLOW_* given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLOW_")}
    base.update(COLUMNS="200", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "tenantflow", *args],
        cwd=cwd,
        env=base,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(done))
