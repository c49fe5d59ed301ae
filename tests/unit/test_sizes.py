"""Small pieces: no module in ``src/`` over 500 lines, no function over 60. A piece that grows
past them is split where it says two things; the test names every offender at once."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[2] / "src"
MODULE_LINES = 500
FUNCTION_LINES = 60


def offenders(root: Path = SRC) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(root)
        lines = len(text.splitlines())
        if lines > MODULE_LINES:
            found.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_modules_and_functions_stay_small() -> None:
    assert offenders() == []


def test_an_offender_is_named(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text("def f():\n" + "    x = 1\n" * 70)
    (tmp_path / "small.py").write_text("def g():\n" + "    x = 1\n" * 59)
    assert offenders(tmp_path) == ["big.py:1 f(): 71 lines"]
