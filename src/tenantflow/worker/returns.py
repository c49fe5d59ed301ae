"""How a worker gives messages back to the queue and acknowledges them: a give-back or an
acknowledgement the queue did not take (it was away) is kept and sent again once it answers;
a message whose tenant database does not answer is parked until it does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine
from contextvars import Context
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from tenantflow.backends import log_failure
from tenantflow.queue.base import Message
from tenantflow.runtime import Runtime

log = structlog.get_logger("tenantflow.worker.worker")

STORE_RETRY_SECONDS = 1.0
STORE_RETRY_MAX_SECONDS = 5.0  # the longest wait for a tenant database that does not answer
STORE_PROBE_PAUSE = 0.25  # between two probes of a tenant database that refused at once


@dataclass
class GiveBack:
    """A ``retry_later`` the queue did not take (it was away): sent again once it answers."""

    message: Message
    due: float  # when the message is to be visible (wall clock)
    count_delivery: bool


class Host(Protocol):
    """What giving back uses of the worker it is part of (``Worker``)."""

    runtime: Runtime
    lease_seconds: float
    stopping: bool
    _tasks: set[asyncio.Task[None]]
    _acks: list[Message]
    _unacked: list[Message]
    _unsent: dict[tuple[str, str], GiveBack]
    _parked: set[Message]
    _store_away: dict[str, float]
    _store_back: dict[str, asyncio.Event]

    async def _wait_any(self, waiter: Awaitable[Any], timeout: float | None) -> None: ...

    async def _give_back(
        self, message: Message, delay: float, *, count_delivery: bool = True
    ) -> None: ...

    def _park(self, message: Message, delay: float) -> None: ...

    def _track(self, coro: Coroutine[Any, Any, None]) -> None: ...

    async def _probe_store(self, tenant_id: str, back: asyncio.Event) -> None: ...

    def _store_answers(self, tenant_id: str) -> None: ...

    def _flush_acks_soon(self) -> None: ...

    async def _flush_acks(self) -> None: ...


class GivingBack:
    """Mixed into ``Worker``."""

    async def _retry(self: Host, message: Message, *, store_away: bool) -> None:
        """Try the message again later. The tenant's database not answering is not the
        message's fault: that delivery does not count, and the message is given back as soon
        as the database answers again (``_park``), after a wait as long as it has been away
        at the latest (``STORE_RETRY_SECONDS`` to ``STORE_RETRY_MAX_SECONDS``, and at most
        half a lease): the longer an outage, the fewer tries."""
        if not store_away:
            await self._give_back(message, STORE_RETRY_SECONDS)
            return
        away = time.monotonic() - self._store_away.setdefault(message.tenant_id, time.monotonic())
        longest = min(STORE_RETRY_MAX_SECONDS, self.lease_seconds / 2)
        delay = min(max(away, min(STORE_RETRY_SECONDS, longest)), longest)
        self._park(message, delay)

    def _park(self: Host, message: Message, delay: float) -> None:
        """Keep ``message`` (its visibility extended with those in flight; no slot taken) until
        its tenant's database answers again, or for ``delay`` at most, then give it back for
        now: a run waits for the database, not for a wait fixed when the database failed."""
        self._parked.add(message)
        back = self._store_back.get(message.tenant_id)
        if back is None:
            back = self._store_back[message.tenant_id] = asyncio.Event()
            self._track(self._probe_store(message.tenant_id, back))

        async def wait_then_give_back() -> None:
            try:
                await self._wait_any(back.wait(), delay)
            finally:
                self._parked.discard(message)
            await self._give_back(message, 0.0, count_delivery=False)

        self._track(wait_then_give_back())

    def _track(self: Host, coro: Coroutine[Any, Any, None]) -> None:
        """A background task of this worker, waited for when it stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_store(self: Host, tenant_id: str, back: asyncio.Event) -> None:
        """While messages of ``tenant_id`` are parked: ask its database, one call at a time
        (each within the database's own bound), until it answers or they are all given back.
        Another call answering (a claim, a renewal) ends it too."""
        try:
            while not back.is_set() and not self.stopping:
                if not any(m.tenant_id == tenant_id for m in self._parked):
                    return
                try:
                    await self.runtime.router.store(tenant_id).ping()
                except Exception:
                    await self._wait_any(back.wait(), STORE_PROBE_PAUSE)
                    continue
                self._store_answers(tenant_id)
        finally:
            if self._store_back.get(tenant_id) is back:
                del self._store_back[tenant_id]

    def _store_answers(self: Host, tenant_id: str) -> None:
        """The tenant's database answered a call: it is not away, and what was parked for it
        goes back to the queue now."""
        self._store_away.pop(tenant_id, None)
        back = self._store_back.pop(tenant_id, None)
        if back is not None:
            back.set()

    def _ack(self: Host, message: Message) -> None:
        """Acknowledge soon: acknowledgements of one turn of the loop go in one round trip.
        (Lost with the process, the delivery comes back and finds its run ended: dropped.)"""
        self._acks.append(message)
        if len(self._acks) == 1:
            # A fresh context: the batch acknowledges many runs, not this one's.
            asyncio.get_running_loop().call_soon(self._flush_acks_soon, context=Context())

    def _flush_acks_soon(self: Host) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_acks())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_acks(self: Host) -> None:
        acks = list(self._acks)
        self._acks.clear()
        if acks:
            try:
                await self.runtime.queue.ack(acks)
            except Exception as exc:
                # Sent again once the queue answers (else the deliveries come back, and find
                # their runs ended).
                self._unacked.extend(acks)
                log_failure(log, "acknowledgement failed; sent again once the queue answers", exc)

    async def _give_back(
        self: Host, message: Message, delay: float, *, count_delivery: bool = True
    ) -> None:
        """``retry_later``. If the queue is away, it is kept and sent once the queue answers,
        rather than the run waiting for its delivery to lapse, or, if the queue lost the
        message meanwhile, for the reconciler (a ``retry_later`` of a lost message makes a new
        one)."""
        due = time.time() + delay
        fields = {"tenant": message.tenant_id, "run": message.run_id, "message": message.id}
        log.debug("giving back", delay=round(delay, 3), **fields)
        try:
            await self.runtime.queue.retry_later(message, delay, count_delivery=count_delivery)
        except Exception as exc:
            self._unsent[message.tenant_id, message.id] = GiveBack(message, due, count_delivery)
            log_failure(
                log,
                "giving a message back failed; sent again once the queue answers",
                exc,
                **fields,
            )

    async def _resend(self: Host) -> None:
        """Send what the queue did not take while it was away; stop at the first failure."""
        queue = self.runtime.queue
        for key, unsent in list(self._unsent.items()):
            delay = max(0.0, unsent.due - time.time())
            log.debug(
                "giving back again",
                tenant=unsent.message.tenant_id,
                run=unsent.message.run_id,
                message=unsent.message.id,
                delay=round(delay, 3),
            )
            try:
                await queue.retry_later(unsent.message, delay, count_delivery=unsent.count_delivery)
            except Exception:
                return
            if self._unsent.get(key) is unsent:  # not given back anew meanwhile
                del self._unsent[key]
        if self._unacked:
            acks, self._unacked = self._unacked, []
            try:
                await queue.ack(acks)
            except Exception:
                self._unacked.extend(acks)
