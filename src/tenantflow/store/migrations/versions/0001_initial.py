"""Runs, step checkpoints and events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("workflow", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("result", sa.LargeBinary),
        sa.Column("error", sa.LargeBinary),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("parent_id", sa.String(255)),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("timeout", sa.Float),
        sa.Column("max_recoveries", sa.Integer, nullable=False, server_default="10"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("deadline", sa.Float),
        sa.Column("wake_at", sa.Float),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.Float),
        sa.Column("recoveries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("executions", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_runs_status", "runs", ["status", "id"])
    op.create_index("ix_runs_parent", "runs", ["parent_id"])
    op.create_table(
        "steps",
        sa.Column("run_id", sa.String(255), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("output", sa.LargeBinary),
        sa.Column("error", sa.LargeBinary),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("consumed_seq", sa.Integer),
    )
    op.create_index("ix_events_run_name", "events", ["run_id", "name", "consumed_seq"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("steps")
    op.drop_table("runs")
