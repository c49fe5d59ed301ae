"""The coordination backend, in-process and on the real Redis: locks held by one token until
released or their lease ends, pub/sub within and across processes' clients, rate limits, and
scripts the server lost loaded again, for a single call and for a round trip of several."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator

import pytest

from tenantflow.coordination import SCRIPTS, Coordination, LocalCoordination
from tenantflow.coordination.redis import Commands, RedisCoordination, send
from tenantflow.errors import ConfigError
from tenantflow.queue.lua import SCRIPTS as QUEUE_SCRIPTS
from tests.conftest import REDIS_URL


async def _redis_coordination() -> RedisCoordination:
    return RedisCoordination(REDIS_URL, prefix=f"tftest{uuid.uuid4().hex[:10]}", timeout=2.0)


async def _cleanup(coordination: RedisCoordination) -> None:
    client = coordination.redis
    keys = [k async for k in client.scan_iter(match=f"{coordination.keys.prefix}:*")]
    if keys:
        await client.delete(*keys)
    await coordination.close()


@pytest.fixture(params=["local", "redis"])
async def coordination(request: pytest.FixtureRequest) -> AsyncIterator[Coordination]:
    if request.param == "local":
        yield LocalCoordination()
        return
    shared = await _redis_coordination()
    try:
        yield shared
    finally:
        await _cleanup(shared)


@pytest.fixture
async def redis_coordination() -> AsyncIterator[RedisCoordination]:
    shared = await _redis_coordination()
    try:
        yield shared
    finally:
        await _cleanup(shared)


async def test_a_lock_is_its_holders_until_released_or_its_lease_ends(
    coordination: Coordination,
) -> None:
    a, b = coordination.lock("reconciler", 0.3), coordination.lock("reconciler", 0.3)
    assert a.token != b.token
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.acquire()  # the holder renews it
    assert not await b.extend()  # only the holder extends
    assert not await b.release()  # nor releases
    assert await a.extend()
    assert not await b.acquire()
    await asyncio.sleep(0.4)  # the lease ends
    assert not await a.extend()
    assert await b.acquire()
    assert not await a.release()
    assert not await a.acquire()
    assert await b.release()
    assert await a.acquire()
    other = coordination.lock("another", 0.3)
    assert await other.acquire()  # locks of other names are apart


async def test_a_lock_whose_lease_ended_is_taken_by_the_next(coordination: Coordination) -> None:
    first, second = coordination.lock("sweep", 0.2), coordination.lock("sweep", 5)
    assert await first.acquire()
    started = time.monotonic()
    while not await second.acquire():
        await asyncio.sleep(0.02)
    assert 0.15 <= time.monotonic() - started < 1.0
    assert not await first.acquire()


async def _collect(subscription: AsyncIterable[str], n: int) -> list[str]:
    got = []
    async for message in subscription:
        got.append(message)
        if len(got) == n:
            break
    return got


async def test_subscribers_get_what_is_published_after_they_subscribed(
    coordination: Coordination,
) -> None:
    await coordination.publish("news", "before anyone listened")
    async with (
        coordination.subscribe("news") as first,
        coordination.subscribe("news") as second,
        coordination.subscribe("other") as elsewhere,
    ):
        await coordination.publish("news", "one")
        await asyncio.to_thread(coordination.publish_blocking, "news", "two")
        await coordination.publish("other", "apart")
        for sub in (first, second):
            assert await asyncio.wait_for(_collect(sub, 2), 5) == ["one", "two"]
        assert await asyncio.wait_for(_collect(elsewhere, 1), 5) == ["apart"]


async def test_a_redis_subscription_proves_itself_live_and_a_local_one_never(
    coordination: Coordination,
) -> None:
    async with coordination.subscribe("news") as sub:
        assert sub.proven == -math.inf
        listening = asyncio.ensure_future(_collect(sub, 1))
        await asyncio.sleep(0.5)
        if coordination.shared:
            assert time.monotonic() - sub.proven < 0.45
        else:  # messages of other processes never reach it: nothing is proven
            assert sub.proven == -math.inf
        await coordination.publish("news", "done")
        assert await asyncio.wait_for(listening, 5) == ["done"]


async def test_a_rate_limit_lets_a_burst_through_then_says_how_long_to_wait(
    coordination: Coordination,
) -> None:
    key = coordination.keys.rate("acme")
    assert await coordination.rate(key, 10, 2) is None
    assert await coordination.rate(key, 10, 2) is None
    wait = await coordination.rate(key, 10, 2)
    assert wait is not None and 0 < wait <= 0.1
    assert await coordination.rate(coordination.keys.rate("globex"), 10, 2) is None
    await asyncio.sleep(wait + 0.01)
    assert await coordination.rate(key, 10, 2) is None


async def test_in_process_state_has_no_scripts() -> None:
    with pytest.raises(ConfigError, match="needs Redis"):
        await LocalCoordination().call("lock_acquire", ["k"], "t", 1000)


async def test_a_script_the_server_lost_is_loaded_again(
    redis_coordination: RedisCoordination,
) -> None:
    lock = redis_coordination.lock("flushed", 5)
    await redis_coordination.redis.script_flush()
    assert await lock.acquire()
    await redis_coordination.redis.script_flush()
    assert await lock.extend()
    assert await redis_coordination.redis.script_exists(SCRIPTS["lock_extend"].sha) == [True]


async def test_a_round_trip_of_scripts_the_server_lost_is_sent_again(
    redis_coordination: RedisCoordination,
) -> None:
    """A round trip of several scripts (as the queue sends them) and a plain command: the
    scripts are loaded and the round trip is sent again, once."""
    key = redis_coordination.keys.lock("piped")
    commands = Commands()
    commands.script(SCRIPTS["lock_acquire"], [key], ["a", 5000])
    commands.script(SCRIPTS["lock_release"], [key], ["b"])
    commands.lpush(redis_coordination.keys.channel("seen"), "x")
    await redis_coordination.redis.script_flush()
    # The plain command ran in the refused round trip too: it pushed twice.
    assert await send(redis_coordination.redis, commands) == [1, 0, 2]
    assert await redis_coordination.redis.get(key) == "a"
    exists = await redis_coordination.redis.script_exists(
        *(s.sha for s in commands.scripts.values())
    )
    assert exists == [True, True]


async def test_every_script_compiles_under_its_sha(redis_coordination: RedisCoordination) -> None:
    """Each script, whole (the prelude, its includes, its file), is valid Lua whose SHA is
    the one it is called by."""
    client = redis_coordination.redis
    for library in (SCRIPTS, QUEUE_SCRIPTS):
        names = library.names()
        assert names
        for name in names:
            assert await client.script_load(library[name].source) == library[name].sha, name
