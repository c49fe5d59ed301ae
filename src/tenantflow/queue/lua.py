"""Lua scripts of the Redis Streams queue (``queue/lua/*.lua``): every multi-key change of a
tenant's queue is one atomic script. Times come from the Redis clock (``now_ms`` of the
coordination prelude), never from the callers' clocks. Each file's header gives its KEYS,
ARGV and reply; ``common.lua`` holds the helpers and the key layout of a tenant's scripts.

A message made ready enters its tenant into ``ready`` in the same script; ``dispatch`` removes
the tenant once its stream has nothing left to deliver. A delivery's receipt is (consumer, Redis
delivery count); ack, retry and extend act only when the pending entry still belongs to that
consumer with that count, so a late call from a consumer whose message was reclaimed changes
nothing.

Redis Cluster: ``ready`` and ``due`` are one slot each, and the scripts change them together
with a tenant's keys (``dispatch`` reaches the tenant keys by name, from the prefix), so on a
cluster the whole queue must share one hash tag (a prefix such as ``{tf}``), which puts it on
one shard. That is the price of entering and leaving the ready set atomically with the
messages; sharding it (N ready sets, each tenant's keys tagged with its shard) is the way out
when one Redis is not enough.
"""

from __future__ import annotations

from tenantflow.coordination.scripts import Scripts

SCRIPTS = Scripts("tenantflow.queue")
