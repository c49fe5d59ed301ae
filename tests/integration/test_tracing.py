"""Tracing, on both backends: one trace from the HTTP request through the outbox and the queue
to every step and compensation; a redelivery's span linked to the same origin; malformed
trace contexts; spans flushed on shutdown; OTLP export from a worker process configured by
OTEL_* alone; JSON logs carrying trace and span ids; and tracing off leaving no trace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tenantflow import Client, Runtime, Settings
from tenantflow.api.app import create_api
from tenantflow.client import new_run_id
from tenantflow.errors import RunFailedError
from tenantflow.platform.identity import Role
from tenantflow.store.records import NewRun
from tenantflow.telemetry.tracing import Tracing
from tests.apps import traced
from tests.commands import free_port
from tests.conftest import running_worker
from tests.integration.test_api import finished, member
from tests.integration.test_crash import Workers

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_PARENT = "b7ad6b7169203331"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced_runtime(
    settings: Settings, exporter: InMemorySpanExporter
) -> AsyncIterator[Runtime]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = Runtime(settings.model_copy(update={"tracing": True}), tracer_provider=provider)
    rt.registry.create("acme")
    yield rt
    await rt.close()


def spans_named(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


async def test_one_trace_from_the_request_to_every_step_and_compensation(
    traced_runtime: Runtime, exporter: InMemorySpanExporter
) -> None:
    rt = traced_runtime
    transport = httpx.ASGITransport(app=create_api(traced.app, runtime=rt))
    async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
        alice = await member(rt, http, "alice@acme.test", "acme", Role.TENANT_ADMIN)
        exporter.clear()
        headers = {**alice, "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}
        reply = await http.post(
            "/v1/runs", json={"workflow": "order", "args": ["w-9137", True]}, headers=headers
        )
        assert reply.status_code == 202, reply.text
        async with running_worker(traced.app, rt):
            body = await finished(http, alice, reply.json()["id"])
        assert body["status"] == "compensated"
    run_id = reply.json()["id"]
    # The run's spans, without the polls for its end (requests of their own, in own traces).
    spans = tuple(s for s in exporter.get_finished_spans() if not s.name.startswith("GET "))
    trace_ids = {format(s.context.trace_id, "032x") for s in spans}
    assert trace_ids == {CLIENT_TRACE}, [s.name for s in spans]

    server = one(spans, "POST /v1/runs")
    assert server.kind is SpanKind.SERVER and parent_of(server) == int(CLIENT_PARENT, 16)
    assert server.attributes is not None and server.attributes["http.route"] == "/v1/runs"
    submit = one(spans, "submit order")
    assert submit.kind is SpanKind.PRODUCER and parent_of(submit) == server.context.span_id
    consumer = one(spans, "run order")
    assert consumer.kind is SpanKind.CONSUMER and parent_of(consumer) == submit.context.span_id
    assert [link.context.span_id for link in consumer.links] == [submit.context.span_id]
    assert consumer.attributes is not None
    assert consumer.attributes["tenantflow.tenant"] == "acme"
    assert consumer.attributes["tenantflow.run"] == run_id
    assert consumer.attributes["tenantflow.workflow"] == "order"
    assert consumer.attributes["tenantflow.delivery"] == 1
    assert consumer.attributes["tenantflow.status"] == "compensated"

    steps = spans_named(spans, "step ") + spans_named(spans, "compensate ")
    assert all(parent_of(s) == consumer.context.span_id for s in steps)
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time or 0)] == [
        "step reserve",
        "step charge",
        "step charge",
        "compensate release",
    ]
    charges = spans_named(spans, "step charge")
    assert [s.attributes["tenantflow.attempt"] for s in charges if s.attributes] == [1, 2]
    assert all(s.status.status_code is StatusCode.ERROR for s in charges)
    undo = one(spans, "compensate release")
    assert undo.attributes is not None and undo.attributes["tenantflow.compensation"] is True
    assert undo.attributes["tenantflow.seq"] == 2
    # Identifiers only: neither the input nor an error's message travels in a span (the
    # exception's type does).
    assert charges[0].events[0].attributes == {"exception.type": "RuntimeError"}
    for span in spans:
        seen = json.dumps(
            [dict(span.attributes or {}), span.status.description]
            + [dict(event.attributes or {}) for event in span.events]
        )
        assert "w-9137" not in seen and "declined" not in seen, (span.name, seen)


async def test_a_child_run_joins_its_parents_trace(
    traced_runtime: Runtime, exporter: InMemorySpanExporter
) -> None:
    tenant = Client(traced.app, runtime=traced_runtime).tenant("acme")
    handle = await tenant.start(traced.parent, "book")
    async with running_worker(traced.app, traced_runtime):
        assert await handle.result(timeout=30) == "ordered"
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    child = one(spans, "run order")
    assert (
        child.attributes is not None and child.attributes["tenantflow.run"] == f"{handle.run_id}.0"
    )
    parents = [s.context.span_id for s in spans_named(spans, "run parent")]
    assert parent_of(child) in parents


async def test_a_redelivered_message_gets_a_new_span_linked_to_the_same_origin(
    traced_runtime: Runtime, exporter: InMemorySpanExporter
) -> None:
    rt = traced_runtime
    handle = await Client(traced.app, runtime=rt).tenant("acme").start(traced.order, "x", False)
    await rt.outbox.published()
    # A consumer takes the message and dies with it: after the lease, a worker reclaims it.
    (lost,) = await rt.queue.dequeue("ghost", 1, rt.settings.lease_seconds)
    assert lost.trace is not None and lost.deliveries == 1
    async with running_worker(traced.app, rt):
        assert await handle.result(timeout=30) == "ordered"
    spans = exporter.get_finished_spans()
    submit = one(spans, "submit order")
    consumer = one(spans, "run order")
    assert consumer.attributes is not None and consumer.attributes["tenantflow.delivery"] == 2
    assert consumer.context.trace_id == submit.context.trace_id
    assert parent_of(consumer) == submit.context.span_id
    assert [link.context.span_id for link in consumer.links] == [submit.context.span_id]


@pytest.mark.parametrize(
    "bad",
    ["garbage", "00-zz7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "|||", "00-" + "0" * 49],
)
async def test_a_malformed_traceparent_never_stops_a_worker(
    traced_runtime: Runtime, exporter: InMemorySpanExporter, bad: str
) -> None:
    rt = traced_runtime
    store = rt.router.store("acme")
    payload = b'{"args": ["y", false], "kwargs": {}}'
    run, _, outbox = await store.create_run(
        NewRun(id=new_run_id(), workflow="order", input=payload, trace=bad), now=time.time()
    )
    await rt.outbox.publish("acme", outbox)
    async with running_worker(traced.app, rt):
        got = Client(traced.app, runtime=rt).tenant("acme").handle(run.id)
        assert await got.result(timeout=30) == "ordered"
    consumer = one(exporter.get_finished_spans(), "run order")
    assert consumer.parent is None and consumer.links == ()  # a new trace, nothing to link
    # Over HTTP too: the request is served, in a trace of its own.
    transport = httpx.ASGITransport(app=create_api(traced.app, runtime=rt))
    async with httpx.AsyncClient(transport=transport, base_url="http://t.test") as http:
        assert (await http.get("/healthz", headers={"traceparent": bad})).status_code == 200
    assert one(exporter.get_finished_spans(), "GET /healthz").parent is None


async def test_buffered_spans_are_flushed_when_the_runtime_closes(settings: Settings) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    # Exported only when flushed: the schedule is far longer than the test.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    rt = Runtime(settings.model_copy(update={"tracing": True}), tracer_provider=provider)
    try:
        rt.registry.create("acme")
        handle = await Client(traced.app, runtime=rt).tenant("acme").start(traced.order, "z", False)
        async with running_worker(traced.app, rt):
            await handle.result(timeout=30)
        assert exporter.get_finished_spans() == ()
    finally:
        await rt.close()
    assert {s.name for s in exporter.get_finished_spans()} >= {"submit order", "run order"}


def test_tracing_off_imports_nothing_and_carries_nothing(tmp_path: Path) -> None:
    """The default: a run end to end on the embedded default without OpenTelemetry loaded,
    and nothing written with the run or its message."""
    script = f"""
