"""Circuit breakers shared by every worker process.

A breaker guards one dependency (``"payments"``), optionally per tenant. It is ``closed``
(calls go through, outcomes are counted in a sliding window), ``open`` (calls are refused for
``wait_open`` seconds) or ``half_open`` (a limited number of probe calls go through; their
outcomes close it again or reopen it). The defaults are Resilience4j's.

A half-open probe holds its slot on a lease of ``probe_timeout`` plus ``PROBE_LEASE_MARGIN``
seconds: a probe that has not answered by then (its process was killed, or the call hangs)
loses the slot to the next caller, so a lost probe delays recovery by at most its lease and
never wedges the breaker half-open. An answer that comes after its lease is not counted,
whatever it says: the slot went to another probe, whose answer counts instead.

With the Redis queue the state lives in Redis and changes only through the coordination
backend's scripts (``coordination/lua/breaker_*.lua``), on the Redis clock, so every process
sees one breaker and the half-open probes are counted across all of them. When Redis cannot be
reached, each process falls back to a breaker of its own (same rules, local clock), and says so
in its log; it rejoins the shared one when Redis answers again. On the embedded default the
local breaker is the only one.
"""

from __future__ import annotations

import asyncio
import enum
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from tenantflow.coordination import Coordination
from tenantflow.errors import CircuitOpenError, ConfigError

log = structlog.get_logger(__name__)
T = TypeVar("T")

SHARED_TIMEOUT_SECONDS = 0.25
RETRY_SHARED_SECONDS = 2.0
# A probe's lease is its timeout plus this: the Redis round trips around the call (bounded by
# SHARED_TIMEOUT_SECONDS each) and the step's own bookkeeping must not make a healthy probe late.
PROBE_LEASE_MARGIN = 1.0
HALF_OPEN_FULL_RETRY = 1.0  # a caller refused by a full half-open breaker asks again this soon


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class WindowType(enum.StrEnum):
    COUNT = "count"  # the last ``window_size`` calls
    TIME = "time"  # the calls of the last ``window_size`` seconds


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """Resilience4j's defaults, except where a reason is given."""

    window_type: WindowType = WindowType.COUNT
    window_size: int = 100
    minimum_calls: int = 100
    failure_rate: float = 50.0  # percent
    slow_call_rate: float = 100.0  # percent
    slow_call_seconds: float = 60.0
    wait_open: float = 60.0
    half_open_calls: int = 10
    # Not Resilience4j's (it waits for a probe for ever): how long a half-open probe is waited
    # for. A call as long as slow_call_seconds's default is slow already.
    probe_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.minimum_calls < 1 or self.half_open_calls < 1:
            raise ConfigError("window size, minimum calls and half-open calls are at least 1")
        if not (0 < self.failure_rate <= 100 and 0 < self.slow_call_rate <= 100):
            raise ConfigError("rates are percentages in (0, 100]")
        if not (0 < self.probe_timeout < math.inf):
            raise ConfigError("the probe timeout is a positive number of seconds")

    @property
    def probe_lease(self) -> float:
        """Seconds a half-open probe holds its slot without answering."""
        return self.probe_timeout + PROBE_LEASE_MARGIN


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; ``probe`` is the id of its half-open probe slot, if it is one."""

    name: str
    probe: str | None
    started: float


@dataclass(frozen=True, kw_only=True)
class BreakerStatus:
    name: str
    state: BreakerState
    calls: int
    failure_rate: float | None  # percent, None below the minimum number of calls
    slow_call_rate: float | None
    retry_after: float  # seconds until an open breaker lets a probe through


class BreakerBackend(Protocol):
    async def acquire(self, name: str, config: BreakerConfig, probe: str) -> tuple[bool, float]:
        """(True, 1.0): let through as the half-open probe ``probe``, on its lease; (True, 0.0):
        an ordinary call; (False, seconds to wait): refused."""
        ...

    async def record(
        self, name: str, config: BreakerConfig, *, probe: str | None, failed: bool, slow: bool
    ) -> None:
        """Count a call's outcome; a probe's only while it holds its lease."""
        ...

    async def status(self, name: str, config: BreakerConfig) -> BreakerStatus: ...


# -- the local breaker (embedded default, and the fallback when Redis is away) -----------------


@dataclass
class _Local:
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    calls: deque[tuple[float, bool, bool]] = field(default_factory=deque)  # (at, failed, slow)
    leases: dict[str, float] = field(default_factory=dict)  # probe in flight -> its lease end
    probes: list[tuple[bool, bool]] = field(default_factory=list)  # answers: (failed, slow)


class LocalBreakers:
    """Breakers of this process only (the same rules as the shared ones)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._breakers: dict[str, _Local] = {}

    def _get(self, name: str) -> _Local:
        return self._breakers.setdefault(name, _Local())

    def _window(self, b: _Local, config: BreakerConfig, now: float) -> None:
        if config.window_type is WindowType.COUNT:
            while len(b.calls) > config.window_size:
                b.calls.popleft()
        else:
            while b.calls and b.calls[0][0] <= now - config.window_size:
                b.calls.popleft()

    async def acquire(self, name: str, config: BreakerConfig, probe: str) -> tuple[bool, float]:
        b, now = self._get(name), self.clock()
        if b.state is BreakerState.OPEN:
            if now - b.opened_at < config.wait_open:
                return False, config.wait_open - (now - b.opened_at)
            b.state, b.leases, b.probes = BreakerState.HALF_OPEN, {}, []
        if b.state is BreakerState.HALF_OPEN:
            b.leases = {p: end for p, end in b.leases.items() if end > now}  # reclaim lost ones
            if len(b.probes) + len(b.leases) >= config.half_open_calls:
                return False, HALF_OPEN_FULL_RETRY
            b.leases[probe] = now + config.probe_lease
            return True, 1.0
        return True, 0.0

    async def record(
        self, name: str, config: BreakerConfig, *, probe: str | None, failed: bool, slow: bool
    ) -> None:
        b, now = self._get(name), self.clock()
        if probe is not None:
            lease_end = b.leases.pop(probe, None)
            if b.state is not BreakerState.HALF_OPEN or lease_end is None or lease_end <= now:
                _late_probe(name, config)
                return
            b.probes.append((failed, slow))
            if len(b.probes) >= config.half_open_calls:
                if _trips(config, len(b.probes), *_counts(b.probes)):
                    b.state, b.opened_at = BreakerState.OPEN, now
                else:
                    b.state = BreakerState.CLOSED
                b.calls.clear()
                b.leases.clear()
            return
        if b.state is not BreakerState.CLOSED:
            return  # a call let through before the breaker opened: it no longer counts
        b.calls.append((now, failed, slow))
        self._window(b, config, now)
        outcomes = [(f, s) for _, f, s in b.calls]
        if len(outcomes) >= config.minimum_calls and _trips(
            config, len(outcomes), *_counts(outcomes)
        ):
            b.state, b.opened_at = BreakerState.OPEN, now
            b.calls.clear()

    async def status(self, name: str, config: BreakerConfig) -> BreakerStatus:
        b, now = self._get(name), self.clock()
        self._window(b, config, now)
        outcomes = [(f, s) for _, f, s in b.calls]
        failures, slow = _counts(outcomes)
        enough = len(outcomes) >= config.minimum_calls
        return BreakerStatus(
            name=name,
            state=b.state,
            calls=len(outcomes),
            failure_rate=100.0 * failures / len(outcomes) if enough else None,
            slow_call_rate=100.0 * slow / len(outcomes) if enough else None,
            retry_after=max(0.0, config.wait_open - (now - b.opened_at))
            if b.state is BreakerState.OPEN
            else 0.0,
        )


