"""Semantics of the queue (see tenantflow.queue.base), against the embedded queue and Redis
Streams alike."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tenantflow.errors import NotFoundError
from tenantflow.queue.base import Envelope, Queue
from tenantflow.queue.keys import GROUP
from tenantflow.queue.redis_streams import RedisStreamsQueue
from tenantflow.queue.sqlite import SqliteQueue
from tests.conftest import REDIS_URL
from tests.fault.proxy import FaultProxy

QueueFactory = Callable[..., Queue]


@pytest.fixture(params=["sqlite", "redis"])
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    prefix = f"tftest{uuid.uuid4().hex[:10]}"
    made: list[Queue] = []

    def make(*, max_deliveries: int = 10, tenant_max_inflight: int = 0) -> Queue:
        queue: Queue
        if request.param == "sqlite":
            queue = SqliteQueue(
                tmp_path / "queue.db",
                max_deliveries=max_deliveries,
                tenant_max_inflight=tenant_max_inflight,
            )
        else:
            queue = RedisStreamsQueue(
                REDIS_URL,
                prefix=prefix,
                max_deliveries=max_deliveries,
                tenant_max_inflight=tenant_max_inflight,
            )
        made.append(queue)
        return queue

    yield make
    if request.param == "redis":
        client = RedisStreamsQueue(REDIS_URL, prefix=prefix).redis
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    for queue in made:
        await queue.close()


@pytest.fixture
def queue(make_queue: QueueFactory) -> Queue:
    return make_queue(max_deliveries=3)


async def test_delay_and_priority(queue: Queue) -> None:
    await queue.enqueue("t", "first")
    await queue.enqueue("t", "second")
    await queue.enqueue("t", "later", delay=0.3)
    got = await queue.dequeue("c", 10, 30)
    assert [m.run_id for m in got] == ["first", "second"]
    await asyncio.sleep(0.35)
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["later"]


async def test_priority_on_the_embedded_queue(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.db")
    await queue.enqueue("t", "low")
    await queue.enqueue("t", "high", priority=5)
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["high", "low"]
    await queue.close()


async def test_lease_hides_a_message_until_it_expires(queue: Queue) -> None:
    await queue.enqueue("t", "r1")
    (first,) = await queue.dequeue("a", 10, 0.2)
    assert await queue.dequeue("b", 10, 0.2) == []
    await asyncio.sleep(0.25)
    (again,) = await queue.dequeue("b", 10, 0.2)  # reclaimed after the lease expired
    assert again.id == first.id and again.deliveries == 2
    await queue.ack([first])  # a late ack from the first consumer changes nothing
    assert await queue.depth("t") == 1
    assert await queue.live("t", ["r1", "other"]) == {"r1"}
    await queue.ack([again])
    assert await queue.depth("t") == 0
    assert await queue.live("t", ["r1"]) == set()


async def test_extend_keeps_the_lease(queue: Queue) -> None:
    await queue.enqueue("t", "r1")
    (msg,) = await queue.dequeue("a", 10, 0.2)
    for _ in range(3):
        await asyncio.sleep(0.1)
        await queue.extend([msg], 0.2)
    assert await queue.dequeue("b", 10, 0.2) == []


async def test_stats_of_many_tenants_in_one_call(queue: Queue) -> None:
    """What the health survey reads: each tenant's depth (ready, delayed and in flight), dead
    letters and oldest message, for 600 tenants at once (more than one pipelined batch)."""
    await queue.enqueue("poison", "p")
    for _ in range(3):  # max_deliveries 3
        (taken,) = await queue.dequeue("c", 10, 30)
        await queue.retry_later(taken, 0)
    assert await queue.dequeue("c", 10, 30) == []  # dead-lettered as it came up again
    tenants = ["poison", *(f"t{i}" for i in range(600))]
    await queue.enqueue_many({t: [Envelope(f"{t}-run")] for t in tenants[1:301]})
    await queue.enqueue("t0", "later", delay=60)
    assert len(await queue.dequeue("c", 100, 30)) == 100  # in flight: still counted
    found = await queue.stats_many(tenants)
    assert set(found) == set(tenants)
    assert found["poison"].dead_letters == 1 and found["poison"].depth == 0
    assert found["t0"].depth == 2 and found["t0"].oldest_at is not None
    assert sum(s.depth for s in found.values()) == 301
    assert all(s.depth == 0 and s.oldest_at is None for s in (found[t] for t in tenants[301:]))
    for tenant in ("poison", "t0", "t599"):
        assert found[tenant] == await queue.stats(tenant)


async def test_retry_later_and_dead_letter_after_max_deliveries(queue: Queue) -> None:
    await queue.enqueue("t", "poison")
    for delivery in range(1, 4):
        (msg,) = await queue.dequeue("c", 10, 30)
        assert msg.deliveries == delivery
        await queue.retry_later(msg, 0)
    assert await queue.dequeue("c", 10, 30) == []  # third failure: dead-lettered
    (dead,) = await queue.dead_letters("t")
    assert dead.run_id == "poison" and dead.deliveries == 3
    assert dead.reason == "delivered 3 times without being acknowledged"
    assert not dead.parked and await queue.live("t", ["poison"]) == set()  # a record, no hold
    assert await queue.dead_letters("other") == []
    with pytest.raises(NotFoundError):
        await queue.replay_dead_letter("other", dead.id)  # not another tenant's
    await queue.replay_dead_letter("t", dead.id)
    (replayed,) = await queue.dequeue("c", 10, 30)
    assert replayed.run_id == "poison" and replayed.deliveries == 1


async def test_a_message_redelivered_too_often_is_dead_lettered(queue: Queue) -> None:
    await queue.enqueue("t", "crashes-its-worker")
    for _ in range(3):  # each consumer dies holding it: its lease just runs out
        assert len(await queue.dequeue("c", 10, 0.05)) == 1
        await asyncio.sleep(0.08)
    assert await queue.dequeue("c", 10, 0.05) == []
    (dead,) = await queue.dead_letters("t")
    assert dead.run_id == "crashes-its-worker"
    assert dead.reason == "delivered 3 times without being acknowledged"


async def test_a_parked_dead_letter_holds_its_run_until_replayed(queue: Queue) -> None:
    await queue.enqueue("t", "unknown-workflow")
    (first,) = await queue.dequeue("c", 10, 0.05)
    await asyncio.sleep(0.08)  # its lease ends: the next delivery is the current one
    (second,) = await queue.dequeue("c", 10, 0.05)
    await queue.dead_letter(first, "stale: not the current delivery")  # changes nothing
    assert await queue.dead_letters("t") == []
    await queue.dead_letter(second, "no worker knows it")
    (dead,) = await queue.dead_letters("t")
    assert (dead.run_id, dead.deliveries, dead.reason, dead.parked) == (
        "unknown-workflow",
        2,
        "no worker knows it",
        True,
    )
    assert await queue.dequeue("c", 10, 30) == []
    # Parked: the reconciler finds the run live, and leaves it alone.
    assert await queue.live("t", ["unknown-workflow"]) == {"unknown-workflow"}
    await queue.replay_dead_letter("t", dead.id)
    (replayed,) = await queue.dequeue("c", 10, 30)
    assert replayed.deliveries == 1
    assert await queue.live("t", ["unknown-workflow"]) == {"unknown-workflow"}
    await queue.ack([replayed])
    assert await queue.live("t", ["unknown-workflow"]) == set()


async def test_trimmed_parked_dead_letters_release_their_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis keeps a bounded number of dead letters; one trimmed away no longer holds its run
    (the embedded queue keeps them all)."""
    from tenantflow.queue import redis_streams

    monkeypatch.setattr(redis_streams, "DEAD_LETTERS_MAX", 2)
    queue = RedisStreamsQueue(REDIS_URL, prefix=f"tftest{uuid.uuid4().hex[:10]}")
    try:
        for run in ("r1", "r2", "r3"):
            await queue.enqueue("t", run)
            (message,) = await queue.dequeue("c", 10, 30)
            await queue.dead_letter(message, "parked")
        assert [d.run_id for d in await queue.dead_letters("t")] == ["r2", "r3"]
        assert await queue.live("t", ["r1", "r2", "r3"]) == {"r2", "r3"}
    finally:
        await queue.purge("t")
        await queue.close()


