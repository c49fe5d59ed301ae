"""The documentation against the code it describes: settings, run states, links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from tenantflow import RunStatus, Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
TABLE_HEADER = "| variable | default | meaning |"
PREFIX = "TENANTFLOW_"


def settings_tables(path: Path) -> dict[str, str]:
    """The rows of every ``| variable | default | meaning |`` table: variable -> default."""
    rows: dict[str, str] = {}
    in_table = False
    for line in path.read_text().splitlines():
        if line == TABLE_HEADER:
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
        if not in_table or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 3, f"{path.name}: not three cells: {line}"
        variable = re.fullmatch(r"`(TENANTFLOW_[A-Z0-9_]+)`", cells[0])
        assert variable, f"{path.name}: one variable per row, in backticks: {line}"
        assert variable[1] not in rows, f"{path.name}: {variable[1]} twice"
        rows[variable[1]] = cells[1]
    return rows


def documented_default(cell: str, name: str) -> object:
    """``unset (...)`` is None; otherwise the first code span, read as the variable would be."""
    if cell.startswith("unset"):
        return None
    value = re.match(r"`([^`]+)`", cell)
    assert value, f"{name}: a default is `value` or unset (...), not {cell!r}"
    annotation = Settings.model_fields[name].annotation
    assert annotation is not None
    return TypeAdapter(annotation).validate_python(value[1])


def variable(name: str) -> str:
    return PREFIX + name.upper()


@pytest.mark.parametrize("path", [CONFIGURATION, README], ids=lambda p: p.name)
def test_documented_settings_exist_with_their_defaults(path: Path) -> None:
    fields = {variable(name): name for name in Settings.model_fields}
    rows = settings_tables(path)
    assert rows, f"no settings table in {path.name}"
    unknown = sorted(set(rows) - set(fields))
    assert not unknown, f"{path.name} documents variables that are no setting: {unknown}"
    for var, cell in rows.items():
        name = fields[var]
        assert documented_default(cell, name) == Settings.model_fields[name].default, var


def test_every_setting_is_documented() -> None:
    documented = set(settings_tables(CONFIGURATION))
    missing = sorted(set(map(variable, Settings.model_fields)) - documented)
    assert not missing, f"add to docs/configuration.md: {missing}"


def test_variables_mentioned_anywhere_exist() -> None:
    from tenantflow.cli.platform import PASSWORD_VARIABLE

    # A command's input that is no setting: the administrator's password of `tenantflow admin`.
    known = {*map(variable, Settings.model_fields), PASSWORD_VARIABLE}
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        mentioned = set(re.findall(r"TENANTFLOW_[A-Z][A-Z0-9_]*", path.read_text()))
        # The test suite's own variables (tests/conftest.py) are not settings.
        unknown = sorted(v for v in mentioned - known if not v.startswith("TENANTFLOW_TEST_"))
        assert not unknown, f"{path.name} mentions {unknown}"


def test_the_concepts_name_every_run_state() -> None:
    run = re.search(r"^- \*\*Run\.\*\*(.*?)^- \*\*", README.read_text(), re.S | re.M)
    assert run, "README's Concepts have a Run bullet"
    missing = [s.value for s in RunStatus if f"`{s.value}`" not in run[1]]
    assert not missing, f"the Run bullet does not name {missing}"


def test_readme_links_resolve() -> None:
    for target in re.findall(r"\]\(((?:docs|src|tests)/[^)#]+)", README.read_text()):
        assert (ROOT / target).exists(), target


def test_the_problem_types_are_listed() -> None:
    from tenantflow.api import problems

    table = re.search(
        r"^\| status \| kinds \|\n\|---\|---\|\n((?:\|.*\n)+)",
        (ROOT / "docs" / "platform.md").read_text(),
        re.M,
    )
    assert table, "docs/platform.md lists the problem types in a | status | kinds | table"
    listed = {
        (int(status), kind)
        for status, kinds in re.findall(r"^\| (\d{3}) \| (.*) \|$", table[1], re.M)
        for kind in re.findall(r"`([a-z-]+)`", kinds)
    }
    mapped = {(status, slug) for _, status, slug in problems._MAPPING}
    assert mapped <= listed, f"not listed: {sorted(mapped - listed)}"
