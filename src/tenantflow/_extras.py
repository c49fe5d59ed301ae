"""The package's extras: which optional modules each provides, and the one clear line a user
gets when a setting needs one that is not installed."""

from __future__ import annotations

import importlib.util

from tenantflow.errors import MissingExtraError

EXTRAS: dict[str, tuple[str, ...]] = {
    "postgres": ("psycopg",),
    "redis": ("redis",),
    "tracing": ("opentelemetry.sdk",),
    # Part of the tracing extra; needed only when spans are exported over OTLP.
    "otlp": ("opentelemetry.exporter.otlp.proto.http",),
    "fast": ("uvloop",),
}

PACKAGE_EXTRA = {"otlp": "tracing"}  # the extra of pyproject.toml that installs each


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require(extra: str, needed_by: str) -> None:
    """Raise ``MissingExtraError`` unless every module of ``extra`` is importable.
    ``needed_by`` names the setting, as the user wrote it."""
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise MissingExtraError(
            f"{needed_by} needs {missing[0]}, which is not installed: "
            f"pip install 'tenantflow[{PACKAGE_EXTRA.get(extra, extra)}]'"
        )
