"""SQLite plumbing shared by the embedded backends (run store, queue, tenant registry).

Statements run on the event loop's thread: each is a few microseconds on a local file, far
less than a hop to a worker thread would cost. Write transactions start with
``BEGIN IMMEDIATE`` so that two processes never deadlock upgrading a read lock to a write lock
(SQLite would fail one of them with SQLITE_BUSY at once, whatever the busy timeout).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tenantflow.errors import ConfigError

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, *, synchronous: str = "NORMAL", create: bool = True) -> sqlite3.Connection:
    """``create=False``: the file must exist (a tenant's database is made by provisioning,
    never by opening it: a late opening must not bring back a dropped one)."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode (isolation_level=None): transactions are explicit, see ``transaction``.
    conn = sqlite3.connect(
        path if create else f"{path.resolve().as_uri()}?mode=rw",
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
        uri=not create,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # In WAL mode NORMAL is safe against a crash of the process (kill -9) — the case the worker
    # must survive; a power loss may lose the last transactions. FULL adds an fsync per commit.
    if synchronous not in ("NORMAL", "FULL"):
        raise ConfigError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        yield cur
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")
    finally:
        cur.close()
