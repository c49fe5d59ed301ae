"""Workflows the tracing tests follow: a saga whose charge can fail (steps, a retry, a
compensation), and a parent that starts a child."""

from __future__ import annotations

from tenantflow import App, RetryPolicy, WorkflowContext

app = App("tracing-tests")


@app.step
async def reserve(item: str) -> str:
    return f"reserved {item}"


@app.step
async def release(item: str) -> None:
    return None


@app.step(retry=RetryPolicy(max_attempts=2, initial_interval=0.01))
async def charge(item: str, fail: bool) -> None:
    if fail:
        raise RuntimeError("card declined")


@app.workflow
async def order(ctx: WorkflowContext, item: str, fail: bool) -> str:
    async with ctx.saga() as saga:
        saga.compensate(release, item)
        await reserve(item)
        await charge(item, fail)
    return "ordered"


@app.workflow
async def parent(ctx: WorkflowContext, item: str) -> str:
    return await ctx.run_child(order, item, False)
