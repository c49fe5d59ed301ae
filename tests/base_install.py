"""tenantflow as a base install has it (``pip install tenantflow``, no extras).

    python tests/base_install.py imports       import every public module
    python tests/base_install.py cli ARGS...   run the ``tenantflow`` command

With ``--without-extras`` first, the extras' modules (redis, psycopg, uvloop, the OpenTelemetry
SDK) are made unimportable before anything else, so that the test suite, which installs every
extra, sees what a base install sees; CI also runs ``imports`` in a real base install.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

# The modules of the extras (pyproject.toml); FastAPI itself needs opentelemetry's API.
EXTRA_MODULES = (
    "redis",
    "hiredis",
    "psycopg",
    "psycopg_binary",
    "uvloop",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
)
# Modules that are not imported but run: Alembic's environment scripts, `python -m`.
NOT_MODULES = (
    "tenantflow.__main__",
    "tenantflow.store.migrations.env",
    "tenantflow.platform.migrations.env",
)
# A backend's own module needs its extra; without it, it says which one to install.
BACKENDS = {"tenantflow.queue.redis_streams": "redis", "tenantflow.coordination.redis": "redis"}


class WithoutExtras(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if any(name == m or name.startswith(m + ".") for m in EXTRA_MODULES):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def extras_installed() -> bool:
    try:
        return importlib.util.find_spec("redis") is not None
    except ModuleNotFoundError:  # made unimportable by WithoutExtras
        return False


def import_everything() -> int:
    import tenantflow
    from tenantflow.errors import MissingExtraError

    failed = 0
    names = [m.name for m in pkgutil.walk_packages(tenantflow.__path__, "tenantflow.")]
    for name in sorted(set(names) - set(NOT_MODULES)):
        try:
            importlib.import_module(name)
        except MissingExtraError as exc:
            expected = name in BACKENDS and f"tenantflow[{BACKENDS[name]}]" in str(exc)
            if expected and not extras_installed():
                continue
            print(f"{name}: {exc}")
            failed += 1
        except Exception as exc:
            print(f"{name}: {type(exc).__name__}: {exc}")
            failed += 1
    print(f"imported {len(names) - len(NOT_MODULES) - failed} modules; {failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--without-extras"]:
        sys.meta_path.insert(0, WithoutExtras())
        argv = argv[1:]
    if argv[:1] == ["imports"]:
        return import_everything()
    if argv[:1] == ["cli"]:
        from tenantflow.cli import main as tenantflow

        sys.argv = ["tenantflow", *argv[1:]]
        tenantflow()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
