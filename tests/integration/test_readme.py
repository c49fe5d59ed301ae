"""README's "An example" runs as written: the block is saved to a file and run with Python."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import run_python

README = Path(__file__).resolve().parents[2] / "README.md"


def example_block() -> str:
    section = README.read_text().split("\n## An example\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README's example section has a python block"
    return block[1]


def test_the_readme_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "billing.py"
    script.write_text(example_block())
    # The example on the embedded default, in tmp_path.
    out = run_python(str(script), cwd=tmp_path, env={"TENANTFLOW_HOME": str(tmp_path / "home")})
    # The charge id, made from the step's idempotency key (run id, position in the run).
    lines = [line for line in out.splitlines() if line.startswith("ch_")]
    assert len(lines) == 1 and re.fullmatch(r"ch_[0-9a-f]{32}:\d+", lines[0]), out
    assert (tmp_path / "home" / "tenants" / "acme.db").exists()
