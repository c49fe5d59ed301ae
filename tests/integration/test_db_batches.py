"""Group commit on PostgreSQL: statements of one turn of the event loop share a transaction,
sent as EXECUTEs of statements each connection prepared once."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from tenantflow.platform.provision import with_database
from tenantflow.store.db import PostgresDatabase
from tests.conftest import POSTGRES_URL

GIVEN_UP = "prepared statements do not last; sending them plain"
INSERT = "INSERT INTO items (id, name) VALUES (?, ?) RETURNING id"
RENAME = "UPDATE items SET name = ? WHERE id = ? RETURNING name"


@pytest.fixture
def url() -> Iterator[str]:
    """A database of this test only, with a table of items."""
    name = f"tftest_{uuid.uuid4().hex[:10]}_batches"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(POSTGRES_URL, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE TABLE blobs (id integer PRIMARY KEY, data bytea NOT NULL)")
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(url: str) -> AsyncIterator[PostgresDatabase]:
    """One connection, so that every batch uses the same."""
    database = PostgresDatabase(url, max_size=1)
    try:
        yield database
    finally:
        await database.close()


async def prepared(db: PostgresDatabase) -> dict[str, str]:
    async with db.autocommit() as tx:
        rows = await tx.all("SELECT name, statement FROM pg_prepared_statements")
    return {row[0]: row[1] for row in rows}


async def items(db: PostgresDatabase) -> list[tuple[object, ...]]:
    async with db.autocommit() as tx:
        return await tx.all("SELECT id, name FROM items ORDER BY id")


async def batch(db: PostgresDatabase, first: int, *, durable: bool = True) -> list[object]:
    """Two inserts and two renames submitted in one turn: the first insert goes at once (nothing
    else is on its way), the other three in one transaction after it (``db`` has one
    connection: the batch waits for it, so the rename finds the row inserted)."""
    rows = await asyncio.gather(
        db.batched(INSERT, (first, "a"), durable=durable),
        db.batched(INSERT, (first + 1, "b"), durable=durable),
        db.batched(RENAME, (f"a{first}", first), durable=durable),
        db.batched(RENAME, (f"b{first}", first + 1), durable=durable),
    )
    return [row[0] if row else None for row in rows]


async def test_batched_statements_are_prepared_once_per_connection(db: PostgresDatabase) -> None:
    assert await batch(db, 1) == [1, 2, "a1", "b1"]
    assert await batch(db, 10, durable=False) == [10, 11, "a10", "b10"]
    assert await batch(db, 20) == [20, 21, "a20", "b20"]
    statements = await prepared(db)
    # Each of the two texts prepared once on the one connection, with $n parameters.
    assert len(statements) == 2
    assert all(name.startswith("tenantflow_") for name in statements)
    assert sorted(s.split(" AS ", 1)[1] for s in statements.values()) == [
        "INSERT INTO items (id, name) VALUES ($1, $2) RETURNING id",
        "UPDATE items SET name = $1 WHERE id = $2 RETURNING name",
    ]
    assert await items(db) == [
        (1, "a1"),
        (2, "b1"),
        (10, "a10"),
        (11, "b10"),
        (20, "a20"),
        (21, "b20"),
    ]


async def test_a_lone_statement_goes_at_once_and_those_meanwhile_share_the_next_commit(
    url: str,
) -> None:
    """With nothing on its way, a statement is sent at once, before the caller's task yields
    to the event loop, rather than a turn later; the statements submitted while it is on its
    way share one transaction (the next batch)."""
    database = PostgresDatabase(url, max_size=2)
    xid = "SELECT txid_current() + ?"  # a transaction id of its own for each transaction
    try:
        await database.batched(xid, (0,))  # the pool opens (from a batch: a fresh context)
        # A callback of the very next turn finds the statement on its way, not waiting.
        seen: list[tuple[int, int]] = []
        asyncio.get_running_loop().call_soon(
            lambda: seen.append((database._in_flight, len(database._batch)))
        )
        await database.batched(xid, (0,))
        assert seen == [(1, 0)]
        rows = await asyncio.gather(*(database.batched(xid, (0,)) for _ in range(5)))
        ids = [row[0] if row else None for row in rows]
        assert ids[0] != ids[1]
        assert ids[1:] == [ids[1]] * 4
    finally:
        await database.close()


async def test_statements_dropped_by_the_session_are_prepared_again(
    db: PostgresDatabase,
) -> None:
    """DEALLOCATE ALL (or a reconnect behind a proxy) drops what the session prepared: the
    statement that finds out is sent again, after preparing again; nothing ran twice."""
    assert await batch(db, 1) == [1, 2, "a1", "b1"]
    async with db.autocommit() as tx:  # the same, only connection
        await tx.run("DEALLOCATE ALL")
        await tx.run("ROLLBACK")  # a rollback on the session: psycopg keeps them too
    with capture_logs() as logs:
        assert await db.batched(RENAME, ("alone", 1), durable=False) == ("alone",)
        assert await batch(db, 10) == [10, 11, "a10", "b10"]
    assert logs == []  # not given up: prepared again
    assert len(await prepared(db)) == 2
    async with db.autocommit() as tx:
        assert await tx.one("SELECT count(*) FROM items") == (4,)


class PoolerLike(PostgresDatabase):
    """Loses its prepared statements between preparing and executing them, as a session of
    a pooler in transaction mode does (the next transaction gets another server session)."""

    async def _prepared(self, conn: Any, texts: set[str]) -> dict[str, str]:
        names = await super()._prepared(conn, texts)
        await conn.execute("DEALLOCATE ALL")
        return names


async def test_a_session_that_cannot_keep_prepared_statements_goes_on_plain(url: str) -> None:
    pooled = PoolerLike(url, max_size=1)
    try:
        with capture_logs() as logs:
            assert await batch(pooled, 1) == [1, 2, "a1", "b1"]
            assert await pooled.batched(RENAME, ("alone", 1), durable=False) == ("alone",)
            assert await batch(pooled, 10, durable=False) == [10, 11, "a10", "b10"]
        # Given up once, on the first batch; plain since (nothing prepared, nothing lost).
        assert [entry["event"] for entry in logs] == [GIVEN_UP]
        assert await items(pooled) == [(1, "alone"), (2, "b1"), (10, "a10"), (11, "b10")]
    finally:
        await pooled.close()


async def test_a_statement_the_server_cannot_prepare_is_sent_plain(db: PostgresDatabase) -> None:
    # PostgreSQL cannot type $1 in "$1 IS NULL" on its own; with the value in the text it can.
    untypable = "SELECT ? IS NULL"
    rows = await asyncio.gather(
        db.batched(untypable, (None,)),
        db.batched(INSERT, (1, "a")),
        db.batched(untypable, ("x",)),
    )
    assert [row[0] if row else None for row in rows] == [True, 1, False]
    assert [s.split(" AS ", 1)[1] for s in (await prepared(db)).values()] == [
        "INSERT INTO items (id, name) VALUES ($1, $2) RETURNING id"
    ]


async def test_a_large_binary_value_goes_as_a_parameter(db: PostgresDatabase) -> None:
    """A lone durable statement with a large binary value sends it as a parameter (as itself),
    not hex-encoded into the text; smaller ones take the prepared path."""
    store = "INSERT INTO blobs (id, data) VALUES (?, ?) RETURNING length(data), md5(data)"
    large = bytes(range(256)) * 1024  # 256 KiB
    small = b"\x00\xff" * 10
    assert await db.batched(store, (1, large)) == (len(large), hashlib.md5(large).hexdigest())
    assert await prepared(db) == {}  # sent with its parameters, nothing prepared
    assert await db.batched(store, (2, small)) == (len(small), hashlib.md5(small).hexdigest())
    assert len(await prepared(db)) == 1
    async with db.autocommit() as tx:
        assert await tx.one("SELECT data FROM blobs WHERE id = 1") == (large,)