import asyncio, sys
from tenantflow import Client, Runtime, Settings
from tenantflow.worker.worker import Worker
from tests.apps import traced

async def main():
    rt = Runtime(Settings(home={str(tmp_path / "home")!r}))
    rt.registry.create("acme")
    assert not rt.tracing.enabled
    handle = await Client(traced.app, runtime=rt).tenant("acme").start(traced.order, "q", False)
    worker = Worker(traced.app, rt)
    task = asyncio.create_task(worker.run())
    assert await handle.result(timeout=30) == "ordered"
    worker.stop()
    await task
    async with rt.router.borrowed("acme") as store:
        async with store.db.autocommit() as tx:
            row = await tx.one("SELECT trace FROM runs WHERE id = ?", (handle.run_id,))
    await rt.close()
    print(row[0], sorted(m for m in sys.modules if m.startswith("opentelemetry")))

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENANTFLOW_", "OTEL_"))}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.splitlines()[-1] == "None []", out.stdout + out.stderr


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint on loopback that keeps what it receives."""

    received: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.received.append(request)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Collector)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
async def test_a_worker_process_exports_over_otlp_and_logs_json_with_trace_ids(
    settings: Settings, tmp_path: Path, collector: ThreadingHTTPServer
) -> None:
    """Configured by environment variables alone, as in production: the worker's spans reach
    an OTLP endpoint when it shuts down (the batch would otherwise wait ten minutes), in the
    submitter's trace; its JSON log lines carry trace and span ids, tenant and run, and no
    input."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rt = Runtime(settings.model_copy(update={"tracing": True}), tracer_provider=provider)
    workers = Workers(rt.settings, tmp_path)
    try:
        rt.registry.create("acme")
        handle = (
            await Client(traced.app, runtime=rt)
            .tenant("acme")
            .start(traced.order, "secret-sku-4411", True)
        )
        await rt.outbox.published()
        port = collector.server_address[1]
        proc = workers.start(
            app="tests.apps.traced:app",
            env={
                "TENANTFLOW_TRACING": "true",
                "OTEL_SERVICE_NAME": "worker-under-test",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_BSP_SCHEDULE_DELAY": "600000",
            },
        )
        with pytest.raises(RunFailedError) as failed:
            await handle.result(timeout=30)
        assert failed.value.status == "compensated"
        received = collector.received  # type: ignore[attr-defined]
        assert received == []  # buffered until shutdown
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert received, "the worker exited without exporting its spans"
    finally:
        workers.stop_all()
        await rt.close()
    submit = one(exporter.get_finished_spans(), "submit order")
    exported = [
        (span, resource.resource)
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = sorted(span.name for span, _ in exported)
    assert names == [
        "compensate release",
        "run order",
        "step charge",
        "step charge",
        "step reserve",
    ]
    for span, resource in exported:
        assert int.from_bytes(span.trace_id, "big") == submit.context.trace_id
        service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
        assert service == "worker-under-test"

    lines = [
        json.loads(line)
        for line in (tmp_path / "worker0.log").read_text().splitlines()
        if line.startswith("{")
    ]
    retry = next(line for line in lines if line["event"] == "step retry")
    assert retry["tenant"] == "acme" and retry["run"] == handle.run_id
    assert retry["trace_id"] == format(submit.context.trace_id, "032x")
    # The retry is decided by the run, between two attempts' spans.
    (run_span,) = [span for span, _ in exported if span.name == "run order"]
    assert retry["span_id"] == run_span.span_id.hex()
    assert "secret-sku-4411" not in (tmp_path / "worker0.log").read_text()


def test_tracing_can_be_turned_off_by_the_standard_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = Tracing(enabled=True, provider=TracerProvider())
    assert not tracing.enabled and tracing.traceparent() is None
    with tracing.span("nothing") as span:
        assert span is None


async def test_delayed_messages_keep_their_trace_and_older_members_still_read() -> None:
    """On Redis a delayed message is a sorted-set member: with a trace it has a fifth part;
    without one it keeps the four parts that workers of earlier versions read, and members
    written by them are still delivered."""
    import redis.asyncio as aioredis

    from tenantflow.queue.redis_streams import RedisStreamsQueue
    from tests.conftest import REDIS_URL

    prefix = f"tftrace{new_run_id()[:8]}"
    queue = RedisStreamsQueue(REDIS_URL, prefix=prefix)
    raw = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    origin = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    try:
        await queue.enqueue("t", "plain", delay=0.05)
        await queue.enqueue("t", "traced", delay=0.05, trace=origin)
        delayed = queue.keys.tenant("t").delayed
        members = sorted(await raw.zrange(delayed, 0, -1))
        assert [str(m).count("|") for m in members] == [3, 4]
        await raw.zadd(delayed, {"99|old|0|0": 0})  # written by an earlier version
        await raw.hincrby(queue.keys.tenant("t").live, "old", 1)
        await asyncio.sleep(0.1)
        got = {m.run_id: m.trace for m in await queue.dequeue("c", 10, 5.0)}
        assert got == {"plain": None, "traced": origin, "old": None}
    finally:
        keys = [k async for k in raw.scan_iter(match=f"{prefix}:*")]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()
        await queue.close()
