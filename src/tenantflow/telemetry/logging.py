"""Structured logging (structlog): console lines for people, JSON lines for machines
(``TENANTFLOW_LOG_FORMAT=json``).

Log events carry identifiers - tenant and run (bound for everything a worker logs while it
handles a message), step, and the trace and span ids of the current span when tracing is on -
never inputs, outputs or secrets: fields named like a secret are masked whatever logs them,
and what a driver's message says of a server (a tenant's database name, host, port, user) is
redacted from every field and from tracebacks' messages.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from tenantflow.backends import redact, redact_traceback

SECRET_FIELDS = frozenset(
    {"password", "token", "secret", "api_key", "authorization", "private_key", "dsn"}
)
MASK = "[redacted]"


def add_trace_ids(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``trace_id`` and ``span_id`` of the current span (W3C hex), as log backends join them
    to traces. Free when tracing is off: OpenTelemetry is then never imported."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is not None:
        context = otel.get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", format(context.trace_id, "032x"))
            event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def mask_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event.keys() & SECRET_FIELDS:
        event[key] = MASK
    return event


def redact_servers(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every text field but the event's own words, with nothing of a server in it; of a
    traceback, its exceptions' messages (``backends.redact``)."""
    for key, value in event.items():
        if isinstance(value, str) and key not in _OWN_WORDS:
            event[key] = redact_traceback(value) if key == "exception" else redact(value)
    return event


_OWN_WORDS = frozenset({"event", "timestamp", "level"})


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_ids,
            mask_secrets,
            structlog.processors.format_exc_info,
            redact_servers,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
