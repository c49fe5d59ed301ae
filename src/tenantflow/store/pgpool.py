"""PostgreSQL connections under one budget for many databases.

A process may reach hundreds of tenant databases; each one's pool draws its connections from
one :class:`ConnectionBudget`, so the process never holds more than the budget, however many
tenants it touches. Idle connections belong to the budget, by database: a pool holds nothing
while its tenant is idle, a store closed and opened again (evicted from the router's cache, a
sweep's) finds its database's idle connections still there, and when the budget is full a new
connection takes the place of the least recently used idle one, of whichever database. Idle
connections are closed after ``IDLE_SECONDS``. A caller that finds every connection busy waits
its turn (first come, first served) up to the budget's ``wait``, then gets
:class:`DatabaseBusyError`.

Database faults: a connection on which a statement failed, or that psycopg says is broken, is
closed, never reused; one found broken (the server restarted, or ended the session) takes the
idle connections of its database with it, since they are as likely dead. An idle connection
is also checked when it is taken (without a round trip: a server that went away has left it
readable), so the first call after a restart gets a fresh connection. Opening a connection
counts against the same wait, and a server that refuses, or does not answer in time, is a
:class:`StoreUnavailableError`, as is a connection lost under a statement: never a driver's
exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tenantflow.backends import reason
from tenantflow.errors import ConfigError, DatabaseBusyError, StoreUnavailableError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

IDLE_SECONDS = 60.0


class ConnectionBudget:
    """At most ``limit`` connections open (or being opened) at once across its pools."""

    def __init__(self, limit: int, *, wait: float) -> None:
        if limit < 1:
            raise ConfigError("a connection budget needs at least one connection")
        self.limit = limit
        self.wait = wait
        self.open = 0
        self.peak = 0
        # Idle connections of every database, least recently returned first (the ones to
        # close when another database needs the room), with their database and since when.
        self._idle: OrderedDict[AsyncConnection[Any], tuple[str, float]] = OrderedDict()
        self._idle_of: dict[str, list[AsyncConnection[Any]]] = {}  # most recent last
        self._database: dict[AsyncConnection[Any], str] = {}  # of every open connection
        self._waiters: deque[tuple[str, asyncio.Future[AsyncConnection[Any] | None]]]
        self._waiters = deque()
        self._closing: set[asyncio.Task[None]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False

    async def checkout(self, pool: ConnectionPool, deadline: float) -> AsyncConnection[Any]:
        self._expire()
        if not self._waiters:
            idle = self._idle_of.get(pool.database)
            if idle:
                conn = self._take_idle(idle[-1])
                if _alive(conn):
                    return conn
                # The server has gone away since it was used (a restart, say): so have the
                # others of this database, most likely.
                self.discard(pool.database)
                return await self._reopen(pool, conn, deadline)
            if self.open < self.limit:
                self.open += 1
                self.peak = max(self.peak, self.open)
                return await self._reopen(pool, None, deadline)
            if self._idle:
                return await self._reopen(pool, self._take_idle(next(iter(self._idle))), deadline)
        # Every connection is busy (or others wait already): wait for one to be handed over.
        future: asyncio.Future[AsyncConnection[Any] | None] = (
            asyncio.get_running_loop().create_future()
        )
        entry = (pool.database, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout_at(deadline):
                handed = await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                # Handed over just as the wait ended: pass it on rather than lose the slot.
                self._hand_on(future.result())
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            if isinstance(exc, TimeoutError):
                raise DatabaseBusyError() from None
            raise
        if handed is not None and self._database.get(handed) == pool.database and _alive(handed):
            return handed
        return await self._reopen(pool, handed, deadline)

    def checkin(self, conn: AsyncConnection[Any], *, failed: bool = False) -> None:
        """A connection comes back: to the first waiter, else idle; closed instead if a
        statement ``failed`` on it or it is not usable (its slot goes on once it is). A broken
        one closes the idle connections of its database too."""
        database = self._database.get(conn)
        if conn.broken and database is not None:
            self._retire(conn)
            self.discard(database)
        elif failed or not _usable(conn):
            self._retire(conn)
        else:
            self._hand_on(conn)

    def discard(self, database: str) -> None:
        """Close the idle connections of ``database`` (it is going away)."""
        for conn in list(self._idle_of.get(database, ())):
            self._retire(self._take_idle(conn))

    async def close(self) -> None:
        """Close every idle connection, and from now on each connection when it comes back
        (the budget stays usable, for callers that still hold a store)."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conn in list(self._idle):
            self._retire(self._take_idle(conn))
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def _take_idle(self, conn: AsyncConnection[Any]) -> AsyncConnection[Any]:
        database, _ = self._idle.pop(conn)
        idle = self._idle_of[database]
        idle.remove(conn)
        if not idle:
            del self._idle_of[database]
        return conn

    def _expire(self) -> None:
        self._expiry = None
        cutoff = time.monotonic() - IDLE_SECONDS
        while self._idle:
            conn, (_, since) = next(iter(self._idle.items()))
            if since > cutoff:
                # A process gone quiet closes its connections too, without a caller's help.
                self._expiry = asyncio.get_running_loop().call_later(since - cutoff, self._expire)
                break
            self._retire(self._take_idle(conn))

    async def _reopen(
        self, pool: ConnectionPool, old: AsyncConnection[Any] | None, deadline: float
    ) -> AsyncConnection[Any]:
        """In a slot already taken, close ``old`` (another database's, or one not usable)
        before opening a connection for ``pool``, by ``deadline``: the server never sees more
        than the budget. The slot is handed on if this fails."""
        try:
            if old is not None:
                self._database.pop(old, None)
                await _close(old)
            async with asyncio.timeout_at(deadline):
                conn = await pool.connect()
        except TimeoutError:
            self._hand_on(None)
            raise StoreUnavailableError(
                f"the database did not accept a connection within {self.wait:g} s"
            ) from None
        except StoreUnavailableError:  # the connection's own finding (a database gone)
            self._hand_on(None)
            raise
        except Exception as exc:
            self._hand_on(None)
            raise StoreUnavailableError(f"the database did not answer: {reason(exc)}") from exc
        except BaseException:
            self._hand_on(None)
            raise
        self._database[conn] = pool.database
        return conn

    def _hand_on(self, conn: AsyncConnection[Any] | None) -> None:
        """Give a slot (with the connection in it, or None) to the first waiter, else free
        it: a waiter of another database closes the connection and opens its own."""
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(conn)
                return
        if conn is None:
            self.open -= 1
            return
        database = self._database.get(conn)
        if database is None or self._closed or not _usable(conn):
            self._retire(conn)
            return
        self._idle[conn] = (database, time.monotonic())
        self._idle_of.setdefault(database, []).append(conn)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._expire)

    def _retire(self, conn: AsyncConnection[Any]) -> None:
        """Close ``conn``, then hand its slot on (not before: the server would see one more
        than the budget meanwhile)."""
        self._database.pop(conn, None)
        if conn.closed:
            self._hand_on(None)
            return

        async def close() -> None:
            try:
                await _close(conn)
            finally:
                self._hand_on(None)

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def _close(conn: AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


def _usable(conn: AsyncConnection[Any]) -> bool:
    from psycopg.pq import TransactionStatus

    # Anything but idle (a statement cut off by a cancellation, a broken link) is not trusted.
    return not conn.closed and conn.pgconn.transaction_status == TransactionStatus.IDLE


def _alive(conn: AsyncConnection[Any]) -> bool:
    """Usable, and not readable: nothing should arrive on a connection at rest, and a server
    that shut down or restarted has sent its goodbye (an error, then the end of the stream),
    which this sees without a round trip. (A server gone from the network is not seen here;
    the first statement fails, and takes its database's idle connections with it.)"""
    if not _usable(conn):
        return False
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return not readable


def _cut(conn: AsyncConnection[Any], cut: list[bool]) -> None:
    """End the connection's socket for both directions (its file descriptor stays psycopg's):
    a statement waiting for an answer sees the end of the stream at once, and the connection
    is broken. Cancelling the statement instead would wait on the frozen server as well."""
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
        cut.append(True)


class ConnectionPool:
    """Connections to ``database`` (its conninfo), at most ``max_size`` in use at once by
    this pool, drawn from a budget. A caller that holds a connection longer than
    ``hold_limit`` (a server that stopped answering: frozen, or its host gone while the
    network still takes the bytes) has it cut, and gets :class:`StoreUnavailableError`."""

    def __init__(
        self,
        budget: ConnectionBudget,
        database: str,
        connect: Callable[[], Awaitable[AsyncConnection[Any]]],
        *,
        max_size: int,
        hold_limit: float | None = None,
    ) -> None:
        self.budget = budget
        self.database = database
        self.connect = connect
        self.hold_limit = hold_limit
        self._in_use = asyncio.Semaphore(max_size)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        deadline = asyncio.get_running_loop().time() + self.budget.wait
        try:
            async with asyncio.timeout_at(deadline):
                await self._in_use.acquire()
        except TimeoutError:
            raise DatabaseBusyError() from None
        try:
            conn = await self.budget.checkout(self, deadline)
            cut: list[bool] = []
            timer = None
            if self.hold_limit is not None:
                timer = asyncio.get_running_loop().call_later(self.hold_limit, _cut, conn, cut)
            try:
                yield conn
            except BaseException as exc:
                from psycopg import Error

                if timer is not None:
                    timer.cancel()
                self.budget.checkin(conn, failed=isinstance(exc, Error))
                if isinstance(exc, Error) and cut:
                    raise StoreUnavailableError(
                        f"the database did not answer within {self.hold_limit:g} s"
                    ) from None
                if isinstance(exc, Error) and conn.broken:
                    # The server went away under the statement (a shutdown, a restart, a
                    # session ended): whether it took effect is unknown, as with any
                    # interrupted statement.
                    raise StoreUnavailableError(
                        f"the database connection was lost: {reason(exc)}"
                    ) from exc
                raise
            else:
                if timer is not None:
                    timer.cancel()
                self.budget.checkin(conn)
        finally:
            self._in_use.release()
