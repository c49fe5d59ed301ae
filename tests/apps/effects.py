"""Side effects counted in a table: what tests use to prove a step ran exactly once."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

ENV = "TENANTFLOW_TEST_EFFECTS"


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(Path(os.environ[ENV]), timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL, name TEXT NOT NULL)")
    return conn


def record(key: str, name: str) -> None:
    conn = _connect()
    try:
        conn.execute("INSERT INTO effects (key, name) VALUES (?, ?)", (key, name))
    finally:
        conn.close()


def counts() -> dict[str, int]:
    """How many times each idempotency key's effect happened."""
    conn = _connect()
    try:
        rows = conn.execute("SELECT key, COUNT(*) FROM effects GROUP BY key").fetchall()
    finally:
        conn.close()
    return {str(k): int(n) for k, n in rows}


def apply_once(key: str) -> None:
    """An external system that honours idempotency keys (a payment API, say): the first call
    with a key takes effect, later ones with the same key do nothing."""
    conn = _connect()
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS applied (key TEXT PRIMARY KEY)")
        conn.execute("INSERT OR IGNORE INTO applied (key) VALUES (?)", (key,))
    finally:
        conn.close()


def applied() -> list[str]:
    conn = _connect()
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS applied (key TEXT PRIMARY KEY)")
        return [str(r[0]) for r in conn.execute("SELECT key FROM applied").fetchall()]
    finally:
        conn.close()
