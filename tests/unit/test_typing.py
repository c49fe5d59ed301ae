"""The type checker holds workflow code to its types: starting a workflow to its signature
(ParamSpec), a typed wait for an event to the type it names."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api

SNIPPET = """
from tenantflow import App, TenantClient, WorkflowContext

app = App("typing")


@app.step
def plain(n: int) -> str:
    return str(n)


@app.workflow
async def order(ctx: WorkflowContext, sku: str, qty: int = 1) -> float:
    text: str = await plain(qty)
    return float(len(text + sku))


async def use(tenant: TenantClient) -> None:
    handle = await tenant.start(order, "sku-1", qty=2)
    total: float = await handle.result()
    await tenant.start(order.options(idempotency_key="k"), "sku-2")
    await tenant.start(order, 3)  # line 22: wrong type
    await tenant.start(order, "sku", colour="red")  # line 23: unknown keyword
    wrong: str = await handle.result()  # line 24: the result is a float
    await plain("x")  # line 25: the step takes an int
"""


EVENTS = """
from pydantic import BaseModel

from tenantflow import App, WorkflowContext

app = App("typing")


class Decision(BaseModel):
    approved: bool


@app.workflow
async def review(ctx: WorkflowContext, wait: float | None) -> None:
    maybe: bool | None = await ctx.wait_for_event("approved", type=bool, timeout=60)
    sure: bool = await ctx.wait_for_event("approved", type=bool)
    model: Decision | None = await ctx.wait_for_event("d", type=Decision, timeout=wait)
    anything: str = await ctx.wait_for_event("raw", timeout=1)  # untyped: Any, as before
    wrong: bool = await ctx.wait_for_event("approved", type=bool, timeout=60)  # line 19: None
    other: str = await ctx.wait_for_event("approved", type=bool)  # line 20: a bool
    also: Decision = await ctx.wait_for_event("d", type=Decision, timeout=wait)  # line 21
"""


def _error_lines(tmp_path: Path, snippet: str) -> tuple[list[int], str]:
    source = tmp_path / "snippet.py"
    source.write_text(textwrap.dedent(snippet))
    stdout, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path), str(source)]
    )
    assert status == 1, stdout
    lines = {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    return sorted(lines), stdout


def test_start_and_steps_are_checked_against_signatures(tmp_path: Path) -> None:
    lines, stdout = _error_lines(tmp_path, SNIPPET)
    assert lines == [22, 23, 24, 25], stdout


def test_a_typed_wait_for_an_event_returns_its_type(tmp_path: Path) -> None:
    lines, stdout = _error_lines(tmp_path, EVENTS)
    assert lines == [19, 20, 21], stdout
