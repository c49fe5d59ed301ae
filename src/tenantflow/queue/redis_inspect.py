"""What the Redis Streams queue tells of its state without changing it: depths, ages, dead
letters, the runs with live messages. Reads only, each one round trip (``stats_many``: one
per ``STATS_BATCH`` tenants)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tenantflow.queue.base import DeadLetter, QueueStats
from tenantflow.queue.keys import Keys

STATS_BATCH = 256  # tenants per pipelined round trip of stats_many


class Inspection:
    """Mixed into ``RedisStreamsQueue``."""

    redis: Any
    keys: Keys

    async def dead_letters(self, tenant_id: str, limit: int = 100) -> list[DeadLetter]:
        entries = await self.redis.xrange(self.keys.tenant(tenant_id).dead, count=limit)
        return [
            DeadLetter(
                id=entry_id,
                tenant_id=tenant_id,
                run_id=fields["run"],
                deliveries=int(fields["deliveries"]),
                failed_at=int(fields["at"]) / 1000,
                reason=fields.get("reason") or None,  # absent from letters of earlier versions
                parked=fields.get("parked") == "1",
            )
            for entry_id, fields in entries
        ]

    async def depth(self, tenant_id: str) -> int:
        keys = self.keys.tenant(tenant_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.stream)
            pipe.zcard(keys.delayed)
            stream, delayed = await pipe.execute()
        return int(stream) + int(delayed)

    async def stats(self, tenant_id: str) -> QueueStats:
        return (await self.stats_many([tenant_id]))[tenant_id]

    async def stats_many(self, tenant_ids: Sequence[str]) -> dict[str, QueueStats]:
        out: dict[str, QueueStats] = {}
        for start in range(0, len(tenant_ids), STATS_BATCH):
            batch = tenant_ids[start : start + STATS_BATCH]
            async with self.redis.pipeline(transaction=False) as pipe:
                for tenant_id in batch:
                    keys = self.keys.tenant(tenant_id)
                    pipe.xlen(keys.stream)
                    pipe.zcard(keys.delayed)
                    pipe.xlen(keys.dead)
                    pipe.xrange(keys.stream, count=1)  # acknowledged entries are deleted
                replies = await pipe.execute()
            for i, tenant_id in enumerate(batch):
                stream, delayed, dead, first = replies[4 * i : 4 * i + 4]
                oldest = int(first[0][0].split("-")[0]) / 1000 if first else None
                out[tenant_id] = QueueStats(
                    depth=int(stream) + int(delayed), dead_letters=int(dead), oldest_at=oldest
                )
        return out

    async def live(self, tenant_id: str, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        counts = await self.redis.hmget(self.keys.tenant(tenant_id).live, list(run_ids))
        return {run for run, n in zip(run_ids, counts, strict=True) if n and int(n) > 0}
