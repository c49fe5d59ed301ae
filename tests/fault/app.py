"""The workflow the fault suite runs: a step, a durable sleep (a timer in the queue), two more
steps; each step writes to a ledger file that tenantflow knows nothing about, a line when it
begins and one when its effect is done.

The ledger (``TENANTFLOW_TEST_FAULT_LEDGER``) is a file opened for appending, one short JSON line
per write (appends of one line are whole on a local file system): it survives every fault the
suite injects into PostgreSQL, Redis and the workers, and a frozen process holds no lock on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from tenantflow import App, WorkflowContext, current_step

app = App("fault-suite")

LEDGER_ENV = "TENANTFLOW_TEST_FAULT_LEDGER"
STEP_SECONDS = float(os.environ.get("TENANTFLOW_TEST_FAULT_STEP_SECONDS", "0.2"))
SLEEP_SECONDS = float(os.environ.get("TENANTFLOW_TEST_FAULT_SLEEP_SECONDS", "1.0"))
STEPS = 3


def write(event: str, key: str, n: int) -> None:
    line = json.dumps({"key": key, "n": n, "event": event, "pid": os.getpid(), "t": time.time()})
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@app.step
async def effect(n: int) -> int:
    key = current_step().idempotency_key  # run_id:seq
    write("begin", key, n)
    await asyncio.sleep(STEP_SECONDS)
    write("done", key, n)  # the effect; its checkpoint commits after this line
    return n


@app.workflow
async def transfer(ctx: WorkflowContext, n: int) -> int:
    total = await effect(n)
    await ctx.sleep(SLEEP_SECONDS)
    for i in range(1, STEPS):
        total += await effect(n + i)
    return total
