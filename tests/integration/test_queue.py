"""Semantics of the embedded queue (see tenantflow.queue.base)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tenantflow.errors import NotFoundError
from tenantflow.queue.sqlite import SqliteQueue


@pytest.fixture
async def queue(tmp_path: Path) -> SqliteQueue:
    return SqliteQueue(tmp_path / "queue.db", max_deliveries=3)


async def test_delay_and_priority(queue: SqliteQueue) -> None:
    await queue.enqueue("t", "low")
    await queue.enqueue("t", "high", priority=5)
    await queue.enqueue("t", "later", delay=0.3)
    got = await queue.dequeue("c", 10, 30)
    assert [m.run_id for m in got] == ["high", "low"]
    await asyncio.sleep(0.35)
    assert [m.run_id for m in await queue.dequeue("c", 10, 30)] == ["later"]


async def test_lease_hides_a_message_until_it_expires(queue: SqliteQueue) -> None:
    await queue.enqueue("t", "r1")
    (first,) = await queue.dequeue("a", 10, 0.2)
    assert await queue.dequeue("b", 10, 0.2) == []
    await asyncio.sleep(0.25)
    (again,) = await queue.dequeue("b", 10, 30)  # reclaimed after the lease expired
    assert again.id == first.id and again.deliveries == 2
    await queue.ack([first])  # a late ack from the first consumer changes nothing
    assert await queue.depth("t") == 1
    await queue.ack([again])
    assert await queue.depth("t") == 0


async def test_extend_keeps_the_lease(queue: SqliteQueue) -> None:
    await queue.enqueue("t", "r1")
    (msg,) = await queue.dequeue("a", 10, 0.2)
    for _ in range(3):
        await asyncio.sleep(0.1)
        await queue.extend([msg], 0.2)
    assert await queue.dequeue("b", 10, 0.2) == []


async def test_retry_later_and_dead_letter_after_max_deliveries(queue: SqliteQueue) -> None:
    await queue.enqueue("t", "poison")
    for delivery in range(1, 4):
        (msg,) = await queue.dequeue("c", 10, 30)
        assert msg.deliveries == delivery
        await queue.retry_later(msg, 0)
    assert await queue.dequeue("c", 10, 30) == []  # third failure: dead-lettered
    (dead,) = await queue.dead_letters("t")
    assert dead.run_id == "poison" and dead.deliveries == 3
    assert await queue.dead_letters("other") == []
    with pytest.raises(NotFoundError):
        await queue.replay_dead_letter("other", dead.id)  # not another tenant's
    await queue.replay_dead_letter("t", dead.id)
    (replayed,) = await queue.dequeue("c", 10, 30)
    assert replayed.run_id == "poison" and replayed.deliveries == 1


async def test_retry_later_without_counting_the_delivery(queue: SqliteQueue) -> None:
    await queue.enqueue("t", "sleeper")
    for _ in range(5):
        (msg,) = await queue.dequeue("c", 10, 30)
        await queue.retry_later(msg, 0, count_delivery=False)
    (msg,) = await queue.dequeue("c", 10, 30)
    assert msg.deliveries == 1


async def test_tenants_are_served_round_robin(queue: SqliteQueue) -> None:
    for i in range(50):
        await queue.enqueue("flood", f"f{i}")
    for i in range(5):
        await queue.enqueue("small", f"s{i}")
    batch = await queue.dequeue("c", 10, 30)
    assert Counter(m.tenant_id for m in batch) == {"flood": 5, "small": 5}


async def test_concurrent_consumers_never_share_a_message(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    producer = SqliteQueue(path)
    for i in range(200):
        await producer.enqueue(f"t{i % 3}", f"r{i}")

    async def drain(name: str) -> list[str]:
        q = SqliteQueue(path)  # its own connection, in its own thread: real concurrency
        got: list[str] = []
        while batch := await q.dequeue(name, 7, 30):
            got.extend(m.run_id for m in batch)
            await q.ack(batch)
        await q.close()
        return got

    results = await asyncio.gather(
        *(asyncio.to_thread(asyncio.run, drain(f"c{i}")) for i in range(4))
    )
    everything = [r for got in results for r in got]
    assert sorted(everything) == sorted(f"r{i}" for i in range(200))
