"""The embedded queue: a table in one SQLite file, shared by every process on the machine.

A message is *ready* when ``available_at <= now``. A dequeue leases it by moving
``available_at`` to the end of the visibility timeout (as SQS does), so a lease that ends
without an ack makes the message ready again with no sweeper needed.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from tenantflow import _sqlite
from tenantflow.coordination import LocalCoordination
from tenantflow.errors import NotFoundError
from tenantflow.queue.base import DeadLetter, Envelope, Epoch, Message, QueueStats
from tenantflow.queue.fairness import Turn, shares, weight_of

SQLITE_MAX_INTEGER = 2**63 - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    enqueued_at REAL NOT NULL,
    trace TEXT
);
CREATE INDEX IF NOT EXISTS ix_messages_ready ON messages (tenant_id, priority DESC, available_at);
CREATE INDEX IF NOT EXISTS ix_messages_run ON messages (tenant_id, run_id);
CREATE INDEX IF NOT EXISTS ix_messages_due ON messages (tenant_id, available_at);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    trace TEXT,
    reason TEXT,
    parked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ix_dead_letters_tenant ON dead_letters (tenant_id, id);
"""
# Columns added since the first queue files, for files made before them.
ADDED_COLUMNS = (
    ("messages", "trace", "TEXT"),
    ("dead_letters", "trace", "TEXT"),
    ("dead_letters", "reason", "TEXT"),
    ("dead_letters", "parked", "INTEGER NOT NULL DEFAULT 0"),
)
# After the columns exist (in an old file, only once they were added).
INDEXES = """
CREATE INDEX IF NOT EXISTS ix_dead_letters_parked ON dead_letters (tenant_id, run_id)
    WHERE parked = 1;
"""

# Tenants with a ready message: a loose index scan over the tenants with any message, each
# looked up by its earliest ``available_at`` (index probes, not a scan of the messages).
SQL_READY_TENANTS = """
WITH RECURSIVE t(tenant_id) AS (
    SELECT MIN(tenant_id) FROM messages
    UNION ALL
    SELECT (SELECT MIN(tenant_id) FROM messages WHERE tenant_id > t.tenant_id)
    FROM t WHERE t.tenant_id IS NOT NULL
)
SELECT tenant_id FROM t WHERE tenant_id IS NOT NULL
    AND (SELECT MIN(available_at) FROM messages m WHERE m.tenant_id = t.tenant_id) <= ?
"""
DISPATCH_LOOK = 16  # tenants one dequeue may look at beyond its free slots (as on Redis)
NEWCOMER_LEAD = 1 / 1024  # how far ahead of the front a tenant new to the ready set goes
SQL_READY_OF_TENANT = (
    "SELECT id, run_id, priority, deliveries, trace FROM messages "
    "WHERE tenant_id = ? AND available_at <= ? ORDER BY priority DESC, available_at, id LIMIT ?"
)

Row = tuple[int, str, int, int, str | None]  # SQL_READY_OF_TENANT's columns

SQL_DEAD_LETTER = (
    "INSERT INTO dead_letters (id, tenant_id, run_id, priority, deliveries, failed_at, trace, "
    "reason, parked) SELECT id, tenant_id, run_id, priority, deliveries, ?, trace, ?, ? "
    "FROM messages WHERE id = ?"
)

