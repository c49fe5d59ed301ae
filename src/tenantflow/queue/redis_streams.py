"""The production queue: Redis Streams, one stream per tenant, a consumer group per stream.

See ``keys`` for the layout and ``lua`` (``queue/lua/*.lua``) for the scripts. A tenant is in
the ready set while it has messages to deliver; one script call serves the tenants at its front,
each up to its share of the free slots (weighted round robin on a pass per tenant), so one
tenant's flood cannot starve another, and a dequeue costs the same however many tenants exist or
were active. The per-tenant cap on messages in flight counts the group's pending entries, so it
holds across all workers.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import structlog

from tenantflow._extras import require
from tenantflow.coordination.redis import Commands, RedisCoordination, send
from tenantflow.coordination.scripts import SCRIPTS as LOCKS
from tenantflow.errors import NotFoundError
from tenantflow.queue.base import Envelope, Epoch, Message
from tenantflow.queue.dispatch_calls import Call, DispatchCalls, messages_of
from tenantflow.queue.keys import GROUP, Keys
from tenantflow.queue.lua import SCRIPTS
from tenantflow.queue.redis_inspect import Inspection

try:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError:
    require("redis", "the Redis Streams queue")  # the one line a user can act on
    raise

log = structlog.get_logger(__name__)

DEAD_LETTERS_MAX = 100_000
# Tenants a dequeue may look at beyond its free slots: skipped (paused) ones or ones at their
# cap move behind, so this bounds a call's work, not who gets served.
DISPATCH_LOOK = 16
WAKE_TRIM_SECONDS = 1.0
TELL_REREAD_SECONDS = 10.0  # caps and weights: how often the shared hashes are read back
BLOCK_MAX_SECONDS = 30.0  # the longest one blocking wait for a wake-up token
WAKE_TOKENS_MAX = 256  # tokens left while every worker is busy cost one spare dequeue each


class RedisStreamsQueue(Inspection):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tf",
        max_deliveries: int = 10,
        tenant_max_inflight: int = 0,
        timeout: float = 5.0,
    ) -> None:
        import redis.asyncio as redis

        # Every command has a deadline: a Redis that hangs (frozen, a network partition) is
        # an error to retry, not a worker stuck forever.
        self.redis: Any = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._url = url
        self.keys = Keys(prefix)
        self.max_deliveries = max_deliveries
        self.tenant_max_inflight = tenant_max_inflight
        # What this process last wrote to the caps and weights hashes (None: not read yet).
        self._told: dict[str, dict[str, int] | None] = dict.fromkeys(
            (self.keys.caps, self.keys.weights)
        )
        self._told_from: dict[str, Mapping[str, int] | None] = {}
        self._told_at = time.monotonic()
        self._adopted = False
        self._next_look: float | None = None  # monotonic time of the next look due
        self._epoch: str | None = None  # the data set this process last saw
        self._trimmed = -math.inf
        # Dispatch calls, per consumer: those whose replies with deliveries arrived (their
        # kept copies are dropped by the next call), and those whose replies did not, with
        # until when to ask for them (see ``queue/lua/dispatch.lua``).
        self._calls = DispatchCalls()
        # Blocking waits get a client (and connections) of their own; each wait has its own
        # deadline (its block time plus the command timeout), set around the call.
        self._timeout = timeout
        self._blocking: Any = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=timeout
        )

    # -- producing ---------------------------------------------------------------------------

    async def enqueue(
        self,
        tenant_id: str,
        run_id: str,
        *,
        delay: float = 0.0,
        priority: int = 0,
        trace: str | None = None,
    ) -> str:
        keys = self.keys.queue(tenant_id)
        delay_ms = max(0, int(delay * 1000))

        # One round trip: the script, the wake-up.
        def build(pipe: Commands) -> None:
            self._eval(pipe, "enqueue", keys, [tenant_id, run_id, priority, trace or "", delay_ms])
            if delay_ms == 0:
                self._wake(pipe, tenant_id)

        ready_at = (await self._execute(build))[0]
        return f"{tenant_id}:{run_id}:{ready_at}"

    async def enqueue_many(self, batch: Mapping[str, Sequence[Envelope]]) -> None:
        batch = {tenant: runs for tenant, runs in batch.items() if runs}
        if not batch:
            return

        now = time.monotonic()
        trim = now - self._trimmed > WAKE_TRIM_SECONDS

        # One round trip for the whole batch: per tenant one script call, and one wake-up
        # token per message ready now (up to the cap), so as many idle workers wake as there
        # is work.
        def build(pipe: Commands) -> None:
            tokens: list[str] = []
            for tenant, runs in batch.items():
                args: list[Any] = [tenant]
                for e in runs:
                    delay_ms = max(0, int(e.delay * 1000))
                    args.extend((e.run_id, e.priority, e.trace or "", delay_ms))
                    if delay_ms == 0:
                        tokens.append(tenant)
                self._eval(pipe, "enqueue", self.keys.queue(tenant), args)
            if tokens:
                pipe.lpush(self.keys.wake, *tokens[:WAKE_TOKENS_MAX])
            if trim:  # tokens nobody took (every worker busy) are capped
                pipe.ltrim(self.keys.wake, 0, WAKE_TOKENS_MAX - 1)

        await self._execute(build)
        if trim:
            self._trimmed = now

    def _wake(self, pipe: Commands, tenant_id: str) -> None:
        pipe.lpush(self.keys.wake, tenant_id)
        pipe.ltrim(self.keys.wake, 0, WAKE_TOKENS_MAX - 1)

    # -- scripts -----------------------------------------------------------------------------

    def _eval(self, pipe: Commands, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.script(SCRIPTS[name], keys, args)

    async def _execute(self, build: Callable[[Commands], None], *, client: Any = None) -> list[Any]:
        """Send the commands ``build`` adds in one round trip, and return their replies
        (scripts by SHA, loaded again if the server lost them: ``coordination.redis.send``)."""
        commands = Commands()
        build(commands)
        return await send(client or self.redis, commands)

    # -- consuming ---------------------------------------------------------------------------

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
        return await self._dequeue(
            consumer, max_messages, visibility_timeout, weights, caps, skip, wait=None
        )

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
        """``wait`` then ``dequeue``, in one round trip: the dispatch script is pipelined behind
        the blocking wait, and Redis runs it the moment a wake-up token (or the timeout)
        unblocks it. The wait ends no later than the next look due (a delayed message, a
        lease that may lapse), so those are taken on time too."""
        if max_messages <= 0:
            await self.wait(timeout)
            return []
        if self._next_look is not None:
            timeout = min(timeout, self._next_look - time.monotonic())
        return await self._dequeue(
            consumer, max_messages, visibility_timeout, weights, caps, skip, wait=timeout
        )

    async def _tell(self, pipe: Commands, key: str, wanted: Mapping[str, int] | None) -> None:
        """Bring a shared hash (caps, weights) to ``wanted``, writing only what changed since
        this process last wrote it; the dispatch script reads the tenants it serves from it.
        Read back now and then: another process's differing view must not stand for good."""
        if time.monotonic() - self._told_at > TELL_REREAD_SECONDS:
            self._told = dict.fromkeys(self._told)
            self._told_at = time.monotonic()
        if self._told_from.get(key, {}) is wanted and self._told[key] is not None:
            return
        told = self._told[key]
        if told is None:  # what other processes wrote before us
            raw = await self.redis.hgetall(key)
            told = {t: int(v) for t, v in raw.items()}
        given, wanted = wanted, wanted or {}
        changed = {t: v for t, v in wanted.items() if told.get(t) != v}
        gone = [t for t in told if t not in wanted]
        if changed:
            pipe.hset(key, changed)
        if gone:
            pipe.hdel(key, gone)
        self._told[key] = dict(wanted)
        self._told_from[key] = given

    async def _dequeue(
        self,
        consumer: str,
        max_messages: int,
        visibility_timeout: float,
        weights: Mapping[str, int] | None,
        caps: Mapping[str, int] | None,
        skip: Collection[str],
        *,
        wait: float | None,
    ) -> list[Message]:
        if max_messages <= 0:
            return []
        told = await self._prepare(caps, weights)
        min_idle = max(1, int(visibility_timeout * 1000))
        block = 0.0 if wait is None else min(max(wait, 0.001), BLOCK_MAX_SECONDS)
        call = self._calls.begin(consumer, visibility_timeout)

        def build(pipe: Commands) -> None:
            if wait is not None:
                pipe.blpop(self.keys.wake, block)
            pipe.sent.extend(told.sent)
            self._eval(
                pipe,
                "dispatch",
                [self.keys.ready, self.keys.due, self.keys.caps, self.keys.weights],
                [
                    self.keys.prefix,
                    GROUP,
                    consumer,
                    max_messages,
                    min_idle,
                    self.max_deliveries,
                    self.tenant_max_inflight,
                    DEAD_LETTERS_MAX,
                    DISPATCH_LOOK,
                    call.id,
                    len(call.answered),
                    *call.answered,
                    len(call.asked),
                    *call.asked,
                    *skip,
                ],
            )

        try:
            replies = await self._send_dispatch(build, wait, block)
        except BaseException:
            self._unreplied(consumer, call)
            raise
        if replies is None:  # Redis away while waiting: behaved as a poll
            self._unreplied(consumer, call)
            return []
        now_ms, next_ms, *flat = replies[-1]
        self._calls.replied(consumer, call, delivered=bool(flat))
        self._next_look = (
            None if int(next_ms) < 0 else time.monotonic() + (int(next_ms) - int(now_ms)) / 1000
        )
        return messages_of(consumer, flat)

    async def _prepare(
        self, caps: Mapping[str, int] | None, weights: Mapping[str, int] | None
    ) -> Commands:
        """The commands a dispatch call sends first: the caps and weights that changed (the
        stream's adoption into the ready set, once per process, goes at once)."""
        if not self._adopted:
            await self._execute(
                lambda pipe: self._eval(pipe, "adopt", [self.keys.active, self.keys.due], [])
            )
            self._adopted = True
        told = Commands()
        await self._tell(told, self.keys.caps, caps)
        await self._tell(told, self.keys.weights, weights)
        return told

    async def _send_dispatch(
        self, build: Callable[[Commands], None], wait: float | None, block: float
    ) -> list[Any] | None:
        """The dispatch call's round trip; with ``wait``, on the blocking client, and None if
        Redis did not answer in time (after sleeping ``wait``, as a poll would)."""
        if wait is None:
            return await self._execute(build)
        try:
            # On the deadline the call is cancelled and redis-py drops its connection.
            async with asyncio.timeout(block + self._timeout):
                return await self._execute(build, client=self._blocking)
        except (RedisConnectionError, RedisTimeoutError, TimeoutError) as exc:
            # Redis away: behave as a poll. (A script's error goes to the caller, whose retries
            # back off.)
            log.warning("queue wake-up wait failed", error=type(exc).__name__)
            await asyncio.sleep(wait)
            return None

    def _unreplied(self, consumer: str, call: Call) -> None:
        """A dispatch call without its reply: whether it ran, and what it wrote, is unknown."""
        self._told = dict.fromkeys(self._told)
        self._calls.unreplied(consumer, call)

    @staticmethod
    def _receipt(message: Message) -> tuple[str, str]:
        consumer, _, count = message.receipt.rpartition("|")
        return consumer, count

    async def extend(self, messages: Sequence[Message], visibility_timeout: float) -> None:
        await self._per_tenant("extend", messages)

    async def ack(self, messages: Sequence[Message]) -> None:
        await self._per_tenant("ack", messages)

    async def _per_tenant(self, script: str, messages: Sequence[Message]) -> None:
        """One script call per tenant for a batch of deliveries, all in one round trip."""
        if not messages:
            return

        def build(pipe: Commands) -> None:
            for tenant, group in _by_tenant(messages).items():
                args: list[Any] = [GROUP, self._receipt(group[0])[0]]
                for m in group:
                    args.extend((m.id, self._receipt(m)[1]))
                self._eval(pipe, script, self.keys.queue(tenant), args)

        await self._execute(build)

    async def retry_later(
        self, message: Message, delay: float, *, count_delivery: bool = True
    ) -> None:
        consumer, count = self._receipt(message)
        delay_ms = max(0, int(delay * 1000))

        def build(pipe: Commands) -> None:
            self._eval(
                pipe,
                "retry_later",
                self.keys.queue(message.tenant_id),
                [
                    message.tenant_id,
                    GROUP,
                    consumer,
                    message.id,
                    count,
                    delay_ms,
                    "1" if count_delivery else "0",
                    message.run_id,
                    message.priority,
                    message.deliveries,
                    message.trace or "",
                ],
            )
            if delay_ms == 0:
                self._wake(pipe, message.tenant_id)

        await self._execute(build)

    # -- dead letters, inspection ------------------------------------------------------------

    async def dead_letter(self, message: Message, reason: str) -> None:
        consumer, count = self._receipt(message)
        await self._execute(
            lambda pipe: self._eval(
                pipe,
                "dead_letter",
                self.keys.queue(message.tenant_id),
                [GROUP, consumer, message.id, count, reason, DEAD_LETTERS_MAX],
            )
        )

    async def replay_dead_letter(self, tenant_id: str, dead_letter_id: str) -> None:
        def build(pipe: Commands) -> None:
            self._eval(pipe, "replay", self.keys.queue(tenant_id), [tenant_id, dead_letter_id])
            self._wake(pipe, tenant_id)

        try:
            done = (await self._execute(build))[0]
        except Exception as exc:  # a malformed id is a missing one
            if "Invalid stream ID" in str(exc):
                done = 0
            else:
                raise
        if not done:
            raise NotFoundError(f"no dead letter {dead_letter_id} in this tenant")

    async def purge(self, tenant_id: str) -> None:
        keys = self.keys.tenant(tenant_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*keys.all(), self.keys.rate(tenant_id))
            for key in (self.keys.ready, self.keys.due, self.keys.active):
                pipe.zrem(key, tenant_id)
            await pipe.execute()

    # -- coordination ------------------------------------------------------------------------

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take (or keep, if ``owner`` holds it) a lock that expires after ``ttl`` seconds."""
        (reply,) = await self._execute(
            lambda pipe: pipe.script(
                LOCKS["lock_acquire"], [self.keys.lock(name)], [owner, int(ttl * 1000)]
            )
        )
        return int(reply) == 1

    async def wait(self, timeout: float) -> None:
        """Block until a wake-up token arrives (or ``timeout``). Each enqueue pushes one token
        and each token wakes one idle worker, not all of them."""
        try:
            block = min(max(timeout, 0.001), BLOCK_MAX_SECONDS)
            # On the deadline the call is cancelled and redis-py drops its connection.
            async with asyncio.timeout(block + self._timeout):
                await self._blocking.blpop([self.keys.wake], timeout=block)
        except Exception as exc:  # Redis away: behave as a poll
            log.warning("queue wake-up wait failed", error=type(exc).__name__)
            await asyncio.sleep(timeout)

    async def epoch(self) -> Epoch:
        (reply,) = await self._execute(
            lambda pipe: self._eval(pipe, "epoch", [self.keys.epoch], [secrets.token_hex(8)])
        )
        epoch = Epoch(reply[0], new=bool(int(reply[1])))
        if epoch.id != self._epoch:
            # Another data set: what this process wrote to the last one is not in it.
            self._told = dict.fromkeys(self._told)
            self._next_look = None
            self._epoch = epoch.id
        return epoch

    def coordination(self) -> RedisCoordination:
        return RedisCoordination(
            self._url, prefix=self.keys.prefix, timeout=self._timeout, client=self.redis
        )

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self._blocking.aclose()
        await self.redis.aclose()


def _by_tenant(messages: Sequence[Message]) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = {}
    for m in messages:
        out.setdefault(m.tenant_id, []).append(m)
    return out
