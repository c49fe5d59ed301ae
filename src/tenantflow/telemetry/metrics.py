"""Metrics for Prometheus.

Every process (API, each worker) serves its metrics (the API at ``/metrics``, a worker on
``TENANTFLOW_METRICS_PORT``); counters count what that process did, and Prometheus sums them
over the instances it scrapes. With ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus-client's
multi-process mode), the processes of one host write their values to files there and each of
them serves the host's total: one scrape of any of them adds up all. Gauges of shared state
(queue depth and oldest message per tenant, dead letters, stuck runs, breaker states) are set
by the process's background survey (``runtime.health``, every
``TENANTFLOW_HEALTH_REFRESH_SECONDS``), never on a scrape's path: a scrape serves what the
last survey found. Every process reads the same value, so they are never summed (the most
recent one is served).

The ``tenant`` label can be switched off (``TENANTFLOW_METRICS_PER_TENANT=false``) to bound
cardinality; tenant ids are the only tenant data in metrics, never payloads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from tenantflow.telemetry.health import Installation, TenantHealth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self, *, per_tenant: bool = True) -> None:
        self.per_tenant = per_tenant
        self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROCESS_ENV) or None
        if self.multiprocess_dir is not None:
            Path(self.multiprocess_dir).mkdir(parents=True, exist_ok=True)
        run_labels = ["workflow", "tenant"] if per_tenant else ["workflow"]
        tenant_labels = ["tenant"] if per_tenant else []
        r = self.registry
        self.runs_submitted = Counter(
            "tenantflow_runs_submitted", "Runs accepted.", run_labels, registry=r
        )
        self.runs_finished = Counter(
            "tenantflow_runs_finished",
            "Runs that ended, by final status.",
            [*run_labels, "status"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "tenantflow_step_duration_seconds",
            "Time of a step's attempts, retries included.",
            ["step", "status"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_retries = Counter(
            "tenantflow_step_retries",
            "Step attempts that failed and were retried.",
            ["step"],
            registry=r,
        )
        self.redeliveries = Counter(
            "tenantflow_messages_redelivered",
            "Messages delivered again: reclaimed from a dead or late consumer, or retried.",
            tenant_labels,
            registry=r,
        )
        self.recovered = Counter(
            "tenantflow_runs_recovered",
            "Runs taken over after the lease of the worker running them lapsed (it died or "
            "stalled).",
            tenant_labels,
            registry=r,
        )
        self.reenqueued = Counter(
            "tenantflow_reconciler_reenqueued",
            "Runs the reconciler found without a message and enqueued again.",
            registry=r,
        )
        self.rebuilds = Counter(
            "tenantflow_queue_rebuilds",
            "Times the queue was rebuilt from the tenant databases after it lost its data "
            "(Redis emptied, restarted or failed over).",
            registry=r,
        )
        self._shared_gauges()

    def _shared_gauges(self) -> None:
        """The gauges of state shared by the processes (queues, dead letters, stuck runs,
        breakers), set from the background survey."""
        r = self.registry
        self.queue_depth = Gauge(
            "tenantflow_queue_depth",
            "Messages waiting or in flight.",
            ["tenant"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.oldest_age = Gauge(
            "tenantflow_queue_oldest_message_age_seconds",
            "Age of the oldest message not yet acknowledged.",
            ["tenant"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.dead_letters = Gauge(
            "tenantflow_dead_letters",
            "Messages in the dead-letter stream.",
            ["tenant"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.stuck_runs = Gauge(
            "tenantflow_stuck_runs",
            "Runs queued or running without progress past TENANTFLOW_STUCK_RUN_SECONDS.",
            ["tenant"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.breaker_state = Gauge(
            "tenantflow_circuit_breaker_state",
            "1 for the state each circuit breaker is in, 0 for the others.",
            ["breaker", "state"],
            registry=r,
            multiprocess_mode="mostrecent",
        )

    def tenant(self, tenant_id: str) -> list[str]:
        return [tenant_id] if self.per_tenant else []

    def submitted(self, workflow: str, tenant_id: str) -> None:
        self.runs_submitted.labels(workflow, *self.tenant(tenant_id)).inc()

    def finished(self, workflow: str, tenant_id: str, status: str) -> None:
        self.runs_finished.labels(workflow, *self.tenant(tenant_id), status).inc()

    def redelivered(self, tenant_id: str) -> None:
        self.redeliveries.labels(*self.tenant(tenant_id)).inc()

    async def refresh(self, runtime: Installation, breakers: Iterable[str] = ()) -> None:
        """Survey the shared state now (queues and stuck runs of every tenant, the named
        breakers) and set the gauges. The API and workers do it in the background
        (``runtime.health``); this is for a caller that wants the figures at once."""
        from tenantflow.telemetry.health import survey

        self.record(await survey(runtime))
        await self.record_breakers(runtime, breakers)

    def record(self, tenants: Iterable[TenantHealth]) -> None:
        """Set the gauges of shared tenant state from a survey."""
        totals = {"depth": 0.0, "dead": 0.0, "age": 0.0, "stuck": 0.0}
        for t in tenants:
            if self.per_tenant:
                self.queue_depth.labels(t.tenant_id).set(t.queue_depth)
                self.dead_letters.labels(t.tenant_id).set(t.dead_letters)
                self.oldest_age.labels(t.tenant_id).set(t.queue_lag_seconds)
                self.stuck_runs.labels(t.tenant_id).set(t.stuck_runs)
            totals["depth"] += t.queue_depth
            totals["dead"] += t.dead_letters
            totals["age"] = max(totals["age"], t.queue_lag_seconds)
            totals["stuck"] += t.stuck_runs
        if not self.per_tenant:  # one series for all tenants
            self.queue_depth.labels("*").set(totals["depth"])
            self.dead_letters.labels("*").set(totals["dead"])
            self.oldest_age.labels("*").set(totals["age"])
            self.stuck_runs.labels("*").set(totals["stuck"])

    async def record_breakers(self, runtime: Installation, breakers: Iterable[str]) -> None:
        from tenantflow.resilience.breaker import BreakerState

        for name in breakers:
            state = (await runtime.breakers.status(name)).state
            for candidate in BreakerState:
                self.breaker_state.labels(name, candidate.value).set(
                    1.0 if candidate is state else 0.0
                )

    def serving_registry(self) -> CollectorRegistry:
        """What to serve: this process's registry, or in multi-process mode a collector of
        every process's files."""
        if self.multiprocess_dir is None:
            return self.registry
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        return registry

    def exposition(self) -> bytes:
        return generate_latest(self.serving_registry())
