"""The run store's outbox and the questions of the relay, the reconciler and health: reads
across a tenant's runs, none of them a change to a run."""

from __future__ import annotations

from collections.abc import Sequence

from tenantflow.store.db import Database
from tenantflow.store.queries import Q, fetch_all, fetch_one
from tenantflow.store.records import ExpectedMessage, OutboxEntry


class Upkeep:
    """Part of :class:`tenantflow.store.sql.SqlRunStore`."""

    db: Database

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            async with self.db.autocommit() as tx:
                await tx.run(Q["delete_outbox"].many(len(ids)), tuple(ids))

    async def pending_outbox(self, *, older_than: float, limit: int = 500) -> list[OutboxEntry]:
        async with self.db.autocommit() as tx:
            rows = await fetch_all(tx, Q["pending_outbox"], (older_than, limit))
        return [OutboxEntry(**r) for r in rows]

    async def stalled_runs(
        self, *, now: float, grace: float, limit: int = 1000
    ) -> list[tuple[str, int, str | None]]:
        """Runs that should have a message by now: queued, running with a lapsed lease, or
        sleeping/waiting past their wake-up time, for longer than ``grace`` seconds."""
        cutoff = now - grace
        async with self.db.autocommit() as tx:
            rows = await fetch_all(tx, Q["stalled_runs"], (cutoff, cutoff, cutoff, limit))
        return [(r["id"], r["priority"], r["trace"]) for r in rows]

    async def expected_messages(
        self, *, after: str = "", limit: int = 1000
    ) -> list[ExpectedMessage]:
        async with self.db.autocommit() as tx:
            rows = await fetch_all(tx, Q["expected_messages"], (after, limit))
        return [
            ExpectedMessage(
                run_id=r["id"], priority=r["priority"], trace=r["trace"], due_at=r["due_at"]
            )
            for r in rows
        ]

    async def has_unfinished(self) -> bool:
        async with self.db.autocommit() as tx:
            row = await fetch_one(tx, Q["has_unfinished"])
        return bool(row and row["unfinished"])

    async def ping(self) -> None:
        async with self.db.autocommit() as tx:
            await tx.one(Q["ping"])

    async def stuck_runs(self, *, before: float) -> tuple[int, float | None]:
        """How many runs are queued or running without progress since ``before``, and when
        the oldest of them last moved."""
        async with self.db.autocommit() as tx:
            row = await fetch_one(tx, Q["stuck_runs"], (before,))
        assert row is not None
        return int(row["count"]), row["oldest"]
