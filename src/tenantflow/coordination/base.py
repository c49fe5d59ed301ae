"""The coordination interface: what processes of one installation agree on.

``shared`` says what a backend is, so that callers pick their implementation from it, never
from a class name: True (Redis) when every process sees the same state and named scripts run
atomically on the server; False (in-process) when the state is this process's alone and there
are no scripts to call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

from tenantflow.coordination.keys import CoordinationKeys

PING_SECONDS = 0.2  # how often a subscription proves itself live


class Lock(Protocol):
    """A lease on a name, held by the token of this object: atomic acquire, extend and
    release, and extend and release only by the holder."""

    name: str
    token: str
    ttl: float

    async def acquire(self) -> bool:
        """Take the lock if free, or renew it if this token holds it; whether it holds it."""
        ...

    async def extend(self) -> bool:
        """Renew the lease for ``ttl`` if this token still holds it; whether it did."""
        ...

    async def release(self) -> bool:
        """Free the lock if this token holds it; whether it did."""
        ...


class Subscription(Protocol):
    """Messages published on a channel after the subscription began, in order. Iterating
    raises when the subscription is lost (the server away): what was published meanwhile
    never arrives, and the caller subscribes again."""

    @property
    def proven(self) -> float:
        """When (``time.monotonic``) every message published before then had arrived, as
        last proven; ``-inf`` before the first proof."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[str]: ...


class Coordination(Protocol):
    shared: bool
    keys: CoordinationKeys

    async def call(self, script: str, keys: Sequence[str], *args: Any) -> Any:
        """The reply of the named script of ``coordination.scripts.SCRIPTS`` (shared only)."""
        ...

    def lock(self, name: str, ttl: float) -> Lock:
        """A lock on ``name`` with leases of ``ttl`` seconds (not taken yet)."""
        ...

    async def rate(self, key: str, rate: float, burst: int) -> float | None:
        """One request against the limit ``key`` of ``rate`` a second in bursts of ``burst``:
        None if it may go, else the seconds to wait."""
        ...

    async def publish(self, channel: str, message: str) -> None:
        """Send ``message`` to the subscribers of ``channel`` (a name of ``keys.channel``)."""
        ...

    def publish_blocking(self, channel: str, message: str) -> None:
        """``publish`` from a thread, or from code with no event loop."""
        ...

    def subscribe(self, channel: str) -> Subscription:
        """A subscription to ``channel``, begun on entering it."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
