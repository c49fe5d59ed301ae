"""A narrow async database interface, and its SQLite and PostgreSQL implementations.

Statements are written once, with ``?`` placeholders; the PostgreSQL side rewrites them to
``%s`` (psycopg). ``{for_update}`` in a statement becomes ``FOR UPDATE`` on PostgreSQL (which
needs the row lock under READ COMMITTED) and nothing on SQLite (whose ``BEGIN IMMEDIATE``
already serializes writers).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tenantflow import _sqlite

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

Row = tuple[Any, ...]


class Tx(Protocol):
    """One transaction, or (from ``autocommit()``) a session where each statement is its own."""

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def run(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    async def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...


class Database(Protocol):
    dialect: str

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...

    def autocommit(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...

    async def close(self) -> None: ...


# -- SQLite --------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    return sql.replace("{for_update}", "")


class _SqliteTx:
    def __init__(self, cur: sqlite3.Cursor | sqlite3.Connection) -> None:
        self._cur = cur

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._cur.execute(_sqlite_sql(sql), params).fetchone()
        return row

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._cur.execute(_sqlite_sql(sql), params).fetchall()

    async def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._cur.execute(_sqlite_sql(sql), params).rowcount

    async def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(_sqlite_sql(sql), params)


class SqliteDatabase:
    """Statements run on the event loop's thread (see ``tenantflow._sqlite``)."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.conn = _sqlite.connect(path, synchronous=synchronous)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        with _sqlite.transaction(self.conn) as cur:
            yield _SqliteTx(cur)

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[Tx]:
        yield _SqliteTx(self.conn)

    async def close(self) -> None:
        self.conn.close()


# -- PostgreSQL ----------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return sql.replace("{for_update}", " FOR UPDATE").replace("?", "%s")


class _PgTx:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn

    async def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        cur = await self._conn.execute(_pg_sql(sql), params)
        row: Row | None = await cur.fetchone()
        return row

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = await self._conn.execute(_pg_sql(sql), params)
        return await cur.fetchall()

    async def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = await self._conn.execute(_pg_sql(sql), params)
        return cur.rowcount

    async def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        async with self._conn.cursor() as cur:
            await cur.executemany(_pg_sql(sql), params)


class PostgresDatabase:
    """A small pool of connections to one tenant database (psycopg 3)."""

    dialect = "postgresql"

    def __init__(self, conninfo: str, *, max_size: int = 4) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=30,
            kwargs={"autocommit": True},
        )
        self._opened = False

    async def _open(self) -> None:
        if not self._opened:
            self._opened = True
            await self.pool.open()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        await self._open()
        async with self.pool.connection() as conn, conn.transaction():
            yield _PgTx(conn)

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[Tx]:
        await self._open()
        async with self.pool.connection() as conn:
            yield _PgTx(conn)

    async def close(self) -> None:
        if self._opened:
            await self.pool.close()
