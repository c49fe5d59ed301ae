"""In-process coordination, for the embedded default: locks, rate limits and pub/sub of this
process only, on its monotonic clock. There are no scripts: state that scripts keep in Redis
(breakers, bulkheads, sign-in counts) is each caller's own when ``shared`` is False."""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from tenantflow.coordination.keys import CoordinationKeys
from tenantflow.errors import ConfigError


class LocalCoordination:
    shared = False

    def __init__(self, prefix: str = "tf", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = CoordinationKeys(prefix)
        self.clock = clock
        self._locks: dict[str, tuple[str, float]] = {}  # name -> (holder, lease end)
        self._tat: dict[str, float] = {}
        self._subscribers: dict[str, set[_LocalSubscription]] = {}
        self._guard = threading.Lock()  # publish_blocking comes from other threads

    async def call(self, script: str, keys: Sequence[str], *args: Any) -> Any:
        raise ConfigError(f"the script {script!r} needs Redis: in-process state has no scripts")

    def lock(self, name: str, ttl: float) -> LocalLock:
        return LocalLock(self, name, secrets.token_hex(8), ttl)

    async def rate(self, key: str, rate: float, burst: int) -> float | None:
        now = self.clock()
        interval = 1.0 / rate
        tolerance = interval * (burst - 1)
        tat = max(self._tat.get(key, now), now)
        if tat - now > tolerance:
            return tat - tolerance - now
        self._tat[key] = tat + interval
        return None

    async def publish(self, channel: str, message: str) -> None:
        self.publish_blocking(channel, message)

    def publish_blocking(self, channel: str, message: str) -> None:
        with self._guard:
            subscribers = list(self._subscribers.get(channel, ()))
        for sub in subscribers:
            # Through the subscriber's loop, from whichever thread publishes; in order.
            sub.loop.call_soon_threadsafe(sub.messages.put_nowait, message)

    def subscribe(self, channel: str) -> _LocalSubscription:
        return _LocalSubscription(self, channel)

    def _join(self, sub: _LocalSubscription, joined: bool) -> None:
        with self._guard:
            subs = self._subscribers.setdefault(sub.channel, set())
            if joined:
                subs.add(sub)
            else:
                subs.discard(sub)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class LocalLock:
    owner: LocalCoordination = field(repr=False)
    name: str
    token: str
    ttl: float

    def _holder(self) -> str | None:
        held = self.owner._locks.get(self.name)
        if held is None or held[1] <= self.owner.clock():
            return None
        return held[0]

    def _lease(self) -> bool:
        self.owner._locks[self.name] = (self.token, self.owner.clock() + self.ttl)
        return True

    async def acquire(self) -> bool:
        return self._holder() in (None, self.token) and self._lease()

    async def extend(self) -> bool:
        return self._holder() == self.token and self._lease()

    async def release(self) -> bool:
        if self._holder() != self.token:
            return False
        del self.owner._locks[self.name]
        return True


class _LocalSubscription:
    def __init__(self, owner: LocalCoordination, channel: str) -> None:
        self.owner = owner
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self.messages: asyncio.Queue[str] = asyncio.Queue()

    @property
    def proven(self) -> float:
        # Messages of this process always arrive, but those of other processes never do:
        # nothing is proven of the installation.
        return -math.inf

    async def __aenter__(self) -> Self:
        self.owner._join(self, True)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.owner._join(self, False)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str]:
        while True:
            yield await self.messages.get()
