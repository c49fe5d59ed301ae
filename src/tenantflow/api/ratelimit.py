"""Per-tenant request rate limits: the generic cell rate algorithm (GCRA).

Each tenant may make ``rate`` requests a second, in bursts of up to ``burst``. The state is
the coordination backend's (``Coordination.rate``): with the Redis queue in Redis, shared by
every API process, changed by one script on the Redis clock (``coordination/lua/
rate_limit.lua``); on the embedded default in the process.
"""

from __future__ import annotations

from tenantflow.coordination import Coordination


class RateLimiter:
    def __init__(self, coordination: Coordination) -> None:
        self.coordination = coordination

    async def check(self, tenant_id: str, rate: float, burst: int) -> float | None:
        """None if the request may go; else the seconds to wait before retrying."""
        key = self.coordination.keys.rate(tenant_id)
        return await self.coordination.rate(key, rate, burst)
