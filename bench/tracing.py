"""What tracing costs, on the embedded default.

    python -m bench.tracing [--rounds 3] [--n 2000]

1. Runs per second of five-step workflows (one process: a client submits every run, a worker
   executes them), tracing off (the default) and on (spans made and handed to a batch span
   processor whose exporter drops them: the cost of tracing itself, not of a collector),
   rounds interleaved, each in a fresh subprocess and folder. The median of each is reported,
   and on/off.
2. The hooks' cost while tracing is off, which is what every installation that does not trace
   pays: nanoseconds per call of ``Tracing.span`` and ``Tracing.traceparent``, and their sum
   over one five-step run (seven spans: submit, run, five steps; two traceparents at most).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


def measure(traced: bool, n: int) -> float:
    """Runs per second, in this process."""
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from tenantflow import App, Client, Runtime, Settings, Worker, WorkflowContext
    from tenantflow.telemetry.logging import configure_logging

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    app = App("bench")

    @app.step
    async def noop(i: int) -> int:
        return i

    @app.workflow
    async def five(ctx: WorkflowContext, i: int) -> int:
        for _ in range(STEPS):
            await noop(i)
        return i

    async def main() -> float:
        configure_logging("WARNING")
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        settings = Settings(home=Path.cwd() / ".tenantflow", log_level="WARNING", tracing=traced)
        runtime = Runtime(settings, tracer_provider=provider)
        runtime.registry.ensure("bench")
        tenant = Client(app, runtime=runtime).tenant("bench")
        worker = Worker(app, runtime, concurrency=100)
        task = asyncio.create_task(worker.run())
        started = time.perf_counter()
        handles = [await tenant.start(five, i) for i in range(n)]
        for handle in handles:
            await handle.result(timeout=600)
        elapsed = time.perf_counter() - started
        worker.stop()
        await task
        await runtime.close()
        return n / elapsed

    return asyncio.run(main())


def in_subprocess(traced: bool, n: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.tracing",
                "--one",
                "on" if traced else "off",
                "--n",
                str(n),
            ],
            cwd=folder,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
    return float(out.stdout.strip().splitlines()[-1])


def hooks_when_off() -> dict[str, float]:
    from tenantflow.telemetry.tracing import Tracing

    tracing = Tracing(enabled=False)
    attributes: dict[str, str | int] = {"tenantflow.tenant": "acme", "tenantflow.attempt": 1}

    def span() -> None:
        with tracing.span("step noop", attributes=attributes):
            pass

    calls = 1_000_000
    span_ns = min(timeit.repeat(span, number=calls, repeat=5)) / calls * 1e9
    parent_ns = min(timeit.repeat(tracing.traceparent, number=calls, repeat=5)) / calls * 1e9
    return {
        "span_ns": round(span_ns, 1),
        "traceparent_ns": round(parent_ns, 1),
        "per_run_us": round(((STEPS + 2) * span_ns + 2 * parent_ns) / 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--one", choices=["on", "off"])
    args = parser.parse_args()
    if args.one is not None:
        print(measure(args.one == "on", args.n))
        return
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            rates[mode].append(in_subprocess(mode == "on", args.n))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    hooks = hooks_when_off()
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "n": args.n,
                "rounds": args.rounds,
                "five_step_runs_per_s": {"off": round(off, 1), "on": round(on, 1)},
                "rounds_runs_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                "on_over_off": round(on / off, 3),
                "hooks_when_off": hooks,
                "hooks_share_of_a_run_when_off": round(hooks["per_run_us"] / (1e6 / off), 5),
            }
        )
    )


if __name__ == "__main__":
    main()
