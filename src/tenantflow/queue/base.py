"""The queue interface: delivery of "run this" messages, per tenant, at least once.

The tenant database is the truth and the queue only delivers: a message names a run, and the
run's lease in the database decides who executes it. Semantics every backend keeps:

- ``enqueue`` makes a message visible after ``delay`` seconds; higher ``priority`` first.
- ``dequeue`` leases messages for ``visibility_timeout`` seconds. Until the lease ends no one
  else receives them; ``extend`` renews the lease of a message still being worked on. Every
  consumer of a queue uses the same visibility timeout (``TENANTFLOW_LEASE_SECONDS``): on
  Redis Streams a message is reclaimed once idle for the *reclaiming* consumer's timeout.
- A message whose lease ends without ``ack`` is delivered again (at least once). Every delivery
  counts; a message delivered ``max_deliveries`` times and still not acknowledged moves to the
  dead letters instead of being delivered again, with the reason "delivered N times without
  being acknowledged". Such a dead letter is a record, not a hold: its run has no live message,
  so if the database says the run still needs one, the reconciler enqueues it again (a database
  outage that made every delivery fail must not leave runs behind).
- ``dead_letter`` moves a delivery to the dead letters at once, with the consumer's reason,
  *parked*: the message stays live (``live``), so the reconciler leaves its run alone until
  the dead letter is replayed. For a run no consumer can execute, which would otherwise go
  round for ever.
- ``ack`` and ``retry_later`` act only on the current delivery (its receipt): a late
  acknowledgement from a worker whose lease already ended changes nothing. A ``retry_later``
  of a delivery whose message is gone altogether (the queue lost its data) makes a new
  message in its place: a run executed through the loss still gets its next delivery.
- ``epoch`` names the queue's data set; it changes when the data set may have lost messages
  (Redis emptied, restarted, failed over), so that consumers can rebuild it from the
  databases at once rather than wait for the reconciler's grace.
- Tenants with ready messages are served round robin (weighted) across dequeues, a tenant
  newly ready among the first; a tenant never has more than ``tenant_max_inflight`` messages
  in flight (0: no cap), across all consumers, and one at its cap does not hold up the others.
  A dequeue's work is bounded by its free slots, not by how many tenants exist or were active.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tenantflow.coordination import Coordination


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a message carries: the run, its priority, and the W3C ``traceparent`` of the
    run's origin (None when tracing is off), which every delivery of it carries on."""

    run_id: str
    priority: int = 0
    trace: str | None = None
    delay: float = 0.0  # seconds before it may be delivered


@dataclass(frozen=True, slots=True)
class Epoch:
    """The identity of a queue's data set (``Queue.epoch``). ``new``: this very look found none,
    or one the server cannot vouch for, and made this one; whatever the queue held before may
    be lost."""

    id: str
    new: bool = False


@dataclass(frozen=True, kw_only=True)
class Message:
    id: str
    tenant_id: str
    run_id: str
    priority: int
    deliveries: int
    receipt: str  # identifies this delivery; ack and retry_later need it
    trace: str | None = None  # the envelope's traceparent, as given (not validated)


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    id: str
    tenant_id: str
    run_id: str
    deliveries: int
    failed_at: float
    # Why it was dead-lettered: the consumer's reason ("workflow 'x' is not registered in this
    # worker's app 'y'"), or "delivered N times without being acknowledged". None only for a
    # dead letter stored before reasons were kept.
    reason: str | None = None
    parked: bool = False  # its run counts as live until it is replayed (see ``dead_letter``)


@dataclass(frozen=True, kw_only=True)
class QueueStats:
    depth: int  # waiting, delayed or in flight
    dead_letters: int
    oldest_at: float | None  # when the oldest message not yet acknowledged was made ready


class Queue(Protocol):
    max_deliveries: int

    async def enqueue(
        self,
        tenant_id: str,
        run_id: str,
        *,
        delay: float = 0.0,
        priority: int = 0,
        trace: str | None = None,
    ) -> str: ...

    async def enqueue_many(self, batch: Mapping[str, Sequence[Envelope]]) -> None:
        """Make messages ready, ``{tenant: [envelope, ...]}``, in one go (each after its
        envelope's ``delay``)."""
        ...

    async def dequeue(
        self,
        consumer: str,
        max_messages: int,
        visibility_timeout: float,
        *,
        weights: Mapping[str, int] | None = None,
        caps: Mapping[str, int] | None = None,
        skip: Collection[str] = (),
    ) -> list[Message]:
        """Up to ``max_messages`` deliveries, fairly across tenants (``weights``: a tenant's
        share, default 1), none of a tenant in ``skip``, and none beyond a tenant's cap of
        messages in flight across all consumers (``caps``, else the queue's default)."""
        ...

    async def extend(self, messages: Sequence[Message], visibility_timeout: float) -> None: ...

    async def ack(self, messages: Sequence[Message]) -> None: ...

    async def retry_later(
        self, message: Message, delay: float, *, count_delivery: bool = True
    ) -> None:
        """Make the message visible again after ``delay``. With ``count_delivery=False`` (a
        durable sleep, a worker shutting down) the delivery does not count towards dead
        lettering."""
        ...

    async def dead_letter(self, message: Message, reason: str) -> None:
        """Move this delivery to the dead letters now, parked, with ``reason``; nothing if it
        is no longer the current delivery."""
        ...

    async def dead_letters(self, tenant_id: str, limit: int = 100) -> list[DeadLetter]: ...

    async def replay_dead_letter(self, tenant_id: str, dead_letter_id: str) -> None: ...

    async def depth(self, tenant_id: str) -> int: ...

    async def stats(self, tenant_id: str) -> QueueStats: ...

    async def stats_many(self, tenant_ids: Sequence[str]) -> dict[str, QueueStats]:
        """``stats`` of each of these tenants, in a bounded number of round trips."""
        ...

    async def purge(self, tenant_id: str) -> None:
        """Forget everything of a tenant: messages, dead letters (an offboarded tenant)."""
        ...

    async def live(self, tenant_id: str, run_ids: Sequence[str]) -> set[str]:
        """Which of these runs have a message (ready, in flight, delayed, or parked in the dead
        letters)."""
        ...

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take, or keep if ``owner`` holds it, a lock that lapses after ``ttl`` seconds."""
        ...

    async def wait(self, timeout: float) -> None:
        """Return when a message may be ready, or after ``timeout`` seconds."""
        ...

    async def wait_and_dequeue(
        self,
        timeout: float,
        consumer: str,
        max_messages: int,
        visibility_timeout: float,
        *,
        weights: Mapping[str, int] | None = None,
        caps: Mapping[str, int] | None = None,
        skip: Collection[str] = (),
    ) -> list[Message]:
        """``wait(timeout)``, then ``dequeue(...)``: what an idle consumer does, which a
        backend may do in one go."""
        ...

    async def epoch(self) -> Epoch:
        """The identity of the queue's data set, made if there is none. A consumer that sees
        it change (or ``new``) knows messages may have been lost. The embedded queue's never
        changes: it is kept on the same disk as the tenant databases."""
        ...

    def coordination(self) -> Coordination:
        """The coordination backend beside this queue: the same Redis, on the same client,
        for the Redis queue; this process's own for the embedded one (made anew each call)."""
        ...

    async def ping(self) -> None:
        """Return once the queue's server answers; raise its error if it does not within
        the backend's timeout (the embedded queue always answers)."""
        ...

    async def close(self) -> None: ...
