"""Workflows that worker subprocesses run in the crash and shutdown tests."""

from __future__ import annotations

import asyncio
import os
import time

from tenantflow import App, WorkflowContext, current_step
from tests.apps import effects

app = App("durable-tests")

STEP_SECONDS = float(os.environ.get("TENANTFLOW_TEST_STEP_SECONDS", "0.15"))


@app.step
async def slow_step(i: int) -> int:
    started = time.time()
    await asyncio.sleep(STEP_SECONDS)
    # The effect is recorded at the end of the step, right before its checkpoint commits,
    # with the span of this execution.
    key = current_step().idempotency_key
    effects.record(key, f"slow_step {i}")
    effects.executed(key, started)
    return i


@app.step
def blocking_step(i: int) -> int:
    time.sleep(STEP_SECONDS)
    effects.record(current_step().idempotency_key, f"blocking_step {i}")
    return i * 10


@app.workflow
async def many_steps(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += await slow_step(i)
    return total


@app.workflow
async def sleeper(ctx: WorkflowContext, seconds: float) -> str:
    await slow_step(0)
    await ctx.sleep(seconds)
    await slow_step(1)
    return "awake"


@app.workflow
async def mixed(ctx: WorkflowContext) -> int:
    a = await blocking_step(1)
    b = await slow_step(2)
    return a + b


@app.step
async def transfer(i: int) -> int:
    await asyncio.sleep(STEP_SECONDS)
    key = current_step().idempotency_key
    effects.record(key, f"transfer {i}")  # every execution, duplicates included
    effects.apply_once(key)  # the effect, once per key
    return i


@app.workflow
async def ledger(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += await transfer(i)
    return total
