"""A narrow async database interface, and its SQLite and PostgreSQL implementations.

Statements are written once, with ``?`` placeholders; the PostgreSQL side rewrites them to
``%s`` (psycopg). ``{for_update}`` and ``{for_share}`` in a statement become row locks on PostgreSQL
(which needs them under READ COMMITTED) and nothing on SQLite (whose ``BEGIN IMMEDIATE``
already serializes writers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import sqlite3
import weakref
from collections.abc import AsyncIterator, Sequence
from contextvars import Context
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from tenantflow import _sqlite
from tenantflow.errors import TenantDatabaseMissingError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from tenantflow.store.pgpool import ConnectionBudget

log = structlog.get_logger(__name__)

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

    async def batched(self, sql: str, params: Sequence[Any], *, durable: bool = True) -> Row | None:
        """Run one self-contained statement, possibly in one transaction with other callers'
        statements (group commit); returns its first row once that transaction committed.

        ``durable=False`` lets the commit return before it reaches the disk (PostgreSQL's
        asynchronous commit), for a change whose loss in a database crash is harmless: it
        becomes durable with the next durable commit after it, and a database crash before
        that undoes it as if it never happened (the log is sequential: nothing committed
        later can depend on it and survive without it)."""
        ...

    async def close(self) -> None: ...


# -- SQLite --------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    return sql.replace("{for_update}", "").replace("{for_share}", "")


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

    def __init__(self, path: Path, *, synchronous: str = "NORMAL", create: bool = True) -> None:
        self.path = path
        if not create and not path.exists():
            raise TenantDatabaseMissingError()
        self.conn = _sqlite.connect(path, synchronous=synchronous, create=create)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        with _sqlite.transaction(self.conn) as cur:
            yield _SqliteTx(cur)

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[Tx]:
        yield _SqliteTx(self.conn)

    async def batched(self, sql: str, params: Sequence[Any], *, durable: bool = True) -> Row | None:
        # A local commit costs microseconds here: nothing to gain from grouping.
        row: Row | None = self.conn.execute(_sqlite_sql(sql), params).fetchone()
        return row

    async def close(self) -> None:
        self.conn.close()


# -- PostgreSQL ----------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    return (
        sql.replace("{for_update}", " FOR UPDATE")
        .replace("{for_share}", " FOR SHARE")
        .replace("?", "%s")
    )


MAX_PREPARED = 32
_DATABASE_MISSING = re.compile(r'FATAL: +database "[^"]*" does not exist')
_STATEMENT_NAMES: dict[str, str] = {}  # statement text -> name
_UNPREPARABLE: set[str] = set()  # texts whose parameters the server cannot type


def _statement_name(sql: str) -> str | None:
    """The prepared statement's name: a digest of its text, so that a name means the same
    statement in every process (a pooler may share server sessions between processes, and
    two versions of tenantflow may run side by side). None past ``MAX_PREPARED`` texts."""
    name = _STATEMENT_NAMES.get(sql)
    if name is None and len(_STATEMENT_NAMES) < MAX_PREPARED:
        digest = hashlib.sha1(_dollar_sql(sql).encode(), usedforsecurity=False).hexdigest()
        name = _STATEMENT_NAMES[sql] = f"tenantflow_{digest[:16]}"
    return name


@lru_cache(maxsize=MAX_PREPARED)
def _dollar_sql(sql: str) -> str:
    """A statement with ``$1``, ``$2``… for its ``?`` placeholders, as PREPARE wants it."""
    parts = [part.replace("%%", "%") for part in _pg_sql(sql).split("%s")]
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], start=1)) + parts[-1]


LARGE_BYTES = 64 * 1024  # a value this large goes as a parameter, not into the text


def _has_large_bytes(params: Sequence[Any]) -> bool:
    return any(isinstance(p, bytes) and len(p) >= LARGE_BYTES for p in params)


@lru_cache(maxsize=MAX_PREPARED * 4)
def _execute_sql(name: str, count: int) -> str:
    return f"EXECUTE {name}({', '.join(['%s'] * count)})" if count else f"EXECUTE {name}"


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


HOLD_MARGIN_SECONDS = 2.0


def pg_connect_args(timeout: float) -> dict[str, Any]:
    """libpq connection arguments: a connect timeout (``timeout`` 0: none) and TCP keepalives,
    which notice a server that vanished from the network."""
    args: dict[str, Any] = {
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if timeout > 0:
        args["connect_timeout"] = max(1, math.ceil(timeout))
    return args


def pg_session_limits(timeout: float) -> list[str]:
    """Statements run once on each new session so that it never waits forever:
    ``statement_timeout`` ends a statement stuck (behind a lock, say);
    ``idle_in_transaction_session_timeout`` (half of it: tenantflow never idles inside a
    transaction, its statements follow each other) ends the session of a process frozen in the
    middle of a transaction (SIGSTOP, a debugger, a stalled VM), so its row locks are released
    before the statements waiting on them time out. Set with ``SET`` after connecting, not as
    startup options, which connection poolers refuse and which would override the URL's own
    ``options``. ``timeout`` 0: none (for a pooler in transaction mode, set them on the role)."""
    if timeout <= 0:
        return []
    ms = int(timeout * 1000)
    return [
        f"SET statement_timeout = {ms}",
        f"SET idle_in_transaction_session_timeout = {ms // 2}",
    ]


class PostgresDatabase:
    """Connections to one tenant database (psycopg 3): at most ``max_size`` in use at once,
    drawn from ``budget``, the process's connection budget shared with its other databases
    (without one: a budget of ``max_size`` of its own)."""

    dialect = "postgresql"

    def __init__(
        self,
        conninfo: str,
        *,
        max_size: int = 4,
        timeout: float = 30.0,
        budget: ConnectionBudget | None = None,
    ) -> None:
        from tenantflow.store.pgpool import ConnectionBudget, ConnectionPool

        self._conninfo = conninfo
        # prepare_threshold None: psycopg prepares nothing of its own (a batch's text is
        # unique anyway, its values are in it), and so never sends the DEALLOCATE ALL (after
        # a rollback) that would drop ours as well.
        self._connect_args: dict[str, Any] = {
            "autocommit": True,
            "prepare_threshold": None,
            **pg_connect_args(timeout),
        }
        # Without a budget, one of its own, closed with it.
        self._own_budget = budget is None
        if budget is None:
            budget = ConnectionBudget(max_size, wait=max(timeout, 1.0) if timeout > 0 else 30.0)
        # The server ends a statement at ``timeout``; one that does not answer for a moment
        # longer is not going to (frozen, or gone with the network still taking the bytes).
        hold = timeout + HOLD_MARGIN_SECONDS if timeout > 0 else None
        self.pool = ConnectionPool(
            budget, conninfo, self._connect, max_size=max_size, hold_limit=hold
        )
        self._session_sql = pg_session_limits(timeout)
        self._batch: list[_Batched] = []
        self._flushing: set[asyncio.Task[None]] = set()
        # Batches and lone statements on their way, until their callers are answered (see
        # ``batched``).
        self._in_flight = 0
        self._prepare = True
        # Which batched statements each connection has prepared (a connection that is
        # closed and collected leaves the map by itself).
        self._prepared_on: weakref.WeakKeyDictionary[AsyncConnection[Any], set[str]] = (
            weakref.WeakKeyDictionary()
        )

    async def _connect(self) -> AsyncConnection[Any]:
        from psycopg import AsyncConnection, OperationalError

        try:
            conn = await AsyncConnection.connect(self._conninfo, **self._connect_args)
        except OperationalError as exc:
            # The server answers, the database is gone (a connection's error has no SQLSTATE).
            if _DATABASE_MISSING.search(str(exc)):
                raise TenantDatabaseMissingError() from None
            raise
        try:
            for statement in self._session_sql:
                await conn.execute(statement)
        except BaseException:
            await conn.close()
            raise
        return conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.pool.connection() as conn, conn.transaction():
            yield _PgTx(conn)

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[Tx]:
        async with self.pool.connection() as conn:
            yield _PgTx(conn)

    async def batched(self, sql: str, params: Sequence[Any], *, durable: bool = True) -> Row | None:
        """Group commit: statements submitted while another batch is on its way, or in the
        same turn of the event loop, share one transaction, sent in one message, so a commit
        (and its WAL flush) serves many runs. A statement with nothing waiting and nothing on
        its way goes alone, at once (see below); those submitted meanwhile form the next
        batch, sent concurrently with it: statements of one turn get neither one transaction
        nor an order between them (each caller awaits its own). The transaction commits
        asynchronously only if none of its statements is durable.

        A caller cancelled while its statement is on its way: a batch's transaction goes on
        for the others; a lone statement is cancelled on the server (psycopg), so it may or
        may not have committed, as with any interrupted statement."""
        future: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        item = _Batched(sql, params, future, durable)
        if not self._batch and not self._in_flight:
            # Nothing waiting and nothing on its way: no statement to share this commit with,
            # so it goes at once, from the caller's task, two turns of the event loop sooner.
            self._in_flight += 1
            try:
                async with self.pool.connection() as conn:
                    return (await self._run_batch(conn, [item]))[0]
            finally:
                self._in_flight -= 1
        self._batch.append(item)
        if len(self._batch) == 1:
            # A fresh context: the group commit serves many runs, not the caller's.
            asyncio.get_running_loop().call_soon(self._start_flush, context=Context())
        return await future

    def _start_flush(self) -> None:
        batch, self._batch = self._batch, []
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self, batch: list[_Batched]) -> None:
        outcomes: list[tuple[Row | None, Exception | None]]
        try:
            async with self.pool.connection() as conn:
                try:
                    outcomes = [(row, None) for row in await self._run_batch(conn, batch)]
                except Exception:
                    if len(batch) == 1 or conn.broken:
                        raise  # a connection lost fails them all (StoreUnavailableError)
                    # One statement failed the shared transaction (a deadlock between two
                    # batches, say): run each on its own so only the guilty one fails.
                    outcomes = []
                    for item in batch:
                        try:
                            cur = await conn.execute(_pg_sql(item.sql), item.params)
                            outcomes.append((await cur.fetchone(), None))
                        except Exception as exc:
                            outcomes.append((None, exc))
        except BaseException as exc:
            self._in_flight -= 1
            for item in batch:
                _settle(item.future, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        # Done before the callers resume (the task itself ends a turn later): the next
        # statement of a caller that waited for this one finds nothing on its way.
        self._in_flight -= 1
        for item, (row, error) in zip(batch, outcomes, strict=True):
            _settle(item.future, result=row, error=error)

    async def _run_batch(
        self, conn: AsyncConnection[Any], batch: list[_Batched], *, again: bool = False
    ) -> list[Row | None]:
        # One simple-protocol message with the statements bound client side: PostgreSQL runs
        # a multi-statement message as one implicit transaction (a single statement as its
        # own), and this costs a third of the CPU of the pipeline protocol per statement.
        # Each statement is sent as EXECUTE of a statement prepared once per connection:
        # the server parses and plans it once, not in every batch (docs/benchmarks.md).
        from psycopg import AsyncClientCursor
        from psycopg.errors import InvalidSqlStatementName

        durable = any(item.durable for item in batch)
        if len(batch) == 1 and durable and _has_large_bytes(batch[0].params):
            # Its own transaction, with the values as parameters: a large binary value goes
            # as itself, not hex-encoded into the text at twice its size.
            cur = await conn.execute(_pg_sql(batch[0].sql), batch[0].params)
            return [await cur.fetchone()]
        names = await self._prepared(conn, {item.sql for item in batch})
        client = AsyncClientCursor(conn)
        try:
            text = ";".join(
                client.mogrify(_execute_sql(names[i.sql], len(i.params)), i.params)
                if i.sql in names
                else client.mogrify(_pg_sql(i.sql), i.params)
                for i in batch
            )
            if not durable:
                text = f"SET LOCAL synchronous_commit TO OFF;{text}"
            try:
                await client.execute(text)
            except InvalidSqlStatementName:
                # The session lost statements it had prepared (DEALLOCATE ALL, or a pooler
                # in transaction mode that hands each transaction another server session).
                # Nothing ran: the message is one transaction. Prepare again once; if that
                # does not hold either, it is a pooler: plain statements from now on.
                if not names:
                    raise
                self._prepared_on.pop(conn, None)
                if again:
                    log.warning("prepared statements do not last; sending them plain")
                    self._prepare = False
                return await self._run_batch(conn, batch, again=True)
            if not durable:
                client.nextset()  # past the SET
            rows: list[Row | None] = [await client.fetchone()]
            while client.nextset():
                rows.append(await client.fetchone())
        finally:
            await client.close()
        return rows

    async def _prepared(self, conn: AsyncConnection[Any], texts: set[str]) -> dict[str, str]:
        """The names under which ``texts`` are prepared on ``conn``, preparing those not yet
        (once per connection). Statements given to ``batched`` are few and fixed; past
        ``MAX_PREPARED`` texts, or where the server cannot type a parameter, a statement is
        sent plain."""
        from psycopg import Error
        from psycopg.errors import (
            AmbiguousFunction,
            AmbiguousParameter,
            DuplicatePreparedStatement,
            IndeterminateDatatype,
        )

        if not self._prepare:
            return {}
        done = self._prepared_on.setdefault(conn, set())
        for sql in texts - done - _UNPREPARABLE:
            name = _statement_name(sql)
            if name is None:
                continue
            try:
                await conn.execute(f"PREPARE {name} AS {_dollar_sql(sql)}")
            except DuplicatePreparedStatement:
                pass  # the same name is the same text: prepared already
            except (IndeterminateDatatype, AmbiguousParameter, AmbiguousFunction) as exc:
                _UNPREPARABLE.add(sql)
                log.warning("statement sent plain: not preparable", error=type(exc).__name__)
                continue
            except Error:
                continue  # this time plain; the next batch tries again
            done.add(sql)
        return {t: name for t in texts if t in done and (name := _statement_name(t)) is not None}

    async def close(self) -> None:
        for task in list(self._flushing):
            await task
        # A shared budget keeps the idle connections, for the next store of this database
        # (or another's, when it is full); a caller still holding this one keeps working.
        if self._own_budget:
            await self.pool.budget.close()


@dataclass(frozen=True, slots=True)
class _Batched:
    sql: str
    params: Sequence[Any]
    future: asyncio.Future[Row | None]
    durable: bool


def _settle(
    future: asyncio.Future[Row | None],
    *,
    result: Row | None = None,
    error: BaseException | None = None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