async def test_retry_later_without_counting_the_delivery(queue: Queue) -> None:
    await queue.enqueue("t", "sleeper")
    for _ in range(5):
        (msg,) = await queue.dequeue("c", 10, 30)
        await queue.retry_later(msg, 0, count_delivery=False)
    (msg,) = await queue.dequeue("c", 10, 30)
    assert msg.deliveries == 1


async def test_retry_later_of_a_lost_message_puts_a_new_one(queue: Queue) -> None:
    """A run executed while its queue lost its data (here: the tenant's messages purged) still
    gets its next delivery; a delivery reclaimed by another consumer is left to it."""
    await queue.enqueue("t", "sleeper", trace="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    (msg,) = await queue.dequeue("c", 10, 30)
    await queue.purge("t")
    assert await queue.live("t", ["sleeper"]) == set()
    await queue.extend([msg], 30)  # nothing to extend, and no error
    await queue.retry_later(msg, 0.1, count_delivery=False)
    assert await queue.live("t", ["sleeper"]) == {"sleeper"}
    await asyncio.sleep(0.15)
    (again,) = await queue.dequeue("c", 10, 0.05)
    assert (again.run_id, again.deliveries, again.trace) == ("sleeper", 1, msg.trace)
    await asyncio.sleep(0.08)
    (reclaimed,) = await queue.dequeue("other", 10, 0.05)
    await queue.retry_later(again, 0)  # late: the message is another consumer's now
    assert await queue.depth("t") == 1
    await queue.ack([reclaimed])
    assert await queue.depth("t") == 0 and await queue.live("t", ["sleeper"]) == set()


async def test_enqueue_many_with_delays(queue: Queue) -> None:
    await queue.enqueue_many(
        {"t": [Envelope("now"), Envelope("soon", delay=0.2)], "u": [Envelope("later", delay=0.4)]}
    )
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["now"]
    await asyncio.sleep(0.25)
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["soon"]
    await asyncio.sleep(0.2)
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["later"]
    assert await queue.live("u", ["later"]) == {"later"}


async def test_the_epoch_stays_while_the_data_set_does(queue: Queue) -> None:
    first = await queue.epoch()
    await queue.enqueue("t", "r")
    again = await queue.epoch()
    assert again.id == first.id and not again.new


async def test_tenants_are_served_round_robin(queue: Queue) -> None:
    for i in range(50):
        await queue.enqueue("flood", f"f{i}")
    for i in range(5):
        await queue.enqueue("small", f"s{i}")
    batch = await queue.dequeue("c", 10, 30)
    assert Counter(m.tenant_id for m in batch) == {"flood": 5, "small": 5}


async def test_a_busy_consumer_finds_a_new_tenant_soon(make_queue: QueueFactory) -> None:
    """A consumer that never waits (another tenant's flood keeps it busy) still reads a tenant
    whose first message arrives meanwhile, within a fraction of a second, not at its next
    full refresh of the active tenants (a second later)."""
    consumer, producer = make_queue(), make_queue()
    for i in range(2000):
        await producer.enqueue("flood", f"f{i}")
    assert len(await consumer.dequeue("c", 5, 30)) == 5  # knows its tenants as of now
    await producer.enqueue("newcomer", "n0")
    clock = asyncio.get_running_loop().time
    started = clock()
    taken: list[str] = []
    while "newcomer" not in taken and clock() - started < 3:
        batch = await consumer.dequeue("c", 5, 30)
        assert batch, "the flood is not over"
        await consumer.ack(batch)
        taken = [m.tenant_id for m in batch]
        await asyncio.sleep(0.005)  # a busy worker's pace
    assert "newcomer" in taken
    assert clock() - started < 0.5


async def test_in_flight_cap_per_tenant_holds_across_consumers(
    make_queue: QueueFactory,
) -> None:
    queue = make_queue(tenant_max_inflight=3)
    for i in range(10):
        await queue.enqueue("t", f"r{i}")
    first = await queue.dequeue("a", 10, 30)
    second = await queue.dequeue("b", 10, 30)  # another worker: the cap is shared
    assert len(first) == 3 and second == []
    await queue.ack(first[:2])
    assert len(await queue.dequeue("b", 10, 30)) == 2


async def test_locks_are_exclusive_until_they_lapse(queue: Queue) -> None:
    assert await queue.try_lock("reconciler", "a", 0.2)
    assert not await queue.try_lock("reconciler", "b", 0.2)
    assert await queue.try_lock("reconciler", "a", 0.2)  # the holder keeps it
    await asyncio.sleep(0.25)
    assert await queue.try_lock("reconciler", "b", 0.2)


async def test_concurrent_consumers_never_share_a_message(make_queue: QueueFactory) -> None:
    producer = make_queue()
    for i in range(200):
        await producer.enqueue(f"t{i % 3}", f"r{i}")

    async def drain(name: str) -> list[str]:
        q = make_queue()
        got: list[str] = []
        for _ in range(100):
            batch = await q.dequeue(name, 7, 30)
            if not batch:
                break
            got.extend(m.run_id for m in batch)
            await q.ack(batch)
        return got

    results = await asyncio.gather(*(drain(f"c{i}") for i in range(4)))
    everything = [r for got in results for r in got]
    assert sorted(everything) == sorted(f"r{i}" for i in range(200))


async def test_an_idle_consumer_takes_a_message_as_it_arrives(make_queue: QueueFactory) -> None:
    """``wait_and_dequeue``: the waiting consumer gets the message enqueued while it waits
    (by another producer) well before its timeout; with nothing coming it returns nothing once
    the timeout is over; a tenant it did not know yet is found right after. (A wake-up token
    left by an earlier message may end one wait early, empty-handed: that is a spare wake.)"""
    consumer, producer = make_queue(), make_queue()
    clock = asyncio.get_running_loop().time

    async def take(timeout: float, within: float) -> list[str]:
        deadline = clock() + within
        while clock() < deadline:
            got = await consumer.wait_and_dequeue(timeout, "c", 5, 5.0)
            if got:
                await consumer.ack(got)
                return [m.run_id for m in got]
        return []

    await producer.enqueue("t", "first")
    assert await take(0.1, 2.0) == ["first"]

    async def later() -> None:
        await asyncio.sleep(0.2)
        await producer.enqueue("t", "second")

    sending = asyncio.create_task(later())
    started = clock()
    # Polling as a worker does (the embedded queue sees other processes' messages so).
    assert await take(0.05, 5.0) == ["second"]
    assert 0.15 < clock() - started < 2.0
    await sending

    while await consumer.wait_and_dequeue(0.01, "c", 5, 5.0) == []:  # spare tokens, if any
        if clock() - started > 3:
            break
    started = clock()
    assert await consumer.wait_and_dequeue(0.3, "c", 5, 5.0) == []
    assert clock() - started >= 0.25

    await producer.enqueue("new-tenant", "third")
    assert await take(0.3, 3.0) == ["third"]


async def _recently_active(queue: Queue, tenants: int) -> None:
    """Each of ``tenants`` tenants had a run, delivered and acknowledged: active, now idle."""
    await queue.enqueue_many({f"old{i:04d}": [Envelope(run_id="r")] for i in range(tenants)})
    while batch := await queue.dequeue("c", 100, 30):
        await queue.ack(batch)


async def test_a_new_tenant_is_served_in_one_call_however_many_were_active(
    make_queue: QueueFactory,
) -> None:
    """Dispatch costs the same with 500 tenants recently active: a newcomer's first message
    comes with the first dequeue (on Redis, in one round trip), and so does the first
    message of a tenant that was active before."""
    queue = make_queue()
    await _recently_active(queue, 500)
    await queue.enqueue("newcomer", "n0")
    trips = _count_round_trips(queue)
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["n0"]
    assert trips() in (0, 1)  # 0: the embedded queue makes none
    await queue.enqueue("old0250", "again")
    assert [m.tenant_id for m in await queue.dequeue("c", 10, 30)] == ["old0250"]


async def test_an_idle_consumer_takes_a_new_tenant_at_once_among_many(
    make_queue: QueueFactory,
) -> None:
    consumer, producer = make_queue(), make_queue()
    await _recently_active(consumer, 500)
    clock = asyncio.get_running_loop().time

    async def later() -> float:
        await asyncio.sleep(0.2)
        await producer.enqueue("newcomer", "n0")
        return clock()

    sending = asyncio.create_task(later())
    started = clock()
    got: list[str] = []
    while not got and clock() - started < 3:  # a spare token may end a wait early
        got = [m.run_id for m in await consumer.wait_and_dequeue(2.0, "c", 5, 30)]
    taken = clock()
    sent = await sending
    assert got == ["n0"]
    if isinstance(consumer, RedisStreamsQueue):  # woken by the token, not the timeout
        assert taken - sent < 0.1


async def test_weights_share_a_batch(queue: Queue) -> None:
    for i in range(30):
        await queue.enqueue("gold", f"g{i}")
        await queue.enqueue("free", f"f{i}")
    batch = await queue.dequeue("c", 8, 30, weights={"gold": 3})
    assert Counter(m.tenant_id for m in batch) == {"gold": 6, "free": 2}


async def test_weights_hold_over_dequeues_of_one_or_two(queue: Queue) -> None:
    """A busy worker takes a message or two at a time, as its runs finish: over many such
    dequeues a tenant of weight 3 still takes three messages to another's one."""
    await queue.enqueue_many(
        {t: [Envelope(run_id=f"{t}{i}") for i in range(100)] for t in ("gold", "free")}
    )
    taken: Counter[str] = Counter()
    for size in [1, 2, 3, 1, 1, 2] * 10:
        batch = await queue.dequeue("c", size, 30, weights={"gold": 3})
        taken.update(m.tenant_id for m in batch)
        await queue.ack(batch)
    assert taken == {"gold": 75, "free": 25}


async def test_a_tenant_at_its_cap_does_not_hold_up_the_others(make_queue: QueueFactory) -> None:
    """More tenants at their cap than a dequeue looks at beyond its free slots: they move
    behind, and the others are served within a few calls."""
    queue = make_queue()
    capped = [f"capped{i:02d}" for i in range(40)]
    caps = dict.fromkeys(capped, 1)
    for tenant in capped:
        await queue.enqueue(tenant, "a")
        await queue.enqueue(tenant, "b")
    first = await queue.dequeue("c", 100, 30, caps=caps)
    assert Counter(m.tenant_id for m in first) == dict.fromkeys(capped, 1)
    await queue.enqueue("free", "f0")
    for _ in range(5):
        batch = await queue.dequeue("c", 2, 30, caps=caps)
        if batch:
            break
    assert [m.run_id for m in batch] == ["f0"]
    await queue.ack([m for m in first if m.tenant_id == "capped07"])
    got = await queue.dequeue("c", 100, 30, caps=caps)
    assert [(m.tenant_id, m.run_id) for m in got] == [("capped07", "b")]


async def test_the_ready_set_holds_the_tenants_with_messages_to_deliver() -> None:
    """Redis: a tenant enters the ready set with its message and leaves once drained; a
    delayed message enters it when due, and a lease that lapses finds its tenant again."""
    queue = RedisStreamsQueue(REDIS_URL, prefix=f"tftest{uuid.uuid4().hex[:10]}")

    async def ready() -> set[str]:
        return set(await queue.redis.zrange(queue.keys.ready, 0, -1))

    try:
        await queue.enqueue("t", "r1")
        await queue.enqueue("t", "r2")
        assert await ready() == {"t"}
        assert len(await queue.dequeue("c", 1, 30)) == 1
        assert await ready() == {"t"}  # one left
        (second,) = await queue.dequeue("c", 5, 30)
        assert await ready() == set()  # drained, though in flight
        await queue.ack([second])

        await queue.enqueue("later", "d1", delay=0.2)
        assert await ready() == set()
        assert await queue.dequeue("c", 5, 30) == []
        await asyncio.sleep(0.25)
        (due,) = await queue.dequeue("c", 5, 0.3)
        assert due.run_id == "d1" and await ready() == set()
        await asyncio.sleep(0.35)  # its lease lapses: found again through the due set
        (again,) = await queue.dequeue("c", 5, 0.3)
        assert again.run_id == "d1" and again.deliveries == 2
        await queue.ack([again])

        await queue.enqueue("gone", "g1")
        await queue.redis.delete(queue.keys.tenant("gone").stream)  # purged while ready
        assert await queue.dequeue("c", 5, 30) == []
        assert await ready() == set()
        assert await queue.redis.exists(queue.keys.tenant("gone").stream) == 0
    finally:
        keys = [k async for k in queue.redis.scan_iter(match=f"{queue.keys.prefix}:*")]
        if keys:
            await queue.redis.delete(*keys)
        await queue.close()


async def test_tenants_of_an_earlier_version_are_adopted() -> None:
    """Messages made ready before the ready set existed (their tenants only in ``tf:active``)
    are found by the first dequeue of a queue of this version."""
    prefix = f"tftest{uuid.uuid4().hex[:10]}"
    old, new = (
        RedisStreamsQueue(REDIS_URL, prefix=prefix),
        RedisStreamsQueue(REDIS_URL, prefix=prefix),
    )
    try:
        await old.enqueue("t", "r1")
        await old.redis.delete(old.keys.ready)  # as an earlier version left it
        await old.redis.zadd(old.keys.active, {"t": 1})
        assert [m.run_id for m in await new.dequeue("c", 5, 30)] == ["r1"]
        assert await new.redis.exists(new.keys.active) == 0
    finally:
        keys = [k async for k in old.redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await old.redis.delete(*keys)
        await old.close()
        await new.close()


def _count_round_trips(queue: Queue) -> Callable[[], int]:
    """How many round trips to Redis the queue has made since (0 for other queues)."""
    if not isinstance(queue, RedisStreamsQueue):
        return lambda: 0
    calls = [0]
    execute = queue._execute

    async def counted(*args: Any, **kwargs: Any) -> list[Any]:
        calls[0] += 1
        return await execute(*args, **kwargs)

    queue._execute = counted  # type: ignore[method-assign]  # counted, then the real one
    return lambda: calls[0]


async def test_a_redis_connection_left_with_unread_replies_is_never_reused() -> None:
    """The queue sends its commands on pooled connections directly (``_round_trip``): a wait
    that is cancelled, or commands of which one fails, must not leave a reply on a connection
    that the next caller would read as its own."""
    import redis.asyncio as redis
    from redis.exceptions import ResponseError

    from tenantflow.coordination.redis import round_trip as _round_trip

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, max_connections=1)
    key = f"tftest{uuid.uuid4().hex[:10]}:list"
    try:
        # A blocking wait cancelled at its deadline; its reply (a push that comes later)
        # would otherwise be the next reply read on that connection.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await _round_trip(client, [("BLPOP", key, 5)])
        await client.lpush(key, "late")
        assert await _round_trip(client, [("PING",), ("LRANGE", key, 0, -1)]) == [
            "PONG",
            ["late"],
        ]
        # An error in the middle: every reply is read before it is raised.
        with pytest.raises(ResponseError):
            await _round_trip(client, [("PING",), ("INCR", key), ("ECHO", "after")])
        assert await _round_trip(client, [("ECHO", "next")]) == ["next"]
    finally:
        await client.delete(key)
        await client.aclose()


async def test_scripts_the_server_lost_are_loaded_again() -> None:
    """A Redis that restarted (or ran ``SCRIPT FLUSH``) no longer knows the scripts the queue
    calls by SHA: the round trip that finds out loads them and is sent again, once."""
    queue = RedisStreamsQueue(REDIS_URL, prefix=f"tftest{uuid.uuid4().hex[:10]}")
    try:
        await queue.enqueue("t", "before")
        await queue.redis.script_flush()
        await queue.enqueue("t", "after")  # ENQUEUE unknown: loaded, sent again
        await queue.redis.script_flush()
        got = await queue.dequeue("c", 5, 5.0)  # DISPATCH unknown, behind nothing else
        assert sorted(m.run_id for m in got) == ["after", "before"]
        await queue.redis.script_flush()
        await queue.ack(got)  # ACK unknown
        assert await queue.dequeue("c", 5, 0.001) == []  # acknowledged: not reclaimed
    finally:
        keys = [k async for k in queue.redis.scan_iter(match=f"{queue.keys.prefix}:*")]
        if keys:
            await queue.redis.delete(*keys)
        await queue.close()


async def test_a_dispatch_whose_reply_was_lost_is_delivered_by_the_next() -> None:
    """A connection reset after Redis ran a dispatch, before its reply arrived: the messages
    it took are pending for the consumer, which never got them. The next dispatch delivers
    them at once (the same deliveries, a fresh lease), rather than leaving them until their
    visibility lapses and they are reclaimed."""
    prefix = f"tftest{uuid.uuid4().hex[:10]}"
    url = urlsplit(REDIS_URL)
    proxy = FaultProxy(url.port or 6379).start()
    direct = RedisStreamsQueue(REDIS_URL, prefix=prefix)
    queue = RedisStreamsQueue(url._replace(netloc=proxy.url_netloc).geturl(), prefix=prefix)
    try:
        assert await queue.dequeue("c", 5, 30) == []  # its one-time reads done, in one trip
        await direct.enqueue_many({"t": [Envelope(f"r{i}") for i in range(3)]})
        # Each chunk is held 0.5 s: the dispatch reaches Redis at 0.5 s, runs, and its reply
        # is on its way back when the reset comes, at 0.75 s.
        proxy.set("latency", delay=0.5)
        lost = asyncio.create_task(queue.dequeue("c", 5, 30))
        await asyncio.sleep(0.75)
        proxy.set("reset")
        with pytest.raises(RedisConnectionError):
            await lost
        pending = await direct.redis.xpending_range(
            direct.keys.tenant("t").stream, GROUP, "-", "+", 10, consumername="c"
        )
        assert len(pending) == 3  # it ran: they are the consumer's, unknown to it
        proxy.set("pass")
        got = await queue.dequeue("c", 5, 30)
        assert sorted(m.run_id for m in got) == ["r0", "r1", "r2"]
        assert {m.deliveries for m in got} == {1}
        assert await queue.dequeue("c", 5, 30) == []  # delivered once, not again
        await queue.ack(got)
        assert await direct.depth("t") == 0  # their receipts hold
        assert [k async for k in direct.redis.scan_iter(match=f"{prefix}:taken:*")] == []
    finally:
        proxy.stop()
        keys = [k async for k in direct.redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await direct.redis.delete(*keys)
        await direct.close()
        await queue.close()
