"""Coordination through Redis: every process of the installation sees one state.

Scripts are called by SHA, alone (``RedisCoordination.call``) or among the commands of one
round trip (``send``, which the queue uses for its pipelines); when the server no longer has
a script (a restart, ``SCRIPT FLUSH``), ``send`` sends the round trip again with the scripts
in full: the one place where that happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from tenantflow._extras import require
from tenantflow.coordination.base import PING_SECONDS
from tenantflow.coordination.keys import CoordinationKeys
from tenantflow.coordination.scripts import SCRIPTS, Script

try:
    import redis as sync_redis
    import redis.asyncio as aredis
    from redis.exceptions import NoScriptError, ResponseError
except ImportError:
    require("redis", "the Redis coordination backend")  # the one line a user can act on
    raise

CLOSE_SECONDS = 2.0  # a Redis that does not answer does not hold up a shutdown


class Commands:
    """Commands to send in one round trip (see ``send``)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.scripts: dict[str, Script] = {}

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
        self.scripts[script.sha] = script
        self.sent.append(("EVALSHA", script.sha, len(keys), *keys, *args))

    def hset(self, key: str, mapping: Mapping[str, int]) -> None:
        self.sent.append(("HSET", key, *(item for pair in mapping.items() for item in pair)))

    def hdel(self, key: str, fields: Sequence[str]) -> None:
        self.sent.append(("HDEL", key, *fields))

    def lpush(self, key: str, *values: str) -> None:
        self.sent.append(("LPUSH", key, *values))

    def ltrim(self, key: str, start: int, end: int) -> None:
        self.sent.append(("LTRIM", key, start, end))

    def blpop(self, key: str, timeout: float) -> None:
        self.sent.append(("BLPOP", key, timeout))


async def send(client: Any, commands: Commands) -> list[Any]:
    """The replies of ``commands``, sent in one round trip; if the server lost a script of
    theirs, the round trip is sent again with the scripts in full (EVAL, which also caches
    them on the server again). The commands that were not refused ran the first time too,
    and run twice: wake-up tokens and hash writes tolerate it, and a flushed cache refuses
    every script of the round trip."""
    try:
        return await round_trip(client, commands.sent)
    except NoScriptError:
        full = [_in_full(command, commands.scripts) for command in commands.sent]
    return await round_trip(client, full)


def _in_full(command: tuple[Any, ...], scripts: Mapping[str, Script]) -> tuple[Any, ...]:
    if command[0] == "EVALSHA" and command[1] in scripts:
        return ("EVAL", scripts[command[1]].source, *command[2:])
    return command


