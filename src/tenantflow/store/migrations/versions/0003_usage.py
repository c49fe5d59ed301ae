"""Usage counters: runs submitted per month, against the tenant's monthly quota.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("period", sa.String(7), primary_key=True),  # YYYY-MM (UTC)
        sa.Column("runs", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage")
