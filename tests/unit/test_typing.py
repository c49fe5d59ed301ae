"""Starting a workflow is checked against its signature by the type checker (ParamSpec)."""

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


def test_start_and_steps_are_checked_against_signatures(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(textwrap.dedent(SNIPPET))
    stdout, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path), str(source)]
    )
    assert status == 1, stdout
    error_lines = sorted(
        {int(line.split(":")[1]) for line in stdout.splitlines() if ": error:" in line}
    )
    assert error_lines == [22, 23, 24, 25], stdout
