"""Side effects counted in a table: what tests use to prove a step ran exactly once.

The table lives where ``TENANTFLOW_TEST_EFFECTS`` says: a SQLite file, or a PostgreSQL database
(``postgresql://...``). Tests that freeze a worker process (SIGSTOP) use PostgreSQL: a process
frozen inside a SQLite write would hold the file's write lock, and every other process's
effects (hence its steps) would wait on it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "TENANTFLOW_TEST_EFFECTS"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL, name TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS applied (key TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS executions "
    "(key TEXT NOT NULL, pid INTEGER NOT NULL, started REAL NOT NULL, ended REAL NOT NULL)",
)


@contextmanager
def _connect() -> Iterator[Any]:
    """A connection in autocommit mode, with the tables created."""
    target = os.environ[ENV]
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as pg:
            for statement in SCHEMA:
                pg.execute(statement)
            yield pg
        return
    conn = sqlite3.connect(Path(target), timeout=30, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in SCHEMA:
            conn.execute(statement)
        yield conn
    finally:
        conn.close()


def execute(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """One statement on the effects database (``?`` placeholders), in autocommit."""
    return _run(sql, params)


def _run(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with _connect() as conn:
        if not isinstance(conn, sqlite3.Connection):
            sql = sql.replace("?", "%s")
        cur = conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def record(key: str, name: str) -> None:
    _run("INSERT INTO effects (key, name) VALUES (?, ?)", (key, name))


def counts() -> dict[str, int]:
    """How many times each idempotency key's effect happened."""
    rows = _run("SELECT key, COUNT(*) FROM effects GROUP BY key")
    return {str(k): int(n) for k, n in rows}


def apply_once(key: str) -> None:
    """An external system that honours idempotency keys (a payment API, say): the first call
    with a key takes effect, later ones with the same key do nothing."""
    _run("INSERT INTO applied (key) VALUES (?) ON CONFLICT DO NOTHING", (key,))


def applied() -> list[str]:
    return [str(r[0]) for r in _run("SELECT key FROM applied")]


@dataclass(frozen=True)
class Execution:
    """One execution of a step: which (its idempotency key), in which process, when."""

    key: str
    pid: int
    started: float
    ended: float


def executed(key: str, started: float) -> None:
    """Record an execution of the step ``key`` that began at ``started`` and ends now."""
    _run(
        "INSERT INTO executions (key, pid, started, ended) VALUES (?, ?, ?, ?)",
        (key, os.getpid(), started, time.time()),
    )


def executions() -> list[Execution]:
    rows = _run("SELECT key, pid, started, ended FROM executions ORDER BY started")
    return [
        Execution(key=str(k), pid=int(p), started=float(s), ended=float(e)) for k, p, s, e in rows
    ]