def _late_probe(name: str, config: BreakerConfig) -> None:
    log.warning(
        "a half-open probe answered after its lease: not counted (its slot went to another "
        "probe); if the dependency's calls take this long, raise the breaker's probe_timeout",
        breaker=name,
        probe_lease=config.probe_lease,
    )


def _counts(outcomes: list[tuple[bool, bool]]) -> tuple[int, int]:
    return sum(1 for f, _ in outcomes if f), sum(1 for _, s in outcomes if s)


def _trips(config: BreakerConfig, calls: int, failures: int, slow: int) -> bool:
    return (
        100.0 * failures / calls >= config.failure_rate
        or 100.0 * slow / calls >= config.slow_call_rate
    )


# -- the shared breaker (Redis) ----------------------------------------------------------------


class RedisBreakers:
    """Breakers shared through a shared coordination backend (its ``breaker_*`` scripts),
    with a local fallback while Redis is away."""

    def __init__(self, coordination: Coordination) -> None:
        self.coordination = coordination
        self.fallback = LocalBreakers()
        self._degraded = False
        self._retry_shared_at = 0.0

    async def _eval(self, script: str, name: str, *args: Any) -> Any:
        keys = self.coordination.keys.breaker(name)
        return await self.coordination.call(f"breaker_{script}", keys, *args)

    async def _shared(self, make: Callable[[], Awaitable[T]]) -> T | None:
        """The shared breaker's answer, or None (use the fallback) while Redis is away. After
        a failure Redis is not asked again for ``RETRY_SHARED_SECONDS``."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if time.monotonic() < self._retry_shared_at:
            return None
        try:
            # Bounded: a breaker is consulted before every guarded call, and a Redis that does
            # not answer must not hold those calls up (the client would retry for seconds).
            result = await asyncio.wait_for(make(), SHARED_TIMEOUT_SECONDS)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            if not self._degraded:
                log.warning(
                    "Redis unreachable: circuit breakers fall back to this process's own",
                    error=type(exc).__name__,
                )
            self._degraded = True
            self._retry_shared_at = time.monotonic() + RETRY_SHARED_SECONDS
            return None
        if self._degraded:
            log.info("Redis is back: circuit breakers are shared again")
            self._degraded = False
        return result

    async def acquire(self, name: str, config: BreakerConfig, probe: str) -> tuple[bool, float]:
        reply = await self._shared(
            lambda: self._eval(
                "acquire",
                name,
                int(config.wait_open * 1000),
                config.half_open_calls,
                probe,
                int(config.probe_lease * 1000),
                int(HALF_OPEN_FULL_RETRY * 1000),
            )
        )
        if reply is None:
            return await self.fallback.acquire(name, config, probe)
        allowed, as_probe, retry_ms = (int(x) for x in reply)
        return (True, float(as_probe)) if allowed else (False, retry_ms / 1000.0)

    async def record(
        self, name: str, config: BreakerConfig, *, probe: str | None, failed: bool, slow: bool
    ) -> None:
        reply = await self._shared(
            lambda: self._eval(
                "record",
                name,
                probe or "",
                int(failed),
                int(slow),
                config.window_type.value,
                config.window_size,
                config.minimum_calls,
                config.failure_rate,
                config.slow_call_rate,
                config.half_open_calls,
            )
        )
        if reply is None:
            await self.fallback.record(name, config, probe=probe, failed=failed, slow=slow)
        elif reply == "late":
            _late_probe(name, config)

    async def status(self, name: str, config: BreakerConfig) -> BreakerStatus:
        reply = await self._shared(
            lambda: self._eval(
                "status",
                name,
                config.window_type.value,
                config.window_size,
                int(config.wait_open * 1000),
            )
        )
        if reply is None:
            return await self.fallback.status(name, config)
        state, calls, failures, slow, retry_ms = reply
        calls, failures, slow = int(calls), int(failures), int(slow)
        enough = calls >= config.minimum_calls
        return BreakerStatus(
            name=name,
            state=BreakerState(state),
            calls=calls,
            failure_rate=100.0 * failures / calls if enough else None,
            slow_call_rate=100.0 * slow / calls if enough else None,
            retry_after=int(retry_ms) / 1000.0,
        )


class Breakers:
    """The breakers of a process: configured by name, shared where the backend allows."""

    def __init__(self, backend: BreakerBackend) -> None:
        self.backend = backend
        self.configs: dict[str, BreakerConfig] = {}

    def configure(self, name: str, config: BreakerConfig | None = None) -> None:
        self.configs[name] = config or BreakerConfig()

    def config(self, name: str) -> BreakerConfig:
        base = name.split("@", 1)[0]  # "payments@acme": the tenant's own "payments"
        return self.configs.get(name) or self.configs.get(base) or BreakerConfig()

    async def acquire(self, name: str) -> Permit:
        """Leave for one call, or ``CircuitOpenError`` with how long to wait."""
        probe = secrets.token_hex(8)  # the id of its slot, should it be let through as a probe
        allowed, detail = await self.backend.acquire(name, self.config(name), probe)
        if not allowed:
            raise CircuitOpenError(name, detail)
        return Permit(name=name, probe=probe if detail else None, started=time.monotonic())

    async def record(self, permit: Permit, *, failed: bool) -> None:
        config = self.config(permit.name)
        slow = time.monotonic() - permit.started >= config.slow_call_seconds
        await self.backend.record(permit.name, config, probe=permit.probe, failed=failed, slow=slow)

    async def call(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` under the breaker ``name`` (any call, not only steps)."""
        permit = await self.acquire(name)
        try:
            result = await fn()
        except Exception:
            await self.record(permit, failed=True)
            raise
        except BaseException:
            # Cancelled: not the dependency's failure, but a probe is answered all the same,
            # so that its slot is not held until its lease ends.
            if permit.probe:
                await self.record(permit, failed=True)
            raise
        await self.record(permit, failed=False)
        return result

    async def status(self, name: str) -> BreakerStatus:
        return await self.backend.status(name, self.config(name))


def open_breakers(coordination: Coordination) -> Breakers:
    """Circuit breakers shared through the backend when it is shared; this process's own
    otherwise (the embedded default)."""
    return Breakers(RedisBreakers(coordination) if coordination.shared else LocalBreakers())
