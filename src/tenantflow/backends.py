"""What a user may be told about a backend: its URL without secrets, and why it did not
answer, in one line; and a driver's message with nothing of the server in it (``redact``), for
log lines and answers that a tenant's database server must not show through.

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
_QUERY_SECRET = re.compile(r"(password|passwd|secret|token)=[^&\s]*", re.IGNORECASE)
# What drivers' messages say of a server: names in quotes (databases, roles, hosts, sockets,
# values of a connection string), URLs, connection-string fields, addresses and ports.
_SERVER_DETAILS = [
    (re.compile(r'"[^"]*"'), '"…"'),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE), "…://…"),
    (re.compile(r"\b(host|hostaddr|port|dbname|user|password|sslmode|service)=\S+"), r"\1=…"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "…"),
    (re.compile(r"\((?:[0-9a-f]*:){2,}[0-9a-f]*\)", re.IGNORECASE), "(…)"),
    (re.compile(r"\bport \d+"), "port …"),
    (re.compile(r"\b(connecting to|connect to) \S+?(?=\.?(?:\s|$))"), r"\1 …"),
]


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
    """Why a connection failed, in a few words, with nothing of the server in it (see
    ``redact``)."""
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
        return redact(missing.group(0))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return redact(_QUERY_SECRET.sub(r"\1=***", first))[:200]


def redact(text: str) -> str:
    """``text`` (a driver's message) without what it says of the server: no database, role,
    host or socket name, address, port, URL or password."""
    for pattern, replacement in _SERVER_DETAILS:
        text = pattern.sub(replacement, text)
    return text


def redact_traceback(text: str) -> str:
    """A formatted traceback with its exceptions' messages redacted; the file names and source
    lines (the code's, not the server's) stay as they are."""
    lines = text.splitlines(keepends=True)
    out = []
    source = False
    for line in lines:
        code = source or line.lstrip().startswith('File "')
        source = line.lstrip().startswith('File "')
        out.append(line if code else redact(line))
    return "".join(out)


def log_failure(log: Any, event: str, exc: BaseException, **fields: Any) -> None:
    """Log a failed attempt that will be tried again: a backend that does not answer is one
    line (which backend, why); anything else is a bug worth its traceback."""
    backend = unavailable(exc)
    if backend is None:
        log.exception(event, **fields)
    else:
        log.warning(event, backend=backend, error=reason(exc), **fields)
