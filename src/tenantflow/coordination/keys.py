"""The Redis keys and channels of the coordination backend (``queue.keys.Keys`` adds the
queue's to them, so that every key of an installation is written in these two classes).

Each family's keys share a hash tag where one script changes several of them at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoordinationKeys:
    prefix: str = "tf"

    def rate(self, tenant_id: str) -> str:
        """The tenant's request-rate state (``api.ratelimit``), under its hash tag."""
        return f"{self.prefix}:{{t:{tenant_id}}}:rate"

    def signin(self, name: str) -> str:
        """Failed sign-ins of an account or a client address (``api.signin``); all under one
        hash tag, since one script counts an attempt's two at once."""
        return f"{self.prefix}:{{signin}}:{name}"

    def breaker(self, name: str) -> tuple[str, str, str]:
        """A circuit breaker's state hash, its sliding window and its half-open probes' leases
        (a sorted set scored by lease end), under one hash tag."""
        tag = f"{self.prefix}:{{b:{name}}}"
        return f"{tag}:state", f"{tag}:window", f"{tag}:probes"

    def bulkhead(self, name: str) -> str:
        """A bulkhead's holders (a sorted set scored by lease end)."""
        return f"{self.prefix}:{{k:{name}}}:bulkhead"

    def lock(self, name: str) -> str:
        """A lock: its holder's token, expiring when the lease ends."""
        return f"{self.prefix}:lock:{name}"

    def channel(self, name: str) -> str:
        """A pub/sub channel (``access-changes``: changes that take access away)."""
        return f"{self.prefix}:{name}"


ACCESS_CHANGES = "access-changes"
