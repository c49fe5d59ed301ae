"""A plan's dispatch weight: its tenants' share of the workers; plans made before it have 1,
the weight every tenant had.

Revision ID: p0003
Revises: p0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "p0003"
down_revision = "p0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "plans",
        sa.Column("dispatch_weight", sa.Integer, nullable=False, server_default=sa.text("1")),
    )


def downgrade() -> None:
    with op.batch_alter_table("plans") as batch:
        batch.drop_column("dispatch_weight")
