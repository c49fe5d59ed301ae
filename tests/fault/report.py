"""The fault suite's counts, gathered as its tests run and printed as one table at the end
(and written to ``$TENANTFLOW_TEST_FAULT_REPORT`` as JSON, when set)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counts:
    scenario: str
    lease_seconds: float
    accepted: int = 0
    indeterminate: int = 0
    completed: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicated_at_crash: int = 0
    duplicated_elsewhere: int = 0
    recovery_seconds: float | None = None
    slowest_run: str | None = None
    notes: list[str] = field(default_factory=list)


REPORT: list[Counts] = []


def table() -> str:
    rows = [
        "| fault | lease | accepted | indeterminate | completed | lost | unexpected "
        "| duplicated at a crash point | duplicated elsewhere | recovery |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in REPORT:
        rows.append(
            f"| {c.scenario} | {c.lease_seconds:g} s | {c.accepted} | {c.indeterminate} "
            f"| {c.completed} | {c.lost} | {c.unexpected} | {c.duplicated_at_crash} "
            f"| {c.duplicated_elsewhere} | {c.recovery_seconds} s |"
        )
    return "\n".join(rows)
