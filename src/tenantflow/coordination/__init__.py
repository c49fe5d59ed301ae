"""The coordination backend: what the processes of an installation agree on, beside the queue.

One interface (``Coordination``) for atomic scripts called by name, locks (atomic acquire and
extend, release and extend by the holder only), rate limits, and pub/sub notifications; two
backends: ``RedisCoordination`` (``coordination.redis``, imported only when a Redis URL is
used) and ``LocalCoordination``, in-process, for the embedded default. The breakers,
bulkheads and sign-in counts keep their state in this backend's scripts when it is
``shared``, and in the process otherwise: they choose by that flag, never by a class name.

``open_coordination`` opens it from the settings: the queue's Redis when the queue is Redis
Streams (the same URL and key prefix, with clients of its own, so that neither the queue nor
the coordination reaches into the other's connections), in-process otherwise. The queue's
scripts are the queue's (``queue/lua/``, beside its key layout); they use the one loader of
``coordination.scripts`` and the one round trip with its reload of ``coordination.redis``.

Stands on ``errors`` and ``settings`` alone.
"""

from __future__ import annotations

from tenantflow.coordination.base import Coordination, Lock, Subscription
from tenantflow.coordination.keys import ACCESS_CHANGES, CoordinationKeys
from tenantflow.coordination.local import LocalCoordination
from tenantflow.coordination.scripts import SCRIPTS, Script, Scripts
from tenantflow.settings import Settings

__all__ = [
    "ACCESS_CHANGES",
    "SCRIPTS",
    "Coordination",
    "CoordinationKeys",
    "LocalCoordination",
    "Lock",
    "Script",
    "Scripts",
    "Subscription",
    "open_coordination",
]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_coordination(settings: Settings) -> Coordination:
    """Redis where the queue is Redis Streams; this process's own on the embedded default."""
    url = settings.resolved_queue_url()
    if url.startswith(REDIS_SCHEMES):
        from tenantflow._extras import require

        require("redis", "TENANTFLOW_QUEUE_URL=redis://…")
        from tenantflow.coordination.redis import RedisCoordination

        return RedisCoordination(
            url, prefix=settings.queue_prefix, timeout=settings.redis_timeout_seconds
        )
    return LocalCoordination(settings.queue_prefix)
