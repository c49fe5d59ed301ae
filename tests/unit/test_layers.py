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


def broken_by(tmp_path: Path, module: str, line: str) -> str:
    """The linter's report on a copy of the code where ``module`` has ``line`` added."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "tenantflow", copy / "tenantflow")
    path = copy / "tenantflow" / module
    path.write_text(path.read_text() + f"\n{line}  # a violation\n")
    done = lint_imports(copy)
    assert done.returncode != 0, done.stdout
    return done.stdout


def test_a_platform_module_importing_the_engine_breaks_a_contract(tmp_path: Path) -> None:
    report = broken_by(tmp_path, "platform/audit.py", "import tenantflow.engine.executor")
    assert "the platform plane never imports execution" in report
    assert "tenantflow.platform.audit -> tenantflow.engine.executor" in report


def test_the_sdk_importing_the_engine_breaks_the_layers(tmp_path: Path) -> None:
    # The cycle there was (the context typed by the engine's Execution) comes back as a break.
    report = broken_by(tmp_path, "sdk/context.py", "import tenantflow.engine.executor")
    assert "the layers, from the entry points down to the backends BROKEN" in report
    assert "tenantflow.sdk.context -> tenantflow.engine.executor" in report
