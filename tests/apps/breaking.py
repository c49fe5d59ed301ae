"""A workflow whose step calls a dependency over HTTP (a server the test runs on loopback)
through the circuit breaker ``dependency``, shared by every worker process."""

from __future__ import annotations

import os

import httpx

from tenantflow import App, RetryPolicy, WorkflowContext
from tenantflow.resilience.breaker import BreakerConfig

app = App("breaker-tests")
URL_ENV = "TENANTFLOW_TEST_DEPENDENCY_URL"
CONFIG = BreakerConfig(
    window_size=10,
    minimum_calls=10,
    failure_rate=50.0,
    wait_open=2.0,
    half_open_calls=2,
    probe_timeout=2.0,  # a probe's slot is a lease of 3 s
)
app.breaker("dependency", CONFIG)


@app.step(
    breaker="dependency",
    retry=RetryPolicy(max_attempts=1000, initial_interval=0.05, max_interval=0.2, jitter=0.0),
)
async def call_dependency(n: int) -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(os.environ[URL_ENV], headers={"x-caller": str(os.getpid())})
    reply.raise_for_status()
    return n


@app.workflow
async def use_dependency(ctx: WorkflowContext, n: int) -> int:
    return await call_dependency(n)
