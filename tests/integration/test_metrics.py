"""Prometheus metrics, on both backends: what the API serves (and to whom), the tenant label
switched off, a worker's own /metrics, and three worker processes adding up in one scrape."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tenantflow import Client, Runtime
from tenantflow.api.app import create_api
from tenantflow.platform.identity import Role
from tenantflow.worker.worker import Worker
from tests.apps import api as workflows
from tests.commands import free_port
from tests.conftest import running_worker
from tests.integration.test_api import admin, member
from tests.integration.test_crash import Workers


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def test_the_api_serves_metrics_to_the_scraper_and_admins(runtime: Runtime) -> None:
    runtime = Runtime(runtime.settings.model_copy(update={"metrics_token": "scrape-me"}))
    try:
        transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
            tenant = Client(workflows.app, runtime=runtime).tenant("acme")
            async with running_worker(workflows.app, runtime):
                for name in ("a", "b"):
                    await (await tenant.start(workflows.greet, name)).result(timeout=30)
                # The shared gauges come from a survey; the last acknowledgements go out just
                # after the results: survey until the queues show them (the background survey
                # would too). With the worker still serving: a worker that starts on a new
                # queue rebuilds it, and may enqueue a run a second time (dropped when claimed).
                deadline = time.monotonic() + 30
                while any(t.queue_depth for t in (await runtime.health.refresh()).tenants):
                    assert time.monotonic() < deadline, "the queue still holds messages"
                    await asyncio.sleep(0.1)
            scraped = await http.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
            assert scraped.status_code == 200, scraped.text
            got = samples(scraped.text)
            acme = frozenset({("workflow", "greet"), ("tenant", "acme")})
            assert got[("tenantflow_runs_submitted_total", acme)] == 2
            assert got[("tenantflow_runs_finished_total", acme | {("status", "completed")})] == 2
            hello = frozenset({("step", "hello"), ("status", "completed")})
            assert got[("tenantflow_step_duration_seconds_count", hello)] == 2
            for tenant_id in ("acme", "globex"):
                assert got[("tenantflow_queue_depth", frozenset({("tenant", tenant_id)}))] == 0
                assert got[("tenantflow_dead_letters", frozenset({("tenant", tenant_id)}))] == 0
            assert (await http.get("/metrics")).status_code == 401
            viewer = await member(runtime, http, "v@acme.test", "acme", Role.TENANT_ADMIN)
            assert (await http.get("/metrics", headers=viewer)).status_code == 403
            root = await admin(runtime, http)
            assert (await http.get("/metrics", headers=root)).status_code == 200
    finally:
        await runtime.close()


async def test_the_tenant_label_can_be_switched_off(runtime: Runtime) -> None:
    quiet = Runtime(runtime.settings.model_copy(update={"metrics_per_tenant": False}))
    try:
        tenant = Client(workflows.app, runtime=quiet).tenant("acme")
        await tenant.start(workflows.greet, "x")
        await quiet.outbox.published()
        await quiet.metrics.refresh(quiet)
        text = quiet.metrics.exposition().decode()
        assert "acme" not in text and "globex" not in text
        got = samples(text)
        assert got[("tenantflow_runs_submitted_total", frozenset({("workflow", "greet")}))] == 1
        assert got[("tenantflow_queue_depth", frozenset({("tenant", "*")}))] == 1
    finally:
        await quiet.close()


async def test_a_worker_serves_its_own_metrics(runtime: Runtime) -> None:
    port = free_port()
    served = Runtime(runtime.settings.model_copy(update={"metrics_port": port}))
    try:
        tenant = Client(workflows.app, runtime=served).tenant("globex")
        worker = Worker(workflows.app, served)
        task = asyncio.create_task(worker.run())
        try:
            await (await tenant.start(workflows.greet, "w")).result(timeout=30)
            reply = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")
        finally:
            worker.stop()
            await task
        got = samples(reply.text)
        finished = frozenset({("workflow", "greet"), ("tenant", "globex"), ("status", "completed")})
        assert got[("tenantflow_runs_finished_total", finished)] == 1
    finally:
        await served.close()


async def test_a_run_taken_over_from_a_lapsed_lease_is_counted(runtime: Runtime) -> None:
    """A worker claimed the run, then stalled past its lease: the next worker recovers it and
    counts one reclaimed lease; a run that simply completes counts none."""
    tenant = Client(workflows.app, runtime=runtime).tenant("acme")
    stalled = await tenant.start(workflows.greet, "stalled")
    await runtime.outbox.published()
    claim = await runtime.router.store("acme").claim_run(
        stalled.run_id, owner="stalled-worker", now=time.time(), lease=0.2
    )
    assert claim.run is not None and not claim.recovered
    await asyncio.sleep(0.3)
    async with running_worker(workflows.app, runtime):
        assert await stalled.result(timeout=30) == "hello stalled"
        assert await (await tenant.start(workflows.greet, "plain")).result(timeout=30)
    got = samples(runtime.metrics.exposition().decode())
    assert got[("tenantflow_runs_recovered_total", frozenset({("tenant", "acme")}))] == 1
    assert (await stalled.describe()).recoveries == 1


async def test_the_stuck_run_detector(runtime: Runtime) -> None:
    """Runs nobody takes (no worker) become stuck past the threshold, and their queue lags:
    /readyz shows the counts (and stays ready), metrics per tenant."""
    watched = Runtime(
        runtime.settings.model_copy(
            update={"stuck_run_seconds": 0.3, "queue_lag_seconds": 0.3, "metrics_token": "m"}
        )
    )
    try:
        tenant = Client(workflows.app, runtime=watched).tenant("acme")
        for name in ("a", "b", "c"):
            await tenant.start(workflows.greet, name)
        await watched.outbox.published()
        await asyncio.sleep(0.5)
        transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=watched))
        async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["progress"] == {
                "stuck_runs": 3,
                "tenants_with_stuck_runs": 1,
                "lagging_queues": 1,
            }
            assert "acme" not in ready.text  # public: counts only
            scraped = await http.get("/metrics", headers={"Authorization": "Bearer m"})
            got = samples(scraped.text)
            assert got[("tenantflow_stuck_runs", frozenset({("tenant", "acme")}))] == 3
            assert got[("tenantflow_stuck_runs", frozenset({("tenant", "globex")}))] == 0
            lag = got[
                ("tenantflow_queue_oldest_message_age_seconds", frozenset({("tenant", "acme")}))
            ]
            assert lag >= 0.4
    finally:
        await watched.close()


# A survey far slower than an answer may be, even on a loaded 2-core machine (the bound of
# /readyz is 0.9 s; docs/benchmarks.md measures it under load).
SLOW_SURVEY_SECONDS = 8.0
ANSWER_SECONDS = 2.0


async def test_probes_and_scrapes_never_wait_for_a_survey(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The survey behind /readyz's counts and the shared gauges runs in the background: with
    one that takes 8 s (a thousand tenants, a database slow to answer), /readyz answers
    within its bound (without counts until the first survey is in) and /metrics at once, and
    neither starts a survey of its own."""
    from tenantflow.telemetry import health

    real = health.survey
    calls = 0

    async def slow(rt: Runtime, **kwargs: Any) -> list[health.TenantHealth]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(SLOW_SURVEY_SECONDS)
        return await real(rt, **kwargs)

    monkeypatch.setattr(health, "survey", slow)
    watched = Runtime(
        runtime.settings.model_copy(
            update={"metrics_token": "m", "health_refresh_seconds": 60, "stuck_run_seconds": 0.1}
        )
    )
    try:
        await Client(workflows.app, runtime=watched).tenant("acme").start(workflows.greet, "x")
        await watched.outbox.published()
        transport = httpx.ASGITransport(app=create_api(workflows.app, runtime=watched))
        async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
            for _ in range(3):
                began = time.monotonic()
                ready = await http.get("/readyz")
                assert time.monotonic() - began < ANSWER_SECONDS
                assert ready.status_code == 200, ready.text
                assert "progress" not in ready.json()  # the first survey is not in yet
                began = time.monotonic()
                scraped = await http.get("/metrics", headers={"Authorization": "Bearer m"})
                assert time.monotonic() - began < ANSWER_SECONDS
                assert scraped.status_code == 200
            assert calls == 1  # the background one, started by the first probe
            deadline = time.monotonic() + SLOW_SURVEY_SECONDS + 10
            while "progress" not in (ready := (await http.get("/readyz")).json()):
                assert time.monotonic() < deadline, "the first survey never came in"
                await asyncio.sleep(0.1)
            assert ready["progress"]["stuck_runs"] == 1
            assert 0 <= ready["progress_age_seconds"] < SLOW_SURVEY_SECONDS + 10
            got = samples((await http.get("/metrics", headers={"Authorization": "Bearer m"})).text)
            assert got[("tenantflow_stuck_runs", frozenset({("tenant", "acme")}))] == 1
            assert calls == 1
    finally:
        await watched.close()