SQL_INSERT = (
    "INSERT INTO messages (tenant_id, run_id, priority, available_at, enqueued_at, trace) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
EPOCH = Epoch("embedded")  # kept on the disk of the tenant databases: never lost apart


class SqliteQueue:
    """See :mod:`tenantflow.queue.base` for the semantics."""

    def __init__(
        self,
        path: Path,
        *,
        max_deliveries: int = 10,
        synchronous: str = "NORMAL",
        tenant_max_inflight: int = 0,
    ) -> None:
        self.path = path
        self.max_deliveries = max_deliveries
        self.tenant_max_inflight = tenant_max_inflight
        self._conn = _sqlite.connect(path, synchronous=synchronous)
        self._conn.executescript(SCHEMA)
        for table, column, kind in ADDED_COLUMNS:
            columns = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                try:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
        self._conn.executescript(INDEXES)
        # Tenant -> its pass in the round robin (``fairness``), while it has ready messages;
        # a tenant new to the ready set goes just ahead of the front, as on Redis.
        self._pass: dict[str, float] = {}
        self._wakeup = asyncio.Event()

    async def enqueue(
        self,
        tenant_id: str,
        run_id: str,
        *,
        delay: float = 0.0,
        priority: int = 0,
        trace: str | None = None,
    ) -> str:
        now = time.time()
        with _sqlite.transaction(self._conn) as cur:
            cur.execute(
                SQL_INSERT, (tenant_id, run_id, priority, now + max(0.0, delay), now, trace)
            )
            message_id = str(cur.lastrowid)
        if delay <= 0:
            self._wakeup.set()
        return message_id

    async def enqueue_many(self, batch: Mapping[str, Sequence[Envelope]]) -> None:
        now = time.time()
        rows = [
            (tenant_id, e.run_id, e.priority, now + max(0.0, e.delay), now, e.trace)
            for tenant_id, envelopes in batch.items()
            for e in envelopes
        ]
        if not rows:
            return
        with _sqlite.transaction(self._conn) as cur:
            cur.executemany(SQL_INSERT, rows)
        if any(e.delay <= 0 for envelopes in batch.values() for e in envelopes):
            self._wakeup.set()

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
        if max_messages <= 0:
            return []
        now = time.time()
        out: list[Message] = []
        with _sqlite.transaction(self._conn) as cur:
            ready_now = [r[0] for r in cur.execute(SQL_READY_TENANTS, (now,)) if r[0] not in skip]
            if not ready_now:
                self._pass.clear()
                return []
            known = [self._pass[t] for t in ready_now if t in self._pass]
            newcomer = min(known, default=0.0) - NEWCOMER_LEAD
            passes = {t: self._pass.get(t, newcomer) for t in ready_now}
            order = sorted(ready_now, key=passes.__getitem__)[: max_messages + DISPATCH_LOOK]
            last = passes[order[-1]]
            ready: dict[str, list[Row]] = {}
            for t in order:
                room = self._room(cur, t, now, max_messages, (caps or {}).get(t))
                if room == 0:  # at its cap: ready still, but behind the tenants looked at
                    passes[t] = last + 1 / weight_of(weights, t)
                else:
                    ready[t] = cur.execute(SQL_READY_OF_TENANT, (t, now, room)).fetchall()
            picked = _share_out(ready, passes, weights, max_messages)
            self._pass = passes
            until = now + visibility_timeout
            for tenant, (mid, run_id, priority, deliveries, trace) in picked:
                if deliveries >= self.max_deliveries:
                    times = "time" if deliveries == 1 else "times"
                    reason = f"delivered {deliveries} {times} without being acknowledged"
                    _dead_letter(cur, mid, reason, parked=False, now=now)
                    continue
                receipt = f"{consumer}:{secrets.token_hex(6)}"
                cur.execute(
                    "UPDATE messages SET available_at = ?, deliveries = deliveries + 1, "
                    "receipt = ? WHERE id = ?",
                    (until, receipt, mid),
                )
                out.append(
                    Message(
                        id=str(mid),
                        tenant_id=tenant,
                        run_id=run_id,
                        priority=priority,
                        deliveries=deliveries + 1,
                        receipt=receipt,
                        trace=trace,
                    )
                )
        return out

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
        await self.wait(timeout)
        return await self.dequeue(
            consumer, max_messages, visibility_timeout, weights=weights, caps=caps, skip=skip
        )

    async def extend(self, messages: Sequence[Message], visibility_timeout: float) -> None:
        if not messages:
            return
        until = time.time() + visibility_timeout
        with _sqlite.transaction(self._conn) as cur:
            cur.executemany(
                "UPDATE messages SET available_at = ? WHERE id = ? AND receipt = ?",
                [(until, int(m.id), m.receipt) for m in messages],
            )

    async def ack(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        with _sqlite.transaction(self._conn) as cur:
            cur.executemany(
                "DELETE FROM messages WHERE id = ? AND receipt = ?",
                [(int(m.id), m.receipt) for m in messages],
            )

    async def retry_later(
        self, message: Message, delay: float, *, count_delivery: bool = True
    ) -> None:
        now = time.time()
        with _sqlite.transaction(self._conn) as cur:
            moved = cur.execute(
                "UPDATE messages SET available_at = ?, receipt = NULL, "
                "deliveries = CASE WHEN ? THEN deliveries ELSE 0 END "
                "WHERE id = ? AND receipt = ?",
                (now + max(0.0, delay), count_delivery, int(message.id), message.receipt),
            ).rowcount
            if not moved and not _exists(cur, int(message.id)):  # lost: a new one in its place
                cur.execute(
                    "INSERT INTO messages (tenant_id, run_id, priority, available_at, "
                    "enqueued_at, trace, deliveries) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        message.tenant_id,
                        message.run_id,
                        message.priority,
                        now + max(0.0, delay),
                        now,
                        message.trace,
                        message.deliveries if count_delivery else 0,
                    ),
                )
        if delay <= 0:
            self._wakeup.set()

    async def stats(self, tenant_id: str) -> QueueStats:
        return (await self.stats_many([tenant_id]))[tenant_id]

    async def stats_many(self, tenant_ids: Sequence[str]) -> dict[str, QueueStats]:
        messages = {
            tenant: (int(depth), oldest)
            for tenant, depth, oldest in self._conn.execute(
                "SELECT tenant_id, COUNT(*), MIN(enqueued_at) FROM messages GROUP BY tenant_id"
            )
        }
        dead = dict(
            self._conn.execute("SELECT tenant_id, COUNT(*) FROM dead_letters GROUP BY tenant_id")
        )
        out = {}
        for tenant_id in tenant_ids:
            depth, oldest = messages.get(tenant_id, (0, None))
            out[tenant_id] = QueueStats(
                depth=depth, dead_letters=int(dead.get(tenant_id, 0)), oldest_at=oldest
            )
        return out

    async def purge(self, tenant_id: str) -> None:
        with _sqlite.transaction(self._conn) as cur:
            cur.execute("DELETE FROM messages WHERE tenant_id = ?", (tenant_id,))
            cur.execute("DELETE FROM dead_letters WHERE tenant_id = ?", (tenant_id,))

    async def dead_letter(self, message: Message, reason: str) -> None:
        with _sqlite.transaction(self._conn) as cur:
            current = cur.execute(
                "SELECT 1 FROM messages WHERE id = ? AND receipt = ?",
                (int(message.id), message.receipt),
            ).fetchone()
            if current is not None:
                _dead_letter(cur, int(message.id), reason, parked=True, now=time.time())

    async def dead_letters(self, tenant_id: str, limit: int = 100) -> list[DeadLetter]:
        rows = self._conn.execute(
            "SELECT id, run_id, deliveries, failed_at, reason, parked FROM dead_letters "
            "WHERE tenant_id = ? ORDER BY id LIMIT ?",
            (tenant_id, limit),
        ).fetchall()
        return [
            DeadLetter(
                id=str(r[0]),
                tenant_id=tenant_id,
                run_id=r[1],
                deliveries=r[2],
                failed_at=r[3],
                reason=r[4],
                parked=bool(r[5]),
            )
            for r in rows
        ]

    async def replay_dead_letter(self, tenant_id: str, dead_letter_id: str) -> None:
        missing = NotFoundError(f"no dead letter {dead_letter_id} in this tenant")
        # Ids here are SQLite row ids: anything else names no dead letter, as a missing one.
        number = dead_letter_id.isascii() and dead_letter_id.isdigit()  # "²".isdigit() too
        if not number or int(dead_letter_id) > SQLITE_MAX_INTEGER:
            raise missing
        with _sqlite.transaction(self._conn) as cur:
            row = cur.execute(
                "DELETE FROM dead_letters WHERE id = ? AND tenant_id = ? "
                "RETURNING run_id, priority, trace",
                (_row_id(dead_letter_id), tenant_id),
            ).fetchone()
            if row is None:
                raise missing
            now = time.time()
            cur.execute(SQL_INSERT, (tenant_id, row[0], row[1], now, now, row[2]))
        self._wakeup.set()

    def _room(
        self, cur: sqlite3.Cursor, tenant_id: str, now: float, wanted: int, cap: int | None
    ) -> int:
        """How many messages the tenant may still take under its cap of messages in flight
        (its own, else the queue's)."""
        cap = self.tenant_max_inflight if cap is None else cap
        if cap == 0:  # no cap (below 0: none may be taken)
            return wanted
        leased: tuple[int] = cur.execute(
            "SELECT COUNT(*) FROM messages WHERE tenant_id = ? AND receipt IS NOT NULL "
            "AND available_at > ?",
            (tenant_id, now),
        ).fetchone()
        return max(0, min(wanted, cap - int(leased[0])))

    async def live(self, tenant_id: str, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        marks = ",".join("?" * len(run_ids))
        rows = self._conn.execute(
            f"SELECT run_id FROM messages WHERE tenant_id = ? AND run_id IN ({marks}) UNION "
            f"SELECT run_id FROM dead_letters WHERE tenant_id = ? AND parked = 1 "
            f"AND run_id IN ({marks})",
            (tenant_id, *run_ids, tenant_id, *run_ids),
        ).fetchall()
        return {r[0] for r in rows}

    async def try_lock(self, name: str, owner: str, ttl: float) -> bool:
        now = time.time()
        with _sqlite.transaction(self._conn) as cur:
            row = cur.execute(
                "INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at "
                "WHERE locks.owner = excluded.owner OR locks.expires_at < ? RETURNING owner",
                (name, owner, now + ttl, now),
            ).fetchone()
        return row is not None

    async def depth(self, tenant_id: str) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM messages WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        return int(row[0])

    async def wait(self, timeout: float) -> None:
        # Other processes cannot set this event: for them the timeout is the poll interval.
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass
        self._wakeup.clear()

    async def epoch(self) -> Epoch:
        return EPOCH

    def coordination(self) -> LocalCoordination:
        return LocalCoordination()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._conn.close()


def _dead_letter(
    cur: sqlite3.Cursor, message_id: int, reason: str, *, parked: bool, now: float
) -> None:
    cur.execute(SQL_DEAD_LETTER, (now, reason, parked, message_id))
    cur.execute("DELETE FROM messages WHERE id = ?", (message_id,))


def _share_out(
    ready: dict[str, list[Row]],
    passes: dict[str, float],
    weights: Mapping[str, int] | None,
    budget: int,
) -> list[tuple[str, Row]]:
    """Up to ``budget`` of the tenants' ready rows (given in the order of their pass), each
    tenant its share (``fairness.shares``), moving its pass on by what it took; what a tenant
    cannot take (at its cap, no more ready) goes to the others in another round."""
    picked: list[tuple[str, Row]] = []
    turn = list(ready)
    while len(picked) < budget and turn:
        want = shares(
            budget - len(picked), [Turn(t, weight_of(weights, t), passes[t]) for t in turn]
        )
        next_turn = []
        for t in turn:
            rows, ready[t] = ready[t][: want[t]], ready[t][want[t] :]
            picked.extend((t, row) for row in rows)
            passes[t] += len(rows) / weight_of(weights, t)
            if len(rows) == want[t] and ready[t]:  # took its share and has more
                next_turn.append(t)
        turn = next_turn
    return picked


def _exists(cur: sqlite3.Cursor, message_id: int) -> bool:
    return cur.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is not None


def _row_id(value: str) -> int:
    """An id from outside as a rowid; a malformed one (not an integer SQLite can hold) is a
    missing one (0, which no row has), as on Redis."""
    if value.isascii() and value.isdigit() and int(value) < 2**63:
        return int(value)
    return 0
