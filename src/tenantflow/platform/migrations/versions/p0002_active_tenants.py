"""Tenants that may have work: the index background sweeps visit instead of every tenant.

Revision ID: p0002
Revises: p0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "p0002"
down_revision = "p0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "active_tenants",
        sa.Column("tenant_id", sa.String(63), primary_key=True),
        sa.Column("marked_at", sa.Float, nullable=False),
    )
    # Tenants from before the index may have unfinished runs: each is visited once by the
    # next sweep, which drops the mark of those with nothing unfinished.
    op.execute("INSERT INTO active_tenants (tenant_id, marked_at) SELECT id, 0 FROM tenants")


def downgrade() -> None:
    op.drop_table("active_tenants")
