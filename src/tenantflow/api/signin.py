"""Sign-in that cannot be abused: the password grant of ``POST /platform/v1/token``.

A password hash (argon2id) costs a fifth of a second of CPU, on purpose; a client guessing
passwords would spend that CPU for every tenant of the process. So:

- **Failures are limited before any hashing**, per account and per client address. Past
  ``signin_account_failures`` (``signin_address_failures``) failures, each further one locks
  the account (address) out, for twice as long as the last lock-out (1 s, 2 s, 4 s…, at most
  ``signin_lockout_max_seconds``); an attempt while either is locked out answers ``429
  sign-in-throttled`` with ``Retry-After``, and is never hashed. Failures are forgotten
  ``signin_lockout_max_seconds`` after the last; a success forgets the account's (never the
  address's: a valid account must not buy guesses at others). With the Redis queue the counts
  live in Redis (the coordination backend's script, one call per check and per failure, on
  the Redis clock), shared by every API process; on the embedded default, and while Redis
  does not answer, in the process.
- **Hashes run off the event loop**, ``signin_concurrency`` at a time, in threads of their own
  at a lower scheduling priority (Linux), so that other requests go first when the CPU is
  short. An attempt waiting for its turn is checked again before it is hashed.
- **An unknown account and a wrong password get the same answer**, in status, body and time
  (the identity layer hashes against a dummy; the counts are kept by email whether it names an
  account or not), and each lock-out is in the platform audit log (``sign_in.locked_out``).

The client address is the peer's, as the server sees it: behind a proxy, let the server take
it from ``X-Forwarded-For`` (uvicorn's ``--forwarded-allow-ips``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from tenantflow.backends import log_failure, unavailable
from tenantflow.coordination import Coordination
from tenantflow.errors import AuthenticationError, SignInThrottledError
from tenantflow.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

LOCKOUT_FIRST_SECONDS = 1.0  # the first lock-out; each next one twice the last
LOCAL_KEYS = 100_000  # counts kept in a process at most (the oldest are dropped first)
HASHING_NICENESS = 10  # of the hashing threads: the event loop's thread goes first
REDIS_WARNING_SECONDS = 10.0  # Redis away: one line this often, not one per attempt


def lockout_seconds(over: int, longest: float) -> float:
    """The lock-out after a key's ``over``-th failure beyond its free ones (0: none)."""
    if over <= 0:
        return 0.0
    return min(longest, LOCKOUT_FIRST_SECONDS * 2.0 ** min(over - 1, 40))


class SignInLimits(Protocol):
    """Failed sign-ins by key (an account's, an address's)."""

    async def locked_for(self, keys: Sequence[str]) -> float:
        """Seconds until none of ``keys`` is locked out (0: none is)."""
        ...

    async def failed(self, keys: Sequence[tuple[str, int]]) -> list[tuple[float, int]]:
        """Count a failure of each ``(key, free failures)``; per key, the lock-out it starts
        now (seconds, 0 for none) and its failures so far."""
        ...

    async def forget(self, key: str) -> None: ...


