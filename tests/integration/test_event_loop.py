"""No blocking call on the event loop: the HTTP API and a worker serve runs on one loop in
asyncio's debug mode, and no callback takes 50 ms or more.

Each round signs in, submits runs over HTTP, waits for them, lists them and asks for
``/readyz`` and ``/metrics``; a first round warms up (imports, first connections, compiled
statements). A callback that a round finds that slow is looked for again in a second round: a
blocking call is slow every time, a moment when the machine gave the CPU to another process is
not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import httpx
import pytest

from tenantflow import App, Runtime, WorkflowContext
from tenantflow.api.app import create_api
from tenantflow.platform.identity import Role
from tests.conftest import running_worker
from tests.integration.test_api import PASSWORD, finished, member, token

SLOW_SECONDS = 0.05
RUNS = 10

app = App("loop-tests")


@app.step
async def hello(name: str) -> str:
    return f"hello {name}"


@app.step
async def stall(name: str) -> str:
    time.sleep(0.08)  # the mistake the test must find: a blocking call in async code
    return name


@app.workflow
async def greet(ctx: WorkflowContext, name: str) -> str:
    return await hello(name)


@app.workflow
async def stalling(ctx: WorkflowContext, name: str) -> str:
    return await stall(name)


class SlowCallbacks(logging.Handler):
    """asyncio's debug-mode reports of callbacks slower than the loop's threshold."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and " took " in message:
            self.found.append(message)


def where(report: str) -> set[str]:
    """The functions a report names (``coro=<Worker._process() ...>``, ``<Handle f() at``),
    without what changes from one report to the next (addresses, lines, task names)."""
    return set(re.findall(r"([A-Za-z_][\w.]*)\(\)", report))


async def one_round(http: httpx.AsyncClient, email: str, tenant: str, workflow: str) -> None:
    headers = {
        "Authorization": "Bearer "
        + await token(http, grant_type="password", email=email, password=PASSWORD, tenant=tenant)
    }
    ids = []
    for i in range(RUNS):
        reply = await http.post(
            "/v1/runs", json={"workflow": workflow, "args": [f"n{i}"]}, headers=headers
        )
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["id"])
    for run_id in ids:
        assert (await finished(http, headers, run_id))["status"] == "completed"
    assert (await http.get("/v1/runs", headers=headers)).status_code == 200
    assert (await http.get("/readyz")).status_code == 200


async def repeated_slow_callbacks(runtime: Runtime, workflow: str) -> list[str]:
    """The reports of slow callbacks found in a measured round and again in a second one."""
    loop = asyncio.get_running_loop()
    slow = SlowCallbacks()
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(slow)
    debug, threshold = loop.get_debug(), loop.slow_callback_duration
    transport = httpx.ASGITransport(app=create_api(app, runtime=runtime))
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t.test") as http,
            running_worker(app, runtime),
        ):
            await member(runtime, http, "loop@acme.test", "acme", Role.OPERATOR)
            await one_round(http, "loop@acme.test", "acme", "greet")  # warm-up, not measured
            loop.set_debug(True)
            loop.slow_callback_duration = SLOW_SECONDS
            slow.found.clear()
            await one_round(http, "loop@acme.test", "acme", workflow)
            first = slow.found[:]
            if not first:
                return []
            slow.found.clear()
            await one_round(http, "loop@acme.test", "acme", workflow)
            again = {name for report in slow.found for name in where(report)}
            return [r for r in first if where(r) & again]
    finally:
        loop.set_debug(debug)
        loop.slow_callback_duration = threshold
        asyncio_log.removeHandler(slow)


async def test_no_callback_blocks_the_loop_in_the_api_or_the_worker(runtime: Runtime) -> None:
    assert await repeated_slow_callbacks(runtime, "greet") == []


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_a_blocking_call_in_a_step_is_found(runtime: Runtime) -> None:
    found = await repeated_slow_callbacks(runtime, "stalling")
    assert any("Execution.execute" in r or "_process" in r for r in found), found
