"""Bulkheads: at most N calls to a dependency at once, across every worker process.

With the Redis queue a bulkhead is a sorted set of the calls holding a slot, scored by when
their lease ends (Redis clock): a process that dies mid-call gives its slot back when the lease
ends. Taking and giving back a slot are the coordination backend's ``bulkhead_*`` scripts.
Without Redis (or while it is away) each process limits itself to N on its own, and says so.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from tenantflow.coordination import Coordination
from tenantflow.errors import BulkheadFullError, ConfigError

log = structlog.get_logger(__name__)
T = TypeVar("T")

SHARED_TIMEOUT_SECONDS = 0.25
RETRY_SHARED_SECONDS = 2.0


@dataclass(frozen=True, kw_only=True)
class BulkheadConfig:
    """A bulkhead: at most ``max_concurrent`` calls at once, across every process sharing it;
    a slot held by a process that died is free again after ``lease_seconds``."""

    max_concurrent: int = 25  # Resilience4j's default
    lease_seconds: float = 300.0  # a slot of a process that died comes back after this

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.lease_seconds <= 0:
            raise ConfigError("a bulkhead allows at least one call, for a positive lease")


@dataclass(frozen=True)
class Slot:
    name: str
    id: str


class Bulkheads:
    def __init__(self, coordination: Coordination | None = None) -> None:
        """Shared through ``coordination`` when it is shared; this process's own otherwise."""
        self.coordination = coordination if coordination and coordination.shared else None
        self.configs: dict[str, BulkheadConfig] = {}
        self._local: dict[str, int] = {}
        self._retry_shared_at = 0.0

    def configure(self, name: str, config: BulkheadConfig | None = None) -> None:
        self.configs[name] = config or BulkheadConfig()

    def config(self, name: str) -> BulkheadConfig:
        return self.configs.get(name) or BulkheadConfig()

    async def take(self, name: str) -> Slot:
        """A slot, or ``BulkheadFullError`` with the seconds to wait at most."""
        config = self.config(name)
        slot = Slot(name, secrets.token_hex(8))
        reply = None
        if self._use_shared():
            reply = await self._shared(lambda: self._take_shared(slot, config))
        if reply is None:  # no Redis, or Redis away: this process's own count
            if self._local.get(name, 0) >= config.max_concurrent:
                raise BulkheadFullError(name, 0.05)
            self._local[name] = self._local.get(name, 0) + 1
            return Slot(name, "local")
        if reply <= 0:
            raise BulkheadFullError(name, max(-reply / 1000.0, 0.01))
        return slot

    async def give_back(self, slot: Slot) -> None:
        if slot.id == "local":
            self._local[slot.name] = max(0, self._local.get(slot.name, 0) - 1)
            return
        await self._shared(lambda: self._call("bulkhead_give_back", slot.name, slot.id))

    async def call(self, name: str, fn: Callable[[], Awaitable[T]], *, wait: float) -> T:
        """``await fn()`` holding a slot of ``name``, waiting up to ``wait`` s for one."""
        deadline = time.monotonic() + wait
        while True:
            try:
                slot = await self.take(name)
                break
            except BulkheadFullError as full:
                if time.monotonic() + min(full.retry_after, 0.05) > deadline:
                    raise
                await asyncio.sleep(min(full.retry_after, 0.05))
        try:
            return await fn()
        finally:
            await self.give_back(slot)

    async def in_use(self, name: str) -> int:
        if self._use_shared():
            reply = await self._shared(lambda: self._call("bulkhead_in_use", name))
            if reply is not None:
                return int(reply)
        return self._local.get(name, 0)

    def _use_shared(self) -> bool:
        return self.coordination is not None and time.monotonic() >= self._retry_shared_at

    async def _call(self, script: str, name: str, *args: Any) -> Any:
        assert self.coordination is not None
        key = self.coordination.keys.bulkhead(name)
        return await self.coordination.call(script, [key], *args)

    async def _take_shared(self, slot: Slot, config: BulkheadConfig) -> int:
        lease_ms = int(config.lease_seconds * 1000)
        taken = await self._call(
            "bulkhead_take", slot.name, slot.id, config.max_concurrent, lease_ms
        )
        return int(taken)

    async def _shared(self, make: Callable[[], Awaitable[T]]) -> T | None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await asyncio.wait_for(make(), SHARED_TIMEOUT_SECONDS)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            log.warning("Redis unreachable: bulkheads count per process", error=type(exc).__name__)
            self._retry_shared_at = time.monotonic() + RETRY_SHARED_SECONDS
            return None
