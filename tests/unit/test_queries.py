"""The run store's named statements (``store/queries.sql``): each used, each use defined, no
status re-typed, the columns of the records as the records have them."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest

from tenantflow.store import schema
from tenantflow.store.queries import INCLUDE, Q, output_columns, parse, render
from tenantflow.store.records import RunRecord, StepKind, StepRecord, StepStatus

ROOT = Path(__file__).parents[2]
USE = re.compile(r"""\bQ\[\s*["'](\w+)["']\s*\]""")
SOURCE = resources.files("tenantflow.store").joinpath("queries.sql").read_text("utf-8")


def uses() -> dict[str, list[str]]:
    """Each statement named in the code (``Q["name"]``), with the files naming it."""
    found: dict[str, list[str]] = {}
    for folder in ("src", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in USE.findall(path.read_text("utf-8")):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_use_names_a_statement_that_exists() -> None:
    missing = {name: files for name, files in uses().items() if name not in Q}
    assert not missing, f"named in the code, not in queries.sql: {missing}"


def test_every_statement_is_used() -> None:
    entries = parse(SOURCE)
    included = {key for text in entries.values() for key in INCLUDE.findall(text)}
    unused = set(entries) - set(uses()) - included
    assert not unused, f"in queries.sql, used nowhere: {sorted(unused)}"


def test_no_status_is_typed_in_a_statement() -> None:
    # Values come from RunStatus and StepStatus ("{RunStatus.QUEUED}"): no literal at all.
    for name, text in parse(SOURCE).items():
        assert "'" not in text, f"{name}: a literal in the text"


def test_the_run_columns_are_the_records_and_the_tables() -> None:
    run_fields = [f.name for f in dataclasses.fields(RunRecord) if f.name != "tenant_id"]
    assert list(Q["get_run"].columns) == run_fields
    assert set(run_fields) <= set(schema.runs.c.keys())
    step_fields = [f.name for f in dataclasses.fields(StepRecord)]
    assert list(Q["steps_of_run"].columns) == step_fields
    assert set(step_fields) <= set(schema.steps.c.keys())


def test_step_params_follow_the_step_columns() -> None:
    step = StepRecord(
        run_id="r",
        seq=1,
        name="n",
        kind=StepKind.EVENT,
        status=StepStatus.PENDING,
        output=b"o",
        error=b"e",
        attempts=2,
        started_at=3.0,
        finished_at=4.0,
    )
    expected = tuple(getattr(step, c) for c in Q["steps_of_run"].columns)
    assert step.params() == expected
    assert StepRecord.from_row(step.params(), Q["steps_of_run"].at) == step


def test_statements_are_rendered_once_with_their_parts() -> None:
    claim = Q["claim_queued"]
    assert "status = 'queued'" in claim and "RETURNING id, workflow, status," in claim
    assert "{" not in Q["record_step_pg"]
    assert "{for_update}" in Q["claim_read"]  # left for the database layer
    assert Q["renew_leases"].many(2).count("(?, ?, ?)") == 2
    assert Q["open_children"].endswith(
        "NOT IN ('completed', 'failed', 'cancelled', 'compensated', 'needs_attention')"
    )


@pytest.mark.parametrize(
    ("text", "columns"),
    [
        ("UPDATE runs SET a = ? WHERE id = ?", ()),
        ("INSERT INTO t (a) SELECT a FROM u RETURNING id, trace", ("id", "trace")),
        ("WITH x AS (UPDATE t SET a = 1 RETURNING b) SELECT x.b FROM x", ("b",)),
        ("SELECT COUNT(*) AS count, MIN(f(a, b)) AS low FROM t", ("count", "low")),
        ("SELECT EXISTS (SELECT 1 FROM t) OR EXISTS (SELECT 1 FROM u) AS any", ("any",)),
    ],
)
def test_output_columns(text: str, columns: tuple[str, ...]) -> None:
    assert output_columns(text) == columns


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("-- a --\nSELECT COUNT(*) FROM t", "without a name"),
        ("-- a --\nSELECT {b} FROM t", "not defined"),
        ("-- a --\nSELECT {a} AS x FROM t", "includes itself"),
        ("-- a --\nSELECT 1 AS x\n-- a --\nSELECT 2 AS x", "named twice"),
    ],
)
def test_a_wrong_statements_file_is_refused(source: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        render(parse(source))
