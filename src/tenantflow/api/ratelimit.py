"""Per-tenant request rate limits: the generic cell rate algorithm (GCRA).

Each tenant may make ``rate`` requests a second, in bursts of up to ``burst``. With the Redis
queue the state lives in Redis, shared by every API process, changed by one script on the
Redis clock; on the embedded default it lives in the process.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Protocol

GCRA = """
-- KEYS[1] the tenant's rate key; ARGV: interval_ms, tolerance_ms. Returns "ok", or the
-- milliseconds to wait (as a string: Lua numbers lose their fraction on the way out).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then return tostring(tat - tolerance - now) end
local next_tat = tat + interval
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now) + 1000)
return 'ok'
"""


class RateLimiter(Protocol):
    async def check(self, tenant_id: str, rate: float, burst: int) -> float | None:
        """None if the request may go; else the seconds to wait before retrying."""
        ...


class LocalRateLimiter:
    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    async def check(self, tenant_id: str, rate: float, burst: int) -> float | None:
        now = time.monotonic()
        interval = 1.0 / rate
        tolerance = interval * (burst - 1)
        tat = max(self._tat.get(tenant_id, now), now)
        if tat - now > tolerance:
            return tat - tolerance - now
        self._tat[tenant_id] = tat + interval
        return None


class RedisRateLimiter:
    def __init__(self, redis: Any, key_of: Any) -> None:
        self.redis = redis
        self.key_of = key_of
        self._sha = hashlib.sha1(GCRA.encode()).hexdigest()

    async def check(self, tenant_id: str, rate: float, burst: int) -> float | None:
        interval = 1000.0 / rate
        args = [repr(interval), repr(interval * (burst - 1))]
        from redis.exceptions import NoScriptError

        key = self.key_of(tenant_id)
        try:
            reply = await self.redis.evalsha(self._sha, 1, key, *args)
        except NoScriptError:
            reply = await self.redis.eval(GCRA, 1, key, *args)
        return None if reply == "ok" else float(reply) / 1000.0
