"""Workflows the HTTP API tests start."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from tenantflow import App, WorkflowContext

app = App("api-tests")


@app.step
async def hello(name: str) -> str:
    return f"hello {name}"


@app.step
async def pause(seconds: float) -> None:
    await asyncio.sleep(seconds)


@app.workflow
async def greet(ctx: WorkflowContext, name: str) -> str:
    return await hello(name)


@app.workflow
async def slow(ctx: WorkflowContext, seconds: float) -> float:
    await pause(seconds)
    return seconds


class Order(BaseModel):
    order_id: str
    sku: str
    quantity: int
    amount_cents: int


@app.workflow
async def fulfil_order(ctx: WorkflowContext, order: Order) -> str:
    return await hello(order.sku)


@app.workflow
async def approval(ctx: WorkflowContext, order: int) -> dict[str, object]:
    decision = await ctx.wait_for_event("decision", timeout=60)
    return {"order": order, "decision": decision}