class LocalSignInLimits:
    """This process's counts (the embedded default)."""

    def __init__(self, longest: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.longest = longest
        self.clock = clock
        # key -> [failures, locked until, last failure], least recently failed first.
        self._counts: OrderedDict[str, list[float]] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._counts:
            key, (_, _, last) = next(iter(self._counts.items()))
            if now - last < self.longest and len(self._counts) <= LOCAL_KEYS:
                break
            del self._counts[key]

    async def locked_for(self, keys: Sequence[str]) -> float:
        now = self.clock()
        self._expire(now)
        return max([0.0, *(self._counts[k][1] - now for k in keys if k in self._counts)])

    async def failed(self, keys: Sequence[tuple[str, int]]) -> list[tuple[float, int]]:
        now = self.clock()
        out = []
        for key, free in keys:
            count = self._counts.pop(key, None) or [0.0, 0.0, now]
            count[0] += 1
            lock = lockout_seconds(int(count[0]) - free, self.longest)
            if lock:
                count[1] = now + lock
            count[2] = now
            self._counts[key] = count  # the most recent failure last
            out.append((lock, int(count[0])))
        self._expire(now)
        return out

    async def forget(self, key: str) -> None:
        self._counts.pop(key, None)


class RedisSignInLimits:
    """Counts in Redis (the shared coordination backend's ``signin_limits`` script), shared by
    every API process of the installation. While Redis does not answer, this process's own
    counts stand in (sign-in goes on, still limited)."""

    def __init__(self, coordination: Coordination, longest: float) -> None:
        self.coordination = coordination
        self.longest_ms = int(longest * 1000)
        self.local = LocalSignInLimits(longest)
        self._warned_at = -math.inf

    def _limits(self, keys: Sequence[str], *args: Any) -> Awaitable[Any]:
        names = [self.coordination.keys.signin(k) for k in keys]
        return self.coordination.call("signin_limits", names, *args)

    async def locked_for(self, keys: Sequence[str]) -> float:
        reply = await self._shared(self._limits(keys, "check", self.longest_ms))
        if reply is None:
            return await self.local.locked_for(keys)
        return 0.0 if reply == "ok" else float(reply) / 1000.0

    async def failed(self, keys: Sequence[tuple[str, int]]) -> list[tuple[float, int]]:
        frees = [free for _, free in keys]
        first_ms = int(LOCKOUT_FIRST_SECONDS * 1000)
        fail = self._limits([k for k, _ in keys], "fail", self.longest_ms, *frees, first_ms)
        reply = await self._shared(fail)
        if reply is None:
            return await self.local.failed(keys)
        return [(float(reply[i]) / 1000.0, int(reply[i + 1])) for i in range(0, len(reply), 2)]

    async def forget(self, key: str) -> None:
        await self.local.forget(key)
        await self._shared(self._limits([key], "forget"))

    async def _shared(self, call: Awaitable[Any]) -> Any:
        """The reply of Redis; None when it does not answer (said every few seconds)."""
        try:
            return await call
        except Exception as exc:
            if unavailable(exc) != "redis":
                raise
            if time.monotonic() - self._warned_at > REDIS_WARNING_SECONDS:
                self._warned_at = time.monotonic()
                log_failure(log, "Redis unreachable: sign-ins counted per process", exc)
            return None


def account_key(email: str) -> str:
    """The counts of whatever account ``email`` names, existing or not (a digest: no email
    is kept in the counts)."""
    return "account:" + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


def _lower_priority() -> None:
    if sys.platform == "linux":  # a thread's own niceness (elsewhere it is the process's)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)


@dataclass
class _Turn:
    """An address's attempts in this process: one is hashed at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


Record = Callable[[str, str, dict[str, Any]], Awaitable[None]]


class SignInGuard:
    """The password grant's limits and its hashing threads (see the module docstring)."""

    def __init__(self, limits: SignInLimits, settings: Settings, record: Record) -> None:
        """``record(scope, subject, details)`` writes a lock-out to the audit log: of an
        ``account`` (``subject`` the email tried) or an ``address``."""
        self.limits = limits
        self.account_failures = settings.signin_account_failures
        self.address_failures = settings.signin_address_failures
        self.record = record
        self._hashing = asyncio.Semaphore(settings.signin_concurrency)
        self._turns: dict[str, _Turn] = {}
        self._threads = ThreadPoolExecutor(
            max_workers=settings.signin_concurrency,
            thread_name_prefix="tenantflow-sign-in",
            initializer=_lower_priority,
        )

    async def authenticate(
        self, verify: Callable[[str, str], T], email: str, password: str, *, address: str
    ) -> T:
        """``verify(email, password)`` (an ``AuthenticationError`` when they do not match),
        unless the account or the address is locked out (``SignInThrottledError``). The
        attempt is seen to its end, and counted, even if its caller goes away meanwhile: a
        client hanging up cannot hash for free."""
        counts = [
            (account_key(email), self.account_failures),
            (f"address:{address}", self.address_failures),
        ]
        await self._refuse_if_locked(counts)
        attempt = asyncio.ensure_future(self._attempt(verify, email, password, counts, address))
        # Its outcome is this caller's; if the caller is gone, nobody's (retrieved, not lost).
        attempt.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(attempt)

    async def _attempt(
        self,
        verify: Callable[[str, str], T],
        email: str,
        password: str,
        counts: list[tuple[str, int]],
        address: str,
    ) -> T:
        # One attempt of an address at a time: one client never holds more than one thread.
        turn = self._turns.setdefault(address, _Turn())
        turn.users += 1
        try:
            waited = turn.lock.locked() or self._hashing.locked()
            async with turn.lock, self._hashing:
                if waited:  # failures may have been counted meanwhile
                    await self._refuse_if_locked(counts)
                call = functools.partial(contextvars.copy_context().run, verify, email, password)
                try:
                    verified = await asyncio.get_running_loop().run_in_executor(self._threads, call)
                except AuthenticationError:
                    await self._failed(counts, email, address)
                    raise
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[address]
        await self.limits.forget(counts[0][0])
        return verified

    async def _refuse_if_locked(self, counts: list[tuple[str, int]]) -> None:
        wait = await self.limits.locked_for([key for key, _ in counts])
        if wait > 0:
            raise SignInThrottledError(retry_after=wait)

    async def _failed(self, counts: list[tuple[str, int]], email: str, address: str) -> None:
        for scope, (seconds, failures) in zip(
            ("account", "address"), await self.limits.failed(counts), strict=True
        ):
            if not seconds:
                continue
            log.warning("sign-ins locked out", scope=scope, seconds=seconds, failures=failures)
            details = {"seconds": seconds, "failures": failures, "address": address}
            try:
                await self.record(scope, email if scope == "account" else address, details)
            except Exception as exc:  # the platform database away: the answer is still a 401
                log_failure(log, "auditing a sign-in lock-out failed", exc, scope=scope)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
