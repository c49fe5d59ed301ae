"""What a user may be told about a backend: its URL without secrets, and why it did not
answer, in one line.

Errors of the drivers are recognised by the package that raised them, so that this module
needs none of them installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "rediss": 6379}
# Connection trouble, as each driver names it; anything else is not "unavailable".
_UNAVAILABLE = {
    "psycopg": ("OperationalError", "PoolTimeout", "ConnectionTimeout"),
    "sqlalchemy": ("OperationalError", "TimeoutError"),
    "tenantflow": ("DatabaseBusyError", "StoreUnavailableError"),
    "redis": ("ConnectionError", "TimeoutError", "BusyLoadingError", "InvalidResponse"),
}
_MISSING = re.compile(r'(database|role) "[^"]*" does not exist')
_CREDENTIALS = re.compile(r"(//)[^/@\s]*@")
_QUERY_SECRET = re.compile(r"(password|passwd|secret|token)=[^&\s]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` without a password (the user name stays: it helps, and is no secret)."""
    parts = urlsplit(url)
    if parts.password is None and not _QUERY_SECRET.search(parts.query):
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    query = _QUERY_SECRET.sub(r"\1=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def endpoint(url: str) -> str:
    """``host:port`` of a server URL (its default port when the URL names none)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or DEFAULT_PORTS.get(parts.scheme.split("+", 1)[0])
    host = parts.hostname or "localhost"
    return f"{host}:{port}" if port else host


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def unavailable(exc: BaseException) -> str | None:
    """The backend (``"postgresql"`` or ``"redis"``) that ``exc`` says did not answer, or
    None when ``exc`` is not connection trouble."""
    for error in _chain(exc):
        package = type(error).__module__.split(".", 1)[0]
        names = {cls.__name__ for cls in type(error).__mro__}
        if package in _UNAVAILABLE and names & set(_UNAVAILABLE[package]):
            return "redis" if package == "redis" else "postgresql"
    return None


def reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words, with any credentials removed."""
    text = " ".join(str(e) for e in _chain(exc)).lower()
    if "refused" in text or "connect call failed" in text:
        return "connection refused"
    if "timeout" in text or "timed out" in text:
        return "no answer in time"
    if "invalid response" in text or "protocol error" in text:
        return "what answers there is not this kind of server"
    if "password authentication failed" in text or "authentication" in text:
        return "authentication failed"
    if "name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    missing = _MISSING.search(" ".join(str(e) for e in _chain(exc)))
    if missing:
        return missing.group(0)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _QUERY_SECRET.sub(r"\1=***", _CREDENTIALS.sub(r"\1***@", first))[:200]


def log_failure(log: Any, event: str, exc: BaseException, **fields: Any) -> None:
    """Log a failed attempt that will be tried again: a backend that does not answer is one
    line (which backend, why); anything else is a bug worth its traceback."""
    backend = unavailable(exc)
    if backend is None:
        log.exception(event, **fields)
    else:
        log.warning(event, backend=backend, error=reason(exc), **fields)
