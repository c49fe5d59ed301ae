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

With the Redis queue the state lives in Redis and changes only through the scripts below, on
the Redis clock, so every process sees one breaker and the half-open probes are counted across
all of them. When Redis cannot be reached, each process falls back to a breaker of its own
(same rules, local clock), and says so in its log; it rejoins the shared one when Redis
answers again. On the embedded default the local breaker is the only one.
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

from tenantflow.errors import CircuitOpenError
from tenantflow.resilience.scripts import NOW_MS, Script

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
            raise ValueError("window size, minimum calls and half-open calls are at least 1")
        if not (0 < self.failure_rate <= 100 and 0 < self.slow_call_rate <= 100):
            raise ValueError("rates are percentages in (0, 100]")
        if not (0 < self.probe_timeout < math.inf):
            raise ValueError("the probe timeout is a positive number of seconds")

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

# KEYS[1] the breaker's hash: state, opened_at (ms), and while half-open the probes' answers
#         so far: probe_n (how many), probe_f (failed), probe_s (slow)
# KEYS[2] its window: a list of "f|s" outcomes (count-based) or a hash second -> "n|f|s"
#         (time-based)
# KEYS[3] the half-open probes in flight: a sorted set, member = probe id, score = the end of
#         its lease (ms); a lease that has ended frees its slot for the next caller
# Times are the Redis clock's. Each script is one atomic change of one breaker.
_COMMON = (
    NOW_MS
    + """
local function trips(calls, failures, slow, failure_rate, slow_rate)
  return (100 * failures / calls >= failure_rate) or (100 * slow / calls >= slow_rate)
end
-- window: {calls, failures, slow} of the sliding window, dropping what fell out of it
local function window(kind, size, now)
  local calls, failures, slow = 0, 0, 0
  if kind == 'count' then
    redis.call('LTRIM', KEYS[2], 0, size - 1)
    for _, v in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
      calls = calls + 1
      if string.sub(v, 1, 1) == '1' then failures = failures + 1 end
      if string.sub(v, 3, 3) == '1' then slow = slow + 1 end
    end
  else
    local oldest = math.floor(now / 1000) - size
    local all = redis.call('HGETALL', KEYS[2])
    for i = 1, #all, 2 do
      if tonumber(all[i]) <= oldest then
        redis.call('HDEL', KEYS[2], all[i])
      else
        local n, f, s = string.match(all[i + 1], '^(%d+)|(%d+)|(%d+)$')
        calls = calls + tonumber(n); failures = failures + tonumber(f); slow = slow + tonumber(s)
      end
    end
  end
  return calls, failures, slow
end
"""
)

# ARGV: wait_open_ms, half_open_calls, probe id, probe lease ms, retry ms when the half-open
# slots are taken. Returns {allowed (0/1), probe (0/1), retry_after_ms}.
ACQUIRE = Script(
    _COMMON
    + """
local now = now_ms()
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'open' then
  local waited = now - tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
  if waited < tonumber(ARGV[1]) then return {0, 0, tonumber(ARGV[1]) - waited} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_n', 0, 'probe_f', 0, 'probe_s', 0)
  redis.call('DEL', KEYS[3])
  state = 'half_open'
end
if state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)  -- the leases of lost probes end
  local answered = tonumber(redis.call('HGET', KEYS[1], 'probe_n') or '0')
  if answered + redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[2]) then
    return {0, 0, tonumber(ARGV[5])}
  end
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) + 1000)
  return {1, 1, 0}
end
return {1, 0, 0}
"""
)

# ARGV: probe id ('' for an ordinary call), failed, slow (0/1), window type, window size,
#       minimum calls, failure rate, slow rate, half-open calls. Returns the state after the
#       call, or 'late' for a probe that no longer held its lease (its answer is not counted).
RECORD = Script(
    _COMMON
    + """
local now = now_ms()
local probe, failed, slow = ARGV[1], ARGV[2], ARGV[3]
local kind, size, minimum = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local failure_rate, slow_rate, half = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if probe ~= '' then
  local lease_end = redis.call('ZSCORE', KEYS[3], probe)
  redis.call('ZREM', KEYS[3], probe)
  if state ~= 'half_open' or not lease_end or tonumber(lease_end) <= now then return 'late' end
  local n = redis.call('HINCRBY', KEYS[1], 'probe_n', 1)
  local f = redis.call('HINCRBY', KEYS[1], 'probe_f', tonumber(failed))
  local s = redis.call('HINCRBY', KEYS[1], 'probe_s', tonumber(slow))
  if n >= half then
    redis.call('DEL', KEYS[2], KEYS[3])
    if trips(n, f, s, failure_rate, slow_rate) then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
      return 'open'
    end
    redis.call('HSET', KEYS[1], 'state', 'closed')
    return 'closed'
  end
  return state
end
if state ~= 'closed' then return state end
if kind == 'count' then
  redis.call('LPUSH', KEYS[2], failed .. '|' .. slow)
else
  local second = tostring(math.floor(now / 1000))
  local cur = redis.call('HGET', KEYS[2], second) or '0|0|0'
  local n, f, s = string.match(cur, '^(%d+)|(%d+)|(%d+)$')
  redis.call('HSET', KEYS[2], second, (tonumber(n) + 1) .. '|' .. (tonumber(f) + tonumber(failed))
             .. '|' .. (tonumber(s) + tonumber(slow)))
  redis.call('PEXPIRE', KEYS[2], (size + 1) * 1000)
end
local calls, failures, slows = window(kind, size, now)
if calls >= minimum and trips(calls, failures, slows, failure_rate, slow_rate) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  redis.call('DEL', KEYS[2])
  return 'open'
end
return 'closed'
"""
)

# ARGV: window type, window size, wait_open_ms. Returns {state, calls, failures, slow,
# retry_after_ms}.
STATUS = Script(
    _COMMON
    + """
local now = now_ms()
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local calls, failures, slow = window(ARGV[1], tonumber(ARGV[2]), now)
local retry = 0
if state == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
  retry = math.max(0, tonumber(ARGV[3]) - (now - opened))
end
return {state, calls, failures, slow, retry}
"""
)


class RedisBreakers:
    """Breakers shared through Redis, with a local fallback while Redis is away."""

    def __init__(self, redis: Any, key_of: Callable[[str], tuple[str, str, str]]) -> None:
        self.redis = redis
        self.key_of = key_of
        self.fallback = LocalBreakers()
        self._degraded = False
        self._retry_shared_at = 0.0

    async def _eval(self, script: Script, name: str, *args: Any) -> Any:
        return await script(self.redis, self.key_of(name), *args)

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
                ACQUIRE,
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
                RECORD,
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
                STATUS,
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
