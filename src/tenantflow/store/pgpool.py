"""PostgreSQL connections under one budget for many databases.

A process may reach hundreds of tenant databases; each one's pool draws its connections from
one :class:`ConnectionBudget`, so the process never holds more than the budget, however many
tenants it touches. A pool holds nothing while its tenant is idle (no minimum size), and when
the budget is full a new connection takes the place of the least recently used idle one, of
whichever database. A caller that finds every connection busy waits its turn (first come,
first served) up to the budget's ``wait``, then gets :class:`DatabaseBusyError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tenantflow.errors import DatabaseBusyError

if TYPE_CHECKING:
    from psycopg import AsyncConnection


class ConnectionBudget:
    """At most ``limit`` connections open (or being opened) at once across its pools."""

    def __init__(self, limit: int, *, wait: float) -> None:
        if limit < 1:
            raise ValueError("a connection budget needs at least one connection")
        self.limit = limit
        self.wait = wait
        self.open = 0
        self.peak = 0
        # Idle connections of every pool, least recently returned first: the ones to close
        # when another database needs the room.
        self._idle: OrderedDict[AsyncConnection[Any], ConnectionPool] = OrderedDict()
        self._waiters: deque[tuple[ConnectionPool, asyncio.Future[AsyncConnection[Any] | None]]]
        self._waiters = deque()
        self._owner: dict[AsyncConnection[Any], ConnectionPool] = {}  # open connections
        self._closing: set[asyncio.Task[None]] = set()

    async def _checkout(self, pool: ConnectionPool, deadline: float) -> AsyncConnection[Any]:
        if not self._waiters:
            if pool.idle:
                conn = pool.idle.pop()
                del self._idle[conn]
                return conn if _usable(conn) else await self._reopen(pool, conn)
            if self.open < self.limit:
                self.open += 1
                self.peak = max(self.peak, self.open)
                return await self._reopen(pool, None)
            if self._idle:
                victim, owner = self._idle.popitem(last=False)
                owner.idle.remove(victim)
                return await self._reopen(pool, victim)
        # Every connection is busy (or others wait already): wait for one to be handed over.
        future: asyncio.Future[AsyncConnection[Any] | None] = (
            asyncio.get_running_loop().create_future()
        )
        entry = (pool, future)
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
        if handed is not None and handed in pool.conns and _usable(handed):
            return handed
        return await self._reopen(pool, handed)

    async def _reopen(
        self, pool: ConnectionPool, old: AsyncConnection[Any] | None
    ) -> AsyncConnection[Any]:
        """In a slot already taken, close ``old`` (another database's, or one not usable)
        before opening a connection for ``pool``: the server never sees more than the
        budget. The slot is handed on if this fails."""
        try:
            if old is not None:
                self._forget(old)
                await _close(old)
            conn = await pool.connect()
        except BaseException:
            self._hand_on(None)
            raise
        self._owner[conn] = pool
        pool.conns.add(conn)
        return conn

    def _forget(self, conn: AsyncConnection[Any]) -> None:
        owner = self._owner.pop(conn, None)
        if owner is not None:
            owner.conns.discard(conn)

    def checkin(self, pool: ConnectionPool, conn: AsyncConnection[Any]) -> None:
        """A connection comes back: to the first waiter, else idle; closed instead if it is
        not usable or its pool is closed (its slot goes on once it is)."""
        if pool.closed or not _usable(conn):
            self._retire(conn)
        else:
            self._hand_on(conn)

    def _next_waiter(
        self,
    ) -> tuple[ConnectionPool, asyncio.Future[AsyncConnection[Any] | None]] | None:
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        return self._waiters[0] if self._waiters else None

    def _hand_on(self, conn: AsyncConnection[Any] | None) -> None:
        """Give a slot (with the connection in it, or None) to the first waiter, else free
        it: a waiter of another database closes the connection and opens its own."""
        waiter = self._next_waiter()
        if waiter is not None:
            self._waiters.popleft()
            waiter[1].set_result(conn)
            return
        if conn is None:
            self.open -= 1
            return
        owner = self._owner.get(conn)
        if owner is not None and not owner.closed and _usable(conn):
            owner.idle.append(conn)
            self._idle[conn] = owner
        else:
            self._retire(conn)

    def release_idle(self, pool: ConnectionPool) -> None:
        """Close a pool's idle connections, handing their slots on."""
        while pool.idle:
            conn = pool.idle.pop()
            self._idle.pop(conn, None)
            self._retire(conn)

    def _retire(self, conn: AsyncConnection[Any]) -> None:
        """Close ``conn``, then hand its slot on (not before: the server would see one more
        than the budget meanwhile)."""
        self._forget(conn)
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

    async def closed(self) -> None:
        """Wait until connections being closed are."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


async def _close(conn: AsyncConnection[Any]) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


def _usable(conn: AsyncConnection[Any]) -> bool:
    from psycopg.pq import TransactionStatus

    # Anything but idle (a statement cut off by a cancellation, a broken link) is not trusted.
    return not conn.closed and conn.pgconn.transaction_status == TransactionStatus.IDLE


class ConnectionPool:
    """Connections to one database, at most ``max_size`` in use at once, drawn from a
    budget."""

    def __init__(
        self,
        budget: ConnectionBudget,
        connect: Callable[[], Awaitable[AsyncConnection[Any]]],
        *,
        max_size: int,
    ) -> None:
        self.budget = budget
        self.connect = connect
        self.idle: list[AsyncConnection[Any]] = []  # the most recently returned last
        self.conns: set[AsyncConnection[Any]] = set()
        self.closed = False
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
            conn = await self.budget._checkout(self, deadline)
            try:
                yield conn
            finally:
                self.budget.checkin(self, conn)
        finally:
            self._in_use.release()

    async def close(self) -> None:
        """Close the idle connections now, and those in use when they come back. A caller that
        still holds the store afterwards gets a connection as before (closed after its use):
        a store evicted from the router's cache may be closed at once."""
        self.closed = True
        self.budget.release_idle(self)
        await self.budget.closed()