async def round_trip(client: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """The commands in one write, their replies in order (raw: no redis-py reply callbacks).

    On a pooled connection of ``client`` directly, not through redis-py's pipeline, whose
    bookkeeping costs a fifth to a quarter of the CPU of a round trip on the queue's hot path.
    Every reply is read before an error reply is raised, so the connection stays in step; a
    connection that fails or whose wait is cancelled is closed (redis-py closes it too), never
    given back with replies left unread on it. No retry, as with the pipeline (the client has
    no retry configured): the commands may have run, and not every script may run twice (a
    dequeue would strand the messages it took); the callers decide."""
    packed = None
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        packed = conn.pack_commands(commands)
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # read whole: the rest still follows
                replies.append(exc)
    except BaseException:
        if packed is not None:  # sent, or on its way: the connection's state is unknown
            await conn.disconnect()
        raise
    finally:
        # Shielded, as redis-py's pipeline does: a cancellation while the pool's lock is
        # taken must not leave the connection counted in use for good.
        await asyncio.shield(pool.release(conn))
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


class RedisCoordination:
    """Opened from a Redis URL; the Redis queue's shares the queue's client (its pool of
    connections, warm for the first call of a breaker, which has a quarter of a second)."""

    shared = True

    def __init__(
        self, url: str, *, prefix: str = "tf", timeout: float = 5.0, client: Any = None
    ) -> None:
        """``client``: a redis-py asyncio client of ``url`` (decoding responses) to share,
        closed by its owner; by default one of its own."""
        self.url = url
        self.timeout = timeout
        self.keys = CoordinationKeys(prefix)
        self._owns_client = client is None
        # Every command has a deadline: a Redis that hangs is an error, not a caller stuck.
        self.redis: Any = client or aredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._blocking: sync_redis.Redis | None = None
        self._blocking_made = threading.Lock()

    async def call(self, script: str, keys: Sequence[str], *args: Any) -> Any:
        commands = Commands()
        commands.script(SCRIPTS[script], keys, args)
        return (await send(self.redis, commands))[0]

    def lock(self, name: str, ttl: float) -> RedisLock:
        return RedisLock(self, name, secrets.token_hex(8), ttl)

    async def rate(self, key: str, rate: float, burst: int) -> float | None:
        interval = 1000.0 / rate
        reply = await self.call("rate_limit", [key], repr(interval), repr(interval * (burst - 1)))
        return None if reply == "ok" else float(reply) / 1000.0

    async def publish(self, channel: str, message: str) -> None:
        await self.redis.publish(self.keys.channel(channel), message)

    def publish_blocking(self, channel: str, message: str) -> None:
        with self._blocking_made:
            if self._blocking is None:
                self._blocking = sync_redis.Redis.from_url(
                    self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
                )
        self._blocking.publish(self.keys.channel(channel), message)

    def subscribe(self, channel: str) -> RedisSubscription:
        return RedisSubscription(self, self.keys.channel(channel))

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
        if self._blocking is not None:
            await asyncio.to_thread(self._blocking.close)


@dataclass
class RedisLock:
    owner: RedisCoordination = field(repr=False)
    name: str
    token: str
    ttl: float

    async def _script(self, script: str, *args: Any) -> bool:
        key = self.owner.keys.lock(self.name)
        return int(await self.owner.call(script, [key], self.token, *args)) == 1

    async def acquire(self) -> bool:
        return await self._script("lock_acquire", int(self.ttl * 1000))

    async def extend(self) -> bool:
        return await self._script("lock_extend", int(self.ttl * 1000))

    async def release(self) -> bool:
        return await self._script("lock_release")


class RedisSubscription:
    """A subscription on a connection of its own, proven live by a PING on it every
    ``PING_SECONDS``: Redis answers a PING on a subscribed connection after every message
    published before it."""

    def __init__(self, owner: RedisCoordination, channel: str) -> None:
        # Answers as bytes: redis-py mis-parses a PONG on a subscribed connection that decodes
        # responses.
        self._client: Any = aredis.Redis.from_url(owner.url, socket_connect_timeout=owner.timeout)
        self._timeout = owner.timeout
        self.channel = channel
        self._pubsub: Any = None
        self._proven = -math.inf

    @property
    def proven(self) -> float:
        return self._proven

    async def __aenter__(self) -> Self:
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(self.channel)
        # Subscribed once the server says so: a message published after this returns arrives.
        async with asyncio.timeout(self._timeout):
            while True:
                message = await self._pubsub.get_message(timeout=self._timeout)
                if message is not None and message.get("type") == "subscribe":
                    break
        return self  # proven by the first PING's answer, once iterating

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await asyncio.wait_for(self._pubsub.aclose(), CLOSE_SECONDS)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.aclose(), CLOSE_SECONDS)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str]:
        pubsub = self._pubsub
        assert pubsub is not None, "iterate a subscription inside its `async with`"
        sent: dict[int, float] = {}
        seq = 0
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if now >= next_ping:
                seq += 1
                sent[seq] = now
                sent.pop(seq - 50, None)  # an unanswered PING is not waited for for ever
                await pubsub.ping(str(seq))
                next_ping = now + PING_SECONDS
            message = await pubsub.get_message(timeout=max(0.0, next_ping - time.monotonic()))
            if message is None:
                continue
            data = message.get("data")
            text = data.decode() if isinstance(data, bytes) else str(data)
            if message.get("type") == "pong":
                if text.isdigit() and int(text) in sent:
                    self._proven = max(self._proven, sent.pop(int(text)))
            elif message.get("type") == "message":
                yield text
