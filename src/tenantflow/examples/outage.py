"""A dependency goes down: a circuit breaker, a bulkhead and a timeout keep the workflows
calling it patient instead of failing.

    python -m tenantflow.examples.outage

Twelve checkouts charge a payments API that is down for the first two seconds. Each charge
may try six times, 0.05 s apart and doubling: without the breaker, those tries would be spent
while the API is still down. With it, the breaker opens after four failures, the steps wait
while it is open (waiting uses up no attempt), a single probe tests the API every half
second, and once a probe succeeds every checkout completes. The bulkhead lets two charges
run at once, and each attempt has a one-second timeout. Runs on the embedded default, a
worker in this process.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console

from tenantflow import (
    App,
    BreakerConfig,
    BulkheadConfig,
    Client,
    RetryPolicy,
    Runtime,
    Settings,
    WorkflowContext,
)

app = App("shop")
app.breaker(
    "payments",
    BreakerConfig(
        window_size=4, minimum_calls=4, failure_rate=50, wait_open=0.5, half_open_calls=1
    ),
)
app.bulkhead("payments", BulkheadConfig(max_concurrent=2))
console = Console()
DOWN_FOR_SECONDS = 2.0
down_until = 0.0
calls: Counter[str] = Counter()
busy = 0
most_at_once = 0


@app.step(
    breaker="payments",
    bulkhead="payments",
    timeout=1.0,
    retry=RetryPolicy(max_attempts=6, initial_interval=0.05, jitter=0.0),
)
async def charge(order: str, cents: int) -> str:
    global busy, most_at_once
    busy += 1
    most_at_once = max(most_at_once, busy)
    try:
        calls["made"] += 1
        if time.monotonic() < down_until:
            calls["failed"] += 1
            raise ConnectionError("the payments API is down")
        await asyncio.sleep(0.02)
        return f"{order}: {cents / 100:.2f} charged"
    finally:
        busy -= 1


@app.workflow
async def checkout(ctx: WorkflowContext, order: str, cents: int) -> str:
    return await charge(order, cents)


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


async def main() -> None:
    global down_until
    from tenantflow.worker.worker import Worker

    with tempfile.TemporaryDirectory() as home:
        runtime = Runtime(Settings(home=Path(home)))
        runtime.registry.create("shop")
        tenant = Client(app, runtime=runtime).tenant("shop")
        worker = Worker(app, runtime)
        working = asyncio.create_task(worker.run())
        try:
            down_until = time.monotonic() + DOWN_FOR_SECONDS
            handles = [await tenant.start(checkout, f"order-{i}", 1000 + i) for i in range(12)]
            results = [await h.result(timeout=60) for h in handles]
            attempts = [s.attempts for h in handles for s in await h.steps()]
            say(f"charged: {len(results)} of {len(handles)}")
            say(f"calls to the payments API: {calls['made']} ({calls['failed']} while it was down)")
            say(f"most attempts of one charge: {max(attempts)} of 6")
            say(f"most charges at once: {most_at_once} (bulkhead: 2)")
            status = await runtime.breakers.status("payments")
            say(f"breaker now: {status.state.value}")
        finally:
            worker.stop()
            await working
            await runtime.close()


if __name__ == "__main__":
    asyncio.run(main())
