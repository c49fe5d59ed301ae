"""The layers of the code, as import-linter contracts ([tool.importlinter] in pyproject.toml):
kept by the code as it is, and broken by a deliberate violation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(source: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with the project's contracts, over the package found in ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_code_keeps_its_layers() -> None:
    done = lint_imports(ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", done.stdout), done.stdout


def test_a_platform_module_importing_the_engine_breaks_a_contract(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "tenantflow", copy / "tenantflow")
    audit = copy / "tenantflow" / "platform" / "audit.py"
    audit.write_text(audit.read_text() + "\nimport tenantflow.engine.executor  # a violation\n")
    done = lint_imports(copy)
    assert done.returncode != 0, done.stdout
    assert "the platform plane never imports execution" in done.stdout
    assert "tenantflow.platform.audit -> tenantflow.engine.executor" in done.stdout
