"""Tracing: a run keeps the W3C trace context of the span that started it, and its outbox
records carry it to the queue, so every delivery of the run joins the same trace.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("runs", "outbox"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("trace", sa.Text))


def downgrade() -> None:
    for table in ("runs", "outbox"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("trace")
