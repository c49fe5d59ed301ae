"""The coordination backend: what the processes of an installation agree on, beside the queue.

One interface (``Coordination``) for atomic scripts called by name, locks (atomic acquire and
extend, release and extend by the holder only), rate limits, and pub/sub notifications; two
backends: ``RedisCoordination`` (``coordination.redis``, imported only when a Redis URL is
used) and ``LocalCoordination``, in-process, for the embedded default. The breakers,
bulkheads and sign-in counts keep their state in this backend's scripts when it is
``shared``, and in the process otherwise: they choose by that flag, never by a class name.

A process gets it from its queue (``Queue.coordination``), which the runtime opens from the
settings: the Redis queue's is a ``RedisCoordination`` on the same URL, key prefix and client
(one pool of connections per process, warm for the breakers' first calls, which have a quarter
of a second each); the embedded queue's is in-process. The queue's scripts are the queue's
(``queue/lua/``, beside its key layout); they use the one loader of ``coordination.scripts``
and the one round trip, with its reload, of ``coordination.redis``.

Stands on ``errors`` and ``settings`` alone.
"""

from __future__ import annotations

from tenantflow.coordination.base import Coordination, Lock, Subscription
from tenantflow.coordination.keys import ACCESS_CHANGES, CoordinationKeys
from tenantflow.coordination.local import LocalCoordination
from tenantflow.coordination.scripts import SCRIPTS, Script, Scripts

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
]
