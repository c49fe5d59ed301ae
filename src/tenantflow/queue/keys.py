"""Every Redis key and channel tenantflow uses, in one place: the queue's here, the rest in
``coordination.keys`` (which ``Keys`` extends).

Each tenant's keys share the hash tag ``{t:<tenant>}``, so they live in one slot. The ready
and due sets span tenants and every script of a tenant's queue changes them together with the
tenant's keys (so that a tenant enters the ready set atomically with its message): on Redis
Cluster the queue needs one hash tag for all (a prefix such as ``{tf}``), one shard; see
``lua``. ``wake``, the locks and the rest span tenants and no script touches them together
with a tenant's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenantflow.coordination.keys import CoordinationKeys

GROUP = "workers"  # the consumer group on every tenant stream


@dataclass(frozen=True)
class TenantKeys:
    stream: str  # messages ready to be read or in flight (the group's pending list)
    delayed: str  # sorted set: messages not visible before their score (ms, Redis clock)
    live: str  # hash: run id -> number of live messages (ready, in flight or delayed)
    dead: str  # stream of dead letters (capped)
    seq: str  # counter making delayed members unique

    def all(self) -> list[str]:
        return [self.stream, self.delayed, self.live, self.dead, self.seq]


@dataclass(frozen=True)
class Keys(CoordinationKeys):
    """The queue's keys, and (inherited) those of the coordination backend under the same
    prefix: rate limits, sign-in counts, breakers, bulkheads, locks, channels."""

    def tenant(self, tenant_id: str) -> TenantKeys:
        tag = f"{self.prefix}:{{t:{tenant_id}}}"
        return TenantKeys(
            stream=f"{tag}:stream",
            delayed=f"{tag}:delayed",
            live=f"{tag}:live",
            dead=f"{tag}:dead",
            seq=f"{tag}:seq",
        )

    def queue(self, tenant_id: str) -> list[str]:
        """The keys of a tenant's queue scripts: its own, then the ready and due sets."""
        return [*self.tenant(tenant_id).all(), self.ready, self.due]

    @property
    def ready(self) -> str:
        """Sorted set: tenant -> its pass in the round robin, while it has messages ready."""
        return f"{self.prefix}:ready"

    @property
    def due(self) -> str:
        """Sorted set: tenant -> when (ms) it needs a look: a delayed message due, or a lease
        of its that may lapse."""
        return f"{self.prefix}:due"

    @property
    def caps(self) -> str:
        """Hash: tenant -> its cap on messages in flight, as the consumers were last told."""
        return f"{self.prefix}:caps"

    @property
    def weights(self) -> str:
        """Hash: tenant -> its share in the round robin (default 1)."""
        return f"{self.prefix}:weights"

    @property
    def active(self) -> str:
        """Sorted set of tenants kept by earlier versions; adopted into ``due``, then gone."""
        return f"{self.prefix}:active"

    @property
    def wake(self) -> str:
        """List of wake-up tokens (tenant ids), one pushed per message made ready; an idle
        worker blocks on it (BLPOP), so each token wakes one worker. Capped."""
        return f"{self.prefix}:wake"

    def taken(self, consumer: str, call: str) -> str:
        """String: the deliveries one dispatch call made to ``consumer`` (JSON, as the call
        returned them), kept for a visibility timeout or until the consumer has its reply, so
        that a reply lost on the way can be delivered again; see ``queue/lua/dispatch.lua``."""
        return f"{self.prefix}:taken:{consumer}:{call}"

    @property
    def epoch(self) -> str:
        """String: the identity of the queue's data set, ``<random>|<run_id>`` (the run id of
        the Redis server process that made it). Missing, or made by another server process,
        it says the data set may have lost messages; see ``queue/lua/epoch.lua``."""
        return f"{self.prefix}:epoch"
