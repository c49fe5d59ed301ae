"""How a dequeue's free slots are shared among the ready tenants it looks at.

Weighted round robin on a *pass* per tenant (stride scheduling): a tenant that takes ``n``
messages moves on by ``n / weight``, and the tenants with the lowest pass come first. Within
one dequeue each tenant gets its weight's part of the slots, rounded down, and the slots left
over go one each to the tenants whose pass would then be the lowest. So a tenant of weight 3
takes three messages to another's one over many dequeues, however few slots each has (a busy
worker takes one or two at a time, as runs finish), not only within a large batch.

The embedded queue calls :func:`shares`; the Redis ``DISPATCH`` script (``lua``) does the same
in Lua, with the pass kept in the ready set's scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Turn(NamedTuple):
    tenant: str
    weight: int
    pass_: float  # how far the tenant has moved on in the round robin


def weight_of(weights: Mapping[str, int] | None, tenant: str) -> int:
    """The tenant's weight in ``weights``; 1 when absent (and never below 1)."""
    return max(1, (weights or {}).get(tenant, 1))


def shares(budget: int, turns: Sequence[Turn]) -> dict[str, int]:
    """Each tenant's share of ``budget`` slots; ``turns`` in the order of their pass (ties:
    the first given first). The shares add up to ``budget``."""
    total = sum(t.weight for t in turns)
    want = {t.tenant: budget * t.weight // total for t in turns}
    left = budget - sum(want.values())  # fewer than len(turns)
    if left > 0:
        order = sorted(
            range(len(turns)),
            key=lambda i: (turns[i].pass_ + want[turns[i].tenant] / turns[i].weight, i),
        )
        for i in order[:left]:
            want[turns[i].tenant] += 1
    return want
