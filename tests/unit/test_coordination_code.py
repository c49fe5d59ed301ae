"""What the code of the coordination backend promises of itself: behaviour is never chosen by
a class's name, and every Lua file says in its header what it takes and returns."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).parents[2] / "src"
# A class's name compared, or tested for membership: ``type(x).__name__ == "Redis…"``,
# ``x.__class__.__name__ != …``, ``… == Cls.__name__``, ``__name__ in (…)``.
BY_NAME = re.compile(
    r"__class__\.__name__"
    r"|\.__name__\s*(?:==|!=|\bin\b|\bnot in\b)"
    r"|(?:==|!=|\bin\b)\s*[\w.()]*\.__name__\b"
)
# Not a choice of behaviour by a class: pydantic's ValidationError names its model only by
# its title, which is the class's name.
ALLOWED = {("tenantflow/cli/_common.py", "if exc.title != Settings.__name__:")}


def test_no_code_chooses_behaviour_by_a_class_name() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if BY_NAME.search(code) and (relative, line.strip()) not in ALLOWED:
                found.append(f"{relative}:{n}: {line.strip()}")
    assert found == []


def test_the_check_finds_a_class_name_compared() -> None:
    for line in (
        'if queue.__class__.__name__ != "RedisStreamsQueue":',
        'if type(queue).__name__ == "RedisStreamsQueue":',
        'if "Redis" in type(backend).__name__:',
        "if kind.__name__ in {'A', 'B'}:",
    ):
        assert BY_NAME.search(line), line
    assert not BY_NAME.search("log = structlog.get_logger(__name__)")
    assert not BY_NAME.search('if __name__ == "__main__":')
    assert not BY_NAME.search("error=type(exc).__name__,")


def test_every_lua_file_has_a_header_of_its_layout_and_reply() -> None:
    files = sorted(SRC.rglob("*.lua"))
    assert files
    for path in files:
        text = path.read_text()
        header = []
        for line in text.splitlines():
            if not line.startswith("--"):
                break
            header.append(line)
        words = " ".join(header)
        assert header, f"{path.name}: no header"
        shared = "Prepended" in words or "Included" in words
        assert shared or ("KEYS" in words and "Return" in words), f"{path.name}: {words!r}"
        assert "local function now_ms" not in text or path.name == "prelude.lua", path.name
