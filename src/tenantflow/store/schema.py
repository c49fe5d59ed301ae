"""The schema of a tenant database (SQLAlchemy Core). Migrations live beside it in
``migrations/``; ``HEAD_REVISION`` names the newest, and a test keeps the two in step."""

from __future__ import annotations

import sqlalchemy as sa

HEAD_REVISION = "0006"

metadata = sa.MetaData()

runs = sa.Table(
    "runs",
    metadata,
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
    sa.Column("compensable", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("trace", sa.Text),
    sa.Column("stuck_reason", sa.Text),  # why no worker can take it (a queued run only)
    sa.Index("ix_runs_status", "status", "id"),
    sa.Index("ix_runs_parent", "parent_id"),
)

steps = sa.Table(
    "steps",
    metadata,
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

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("consumed_seq", sa.Integer),
    sa.Index("ix_events_run_name", "run_id", "name", "consumed_seq"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(255), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("trace", sa.Text),
    sa.Index("ix_outbox_created", "created_at"),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("period", sa.String(7), primary_key=True),  # YYYY-MM (UTC)
    sa.Column("runs", sa.Integer, nullable=False),
)
