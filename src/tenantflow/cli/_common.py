"""What every command shares: the root command, settings, the app to serve, output, and the
one-line errors a user can act on."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import importlib.util
import re
import sys
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import pydantic
import typer
from rich.console import Console
from rich.table import Table

from tenantflow.backends import endpoint, reason, redact_url, unavailable
from tenantflow.errors import ConfigError, TenantflowError
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.settings import Settings
from tenantflow.telemetry.logging import configure_logging

T = TypeVar("T")

cli = typer.Typer(
    help="tenantflow: multi-tenant durable workflows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
stderr = Console(stderr=True, highlight=False)

DEFAULT_APP = "tenantflow.examples.orders:app"
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="The tenant to act on (its id).")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead of a table, for scripts.")
]
AppOpt = Annotated[
    str,
    typer.Option(
        "--app",
        help="The App whose workflows to use: module:attribute or path/to/file.py:attribute.",
    ),
]


def settings() -> Settings:
    """The settings of this process, from ``TENANTFLOW_*``, with logging configured."""
    found = Settings()
    configure_logging(found.log_level, found.log_format)
    return found


def load_app(spec: str) -> App:
    """The App that ``module:attribute`` or ``path/to/file.py:attribute`` names; a
    ``ConfigError`` of one line when it cannot be loaded."""
    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise ConfigError(
            f"--app {spec!r}: expected module:attribute or path/to/file.py:attribute, "
            "e.g. myproject.workflows:app"
        )
    try:
        if source.endswith(".py") or "/" in source:
            module = _import_file(Path(source), spec)
        else:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: the project's modules
            module = importlib.import_module(source)
    except TenantflowError:
        raise
    except Exception as exc:
        raise ConfigError(f"--app {spec!r}: importing {source} failed: {_one_line(exc)}") from None
    app = getattr(module, attr, None)
    if app is None:
        raise ConfigError(f"--app {spec!r}: {source} has no attribute {attr!r}")
    if not isinstance(app, App):
        raise ConfigError(f"--app {spec!r}: {attr} is a {type(app).__name__}, not a tenantflow App")
    return app


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"--app {spec!r}: no file {path}")
    name = path.stem
    found = importlib.util.spec_from_file_location(name, path.resolve())
    if found is None or found.loader is None:
        raise ConfigError(f"--app {spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # so that the workflows' own imports of it find this one
    sys.path.insert(0, str(path.resolve().parent))  # and its sibling modules
    found.loader.exec_module(module)
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def time_text(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def print_json(value: Any) -> None:
    """One JSON document on standard output (dataclasses and Pydantic models as objects)."""
    sys.stdout.write(orjson.dumps(value, default=_jsonable, option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=column == "id")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_result(value: Any, *, as_json: bool, line: str) -> None:
    """What a command did: ``value`` as JSON for scripts, else one line for people."""
    if as_json:
        print_json(value)
    else:
        console.print(line, markup=False, soft_wrap=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if hasattr(value, "value"):  # enums
        return value.value
    raise TypeError(type(value).__name__)


@contextlib.asynccontextmanager
async def runtime_of(found: Settings, *, queue: bool = False) -> AsyncIterator[Runtime]:
    """A runtime for one short command, closed at the end of the block. With ``queue``, the
    command needs the queue: one that does not answer fails it now, before it changes
    anything."""
    runtime = await asyncio.to_thread(Runtime, found)
    try:
        if queue:
            await runtime.queue.ping()
        yield runtime
    finally:
        await runtime.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def fail(message: str, code: int = 2) -> NoReturn:
    stderr.print(f"error: {message}", markup=False, soft_wrap=True)
    raise SystemExit(code)


def main() -> None:
    """The ``tenantflow`` command, with every error a user can act on as one line."""
    try:
        cli()
    except TenantflowError as exc:
        fail(exc.message)
    except pydantic.ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        fail(settings_problem(exc))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        backend = unavailable(exc)
        if backend is None:
            raise
        fail(unreachable(backend, exc))


def settings_problem(exc: pydantic.ValidationError) -> str:
    """A ``TENANTFLOW_*`` variable that does not validate, by name (never its value: it may
    be a secret)."""
    parts = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"]).upper()
        parts.append(f"TENANTFLOW_{name}: {error['msg']}")
    return "; ".join(parts)


_PG_AT = re.compile(r'server at "([^"]+)"(?: \([^)]*\))?, port (\d+)')
_REDIS_AT = re.compile(r"connecting to ([\w.\-\[\]:]+?):(\d+)")


def unreachable(backend: str, exc: BaseException) -> str:
    """``cannot reach PostgreSQL at host:port: why (VARIABLE=url without secrets)``."""
    try:
        current = Settings()
    except pydantic.ValidationError:
        current = None
    text = str(exc)
    if backend == "redis":
        name, variable = "Redis", "TENANTFLOW_QUEUE_URL"
        url = current.resolved_queue_url() if current else ""
        seen = _REDIS_AT.search(text)
    else:
        name, variable = "PostgreSQL", "TENANTFLOW_DATABASE_URL"
        url = current.resolved_database_url() if current else ""
        seen = _PG_AT.search(text)
    where = f"{seen.group(1)}:{seen.group(2)}" if seen else endpoint(url)
    return f"cannot reach {name} at {where}: {reason(exc)} ({variable}={redact_url(url)})"
