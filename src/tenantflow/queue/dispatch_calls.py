"""The ids of a process's dispatch calls, per consumer, and what the dispatch script is told of
them: the calls whose replies arrived (their deliveries can be forgotten) and those whose
replies did not (their deliveries are delivered again, rather than reclaimed a lease later)."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tenantflow.queue.base import Message


@dataclass(frozen=True)
class Call:
    id: str
    answered: list[str]  # calls whose replies arrived since the last call told of them
    asked: list[str]  # calls whose replies may still be missing


class DispatchCalls:
    def __init__(self) -> None:
        self._ids = (f"{secrets.token_hex(4)}.{n}" for n in itertools.count())
        self._answered: dict[str, list[str]] = {}
        self._unanswered: dict[str, dict[str, float]] = {}

    def begin(self, consumer: str, visibility_timeout: float) -> Call:
        call = next(self._ids)
        answered = self._answered.pop(consumer, [])
        unanswered = self._unanswered.setdefault(consumer, {})
        now = time.monotonic()
        # Asked for until their copies lapse, even after a reply: a call held up on the way
        # (a link that stalled) may run after the one that asked.
        asked = [c for c, until in unanswered.items() if until > now]
        for c in [c for c in unanswered if c not in asked]:
            del unanswered[c]
        unanswered[call] = now + visibility_timeout  # until its reply arrives
        return Call(call, answered, asked)

    def replied(self, consumer: str, call: Call, *, delivered: bool) -> None:
        del self._unanswered[consumer][call.id]
        if delivered:
            self._answered.setdefault(consumer, []).append(call.id)

    def unreplied(self, consumer: str, call: Call) -> None:
        """No reply: whether the call ran is unknown; the answered ones are told again."""
        self._answered.setdefault(consumer, []).extend(call.answered)  # dropped by the next call


def messages_of(consumer: str, flat: Sequence[str]) -> list[Message]:
    """The dispatch script's reply, seven fields per message."""
    out: list[Message] = []
    for i in range(0, len(flat), 7):
        tenant, entry_id, run_id, priority, deliveries, count, trace = flat[i : i + 7]
        out.append(
            Message(
                id=entry_id,
                tenant_id=tenant,
                run_id=run_id,
                priority=int(priority),
                deliveries=int(deliveries),
                receipt=f"{consumer}|{count}",
                trace=trace or None,
            )
        )
    return out
