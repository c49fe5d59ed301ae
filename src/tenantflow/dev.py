"""``tenantflow dev``: the API and a worker in one process, on the embedded default.

On first start it creates the demo tenants, a platform administrator who administers both,
and an operator API key per tenant, and prints those credentials; they are not shown again
(only hashes are stored). Later starts reuse them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tenantflow.platform.identity import Role
from tenantflow.runtime import Runtime
from tenantflow.sdk.app import App
from tenantflow.settings import Settings

DEV_TENANTS = ("acme", "globex")
ADMIN_EMAIL = "admin@tenantflow.dev"


@dataclass
class Bootstrap:
    """What a first start made; empty on later starts."""

    admin_email: str | None = None
    admin_password: str | None = None
    api_keys: dict[str, str] = field(default_factory=dict)  # tenant -> secret


def bootstrap(runtime: Runtime) -> Bootstrap:
    """Create the demo tenants, the admin and the keys, once."""
    platform = runtime.platform
    made = Bootstrap()
    existing = {t.id for t in runtime.registry.list()}
    for tenant_id in DEV_TENANTS:
        if tenant_id not in existing:
            platform.create_tenant("system", tenant_id)
    if any(u.email == ADMIN_EMAIL for u in platform.identity.list_users()):
        return made
    password = secrets.token_urlsafe(12)
    admin = platform.create_user("system", ADMIN_EMAIL, password, platform_admin=True)
    made.admin_email, made.admin_password = ADMIN_EMAIL, password
    for tenant_id in DEV_TENANTS:
        platform.set_membership("system", admin.id, tenant_id, Role.TENANT_ADMIN)
        _, secret = platform.create_api_key("system", tenant_id, "dev", Role.OPERATOR)
        made.api_keys[tenant_id] = secret
    return made


async def serve(
    app: App, settings: Settings, *, port: int | None = None, worker: bool = True
) -> None:
    """Serve the API, and with ``worker`` run a worker beside it, until SIGINT/SIGTERM."""
    import uvicorn

    from tenantflow.api.app import create_api
    from tenantflow.worker.worker import Worker

    # During a platform outage it serves from what an earlier start cached.
    runtime = await asyncio.to_thread(functools.partial(Runtime, settings, start_offline=True))
    config = uvicorn.Config(
        create_api(app, runtime=runtime),
        host=settings.api_host,
        port=settings.api_port if port is None else port,
        log_level="warning",
        lifespan="off",  # the runtime is this function's
    )
    server = _server_class()(config)
    running = Worker(app, runtime) if worker else None
    working = asyncio.create_task(running.run()) if running else None
    try:
        await server.serve()  # returns on SIGINT/SIGTERM (uvicorn handles them)
    finally:
        if running is not None and working is not None:
            running.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(working, settings.shutdown_grace_seconds + 5)
        await runtime.close()


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a signal ends ``serve()`` without being raised again
        afterwards: the worker still has to drain and the runtime to close, then the process
        exits normally."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return Server