@pytest.mark.slow
async def test_three_worker_processes_add_up_in_one_scrape(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Multi-process mode (``PROMETHEUS_MULTIPROC_DIR``): three worker processes share the
    work; one scrape of any one of them serves the sum of all three."""
    shared = tmp_path / "prometheus"
    ports = [free_port() for _ in range(3)]
    workers = Workers(runtime.settings, tmp_path)
    runs = 60
    try:
        for port in ports:
            workers.start(
                app="tests.apps.api:app",
                concurrency=4,
                env={"PROMETHEUS_MULTIPROC_DIR": str(shared), "TENANTFLOW_METRICS_PORT": str(port)},
            )
        # Every worker serves before the runs come: a late one would get none of them.
        deadline = time.monotonic() + 60
        for port in ports:
            while True:
                try:
                    await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, f"no worker serves on {port}"
                    await asyncio.sleep(0.1)
        tenant = Client(workflows.app, runtime=runtime).tenant("acme")
        handles = [await tenant.start(workflows.slow, 0.05) for _ in range(runs)]
        for handle in handles:
            assert await handle.result(timeout=60) == 0.05
        for _ in range(100):  # the workers have read the shared gauges at least once
            text = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{ports[0]}/metrics")).text
            if "tenantflow_queue_depth{" in text:
                break
            await asyncio.sleep(0.1)
        scrapes = [
            samples((await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{p}/metrics")).text)
            for p in ports
        ]
    finally:
        workers.stop_all()
    finished = frozenset({("workflow", "slow"), ("tenant", "acme"), ("status", "completed")})
    pause = frozenset({("step", "pause"), ("status", "completed")})
    for got in scrapes:  # any process serves the total
        assert got[("tenantflow_runs_finished_total", finished)] == runs
        assert got[("tenantflow_step_duration_seconds_count", pause)] == runs
        # Shared state is served once per tenant, not once per process (no pid label).
        depth = {labels for (name, labels), _ in got.items() if name == "tenantflow_queue_depth"}
        assert depth == {frozenset({("tenant", "acme")}), frozenset({("tenant", "globex")})}
    # ... and it is the sum of what each process counted in its own file.
    per_process = []
    for path in sorted(shared.glob("counter_*.db")):
        counted = sum(
            s.value
            for metric in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
            for s in metric.samples
            if s.name == "tenantflow_runs_finished_total" and s.labels.get("workflow") == "slow"
        )
        per_process.append(counted)
    assert len(per_process) == 3 and all(n > 0 for n in per_process), per_process
    assert sum(per_process) == runs
