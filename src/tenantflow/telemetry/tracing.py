"""Tracing with OpenTelemetry: one trace from the HTTP request through the outbox and the queue
to every step and compensation.

The span that submits a run (``submit <workflow>``, a producer span, the child of the HTTP
request's span) is written down with the run as a W3C ``traceparent``; the outbox record copies
it and the queue's message carries it (its envelope), so whichever process publishes the
message - the submitter, the relay, the reconciler - the worker that takes it opens a
``run <workflow>`` consumer span in the same trace, linked to that origin. Each delivery gets a
new span (a redelivery is a second span linked to the same origin, with its delivery count);
each step attempt and compensation is a span inside it. Spans carry tenant, run, workflow,
step and attempt; never inputs or outputs.

Off by default (``TENANTFLOW_TRACING=false``): then no OpenTelemetry module is imported, nothing
is written with runs or messages, and every hook is one attribute test. On, spans go to the
tracer provider the application installed (``opentelemetry.trace.set_tracer_provider``), else to
one made here and exported as the standard ``OTEL_*`` variables say: ``OTEL_TRACES_EXPORTER``
(``otlp``, the default, over HTTP; ``console``; ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``; ``OTEL_SDK_DISABLED=true``
turns it off again. ``close()`` flushes what is buffered (a runtime closes it on shutdown).

A malformed ``traceparent`` (from a client's header or a message) is ignored: the span starts
a new trace instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from tenantflow._extras import require
from tenantflow.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanKind, Tracer

log = structlog.get_logger(__name__)

Attributes = Mapping[str, str | int | float | bool]
FLUSH_TIMEOUT_MS = 5_000
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()


class Tracing:
    """The tracing hooks of one process. ``enabled=False`` makes every hook free."""

    def __init__(self, *, enabled: bool, provider: Any = None, service: str = "tenantflow") -> None:
        self.enabled = enabled and os.environ.get("OTEL_SDK_DISABLED", "").lower() != "true"
        self._provider: Any = None
        self._tracer: Tracer | None = None
        if self.enabled:
            self._provider = _provider(provider, service)
            self._tracer = self._provider.get_tracer("tenantflow")

    # -- spans -------------------------------------------------------------------------------

    def span(
        self,
        name: str,
        *,
        kind: str = "internal",
        attributes: Attributes | None = None,
        origin: str | None = None,
        link: bool = True,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """A span around a block, current inside it (None when tracing is off). With
        ``origin`` (a traceparent), the span joins that trace as its child and (``link``)
        links to it; a malformed one starts a new trace. Exceptions are recorded on it."""
        if self._tracer is None:
            return _NULL
        return self._start(name, kind, attributes, origin, link)

    @contextlib.contextmanager
    def _start(
        self,
        name: str,
        kind: str,
        attributes: Attributes | None,
        origin: str | None,
        link: bool,
    ) -> Iterator[Span]:
        from opentelemetry import trace

        assert self._tracer is not None
        parent = None
        links = []
        if origin is not None:
            parent = extract(origin)
            context = trace.get_current_span(parent).get_span_context()
            if not context.is_valid:
                parent = None
            elif link:
                links.append(trace.Link(context, {"tenantflow.link": "origin"}))
        # Exceptions are recorded by type only: their messages may carry a tenant's data, and
        # a trace backend is shared by every tenant.
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            kind=_kind(kind),
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except Exception as exc:
                kind_of = type(exc).__name__
                span.add_event("exception", {"exception.type": kind_of})
                mark_error(span, kind_of)
                raise

    def traceparent(self) -> str | None:
        """The current span's context as a W3C ``traceparent``, to carry with a run."""
        if self._tracer is None:
            return None
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return carrier.get("traceparent")

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Export what is buffered, within ``FLUSH_TIMEOUT_MS`` (a collector that is away
        must not hold a shutdown up). The provider itself stays usable - it is the process's
        global one, which another runtime of the process may still use; the SDK shuts it down
        when the process exits. Blocking: call it from a thread."""
        if self._provider is None:
            return
        try:
            if hasattr(self._provider, "force_flush"):
                self._provider.force_flush(FLUSH_TIMEOUT_MS)
        except Exception as exc:  # an exporter's trouble must not fail a shutdown
            log.warning("flushing spans failed", error=type(exc).__name__)
        self._provider = None
        self._tracer = None


def set_attributes(span: Span | None, attributes: Attributes) -> None:
    if span is not None:
        span.set_attributes(attributes)


def mark_error(span: Span | None, description: str) -> None:
    if span is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, description))


def extract(traceparent: str | None) -> Any:
    """An OpenTelemetry context from a W3C ``traceparent`` (an empty one if it is malformed)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    try:
        return TraceContextTextMapPropagator().extract({"traceparent": traceparent or ""})
    except Exception:  # never let a bad header or message stop the work
        from opentelemetry.context import Context

        return Context()


def _kind(kind: str) -> SpanKind:
    from opentelemetry.trace import SpanKind

    return SpanKind[kind.upper()]


def _provider(given: Any, service: str) -> Any:
    """The provider to use: the one given, the application's, else one made here (and
    installed as the global one)."""
    require("tracing", "TENANTFLOW_TRACING=true")
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if given is not None:
        return given
    installed = trace.get_tracer_provider()
    if isinstance(installed, TracerProvider):  # the application (or a runtime before) set one
        return installed
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name == "otlp":
        require("otlp", "OTEL_TRACES_EXPORTER=otlp (the default)")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name != "none":
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported: use otlp, console or none"
        )
    # Global too, so that the application's own instrumentation inside steps joins the trace.
    trace.set_tracer_provider(provider)
    return provider
