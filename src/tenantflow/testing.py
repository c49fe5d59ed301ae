"""Testing your own workflows: a runtime, a running worker and a client on the embedded default,
in a temporary folder, torn down when the test ends.

    async with tenantflow.testing.environment(app, tenants=["acme"]) as env:
        handle = await env.tenant("acme").start(greet, "Ada")
        assert await handle.result(timeout=10) == "Hello, Ada"

The pytest plugin (``tenantflow.pytest_plugin``, registered when tenantflow is installed) gives
the same as the ``tenantflow_env`` fixture. See docs/testing.md.

Only the base dependencies are needed: the embedded default is SQLite files and a SQLite queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from tenantflow.client import Client, TenantClient
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.settings import Settings
from tenantflow.worker.worker import Worker

__all__ = ["FAST_SETTINGS", "Environment", "environment", "fast_settings"]

# Short enough that a test never waits on them, long enough that a loaded CI machine does not
# see leases lapse under a run that is still executing.
FAST_SETTINGS: dict[str, Any] = {
    "lease_seconds": 2.0,
    "poll_interval": 0.02,
    "reconcile_interval": 0.5,
    "shutdown_grace_seconds": 1.0,
}
WORKER_STOP_TIMEOUT = 30.0


class _IsolatedSettings(Settings):
    """Settings from the constructor's arguments only."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def fast_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for a test: the embedded default under ``home``, with ``FAST_SETTINGS`` and
    ``overrides``. ``TENANTFLOW_*`` environment variables are ignored, so that a developer's
    exported ``TENANTFLOW_DATABASE_URL`` never points a test suite at a real database."""
    return _IsolatedSettings(home=home, **{**FAST_SETTINGS, **overrides})


@dataclass(frozen=True, kw_only=True)
class Environment:
    """What ``environment()`` gives a test: ``runtime`` (settings, tenant registry, queue),
    ``worker`` (running on the test's event loop) and ``client``."""

    app: App
    runtime: Runtime
    worker: Worker
    client: Client

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def tenant(self, tenant_id: str) -> TenantClient:
        """The client scoped to one tenant: ``start``, ``handle``, ``list_runs``."""
        return self.client.tenant(tenant_id)


@contextlib.asynccontextmanager
async def environment(
    app: App,
    *,
    tenants: Sequence[str] = ("acme",),
    settings: Settings | None = None,
    concurrency: int | None = None,
) -> AsyncIterator[Environment]:
    """A runtime with ``tenants`` created, a worker of ``app`` running, and a client.

    Without ``settings``: ``fast_settings()`` in a temporary folder, removed at the end. With
    them (another backend, other timings): those, and their ``home`` is left as it is. At the
    end the worker stops (runs in flight get ``shutdown_grace_seconds``), the runtime closes,
    and an exception the worker died of is raised.
    """
    with contextlib.ExitStack() as files:
        if settings is None:
            home = files.enter_context(tempfile.TemporaryDirectory(prefix="tenantflow-test-"))
            settings = fast_settings(Path(home))
        runtime = Runtime(settings)
        try:
            for tenant_id in tenants:
                runtime.registry.create(tenant_id)
            worker = Worker(app, runtime, concurrency=concurrency)
            task = asyncio.create_task(worker.run(), name="tenantflow-test-worker")
            try:
                yield Environment(
                    app=app, runtime=runtime, worker=worker, client=Client(app, runtime=runtime)
                )
            finally:
                worker.stop()
                await asyncio.wait_for(task, WORKER_STOP_TIMEOUT)
        finally:
            await runtime.close()
