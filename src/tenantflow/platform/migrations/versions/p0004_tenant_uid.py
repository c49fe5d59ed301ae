"""A tenant's identity: a random id of its own, distinct from its slug and never reused, so
that credentials of an offboarded tenant match no later tenant of the same slug. API keys and
memberships carry the identity of the tenant they were made in; tenants and their keys and
memberships made before get one now.

Revision ID: p0004
Revises: p0003
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "p0004"
down_revision = "p0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("uid", sa.String(32)))
    for table in ("api_keys", "memberships"):
        op.add_column(table, sa.Column("tenant_uid", sa.String(32)))
    conn = op.get_bind()
    for (tenant_id,) in conn.execute(sa.text("SELECT id FROM tenants")).all():
        uid = uuid.uuid4().hex
        conn.execute(
            sa.text("UPDATE tenants SET uid = :uid WHERE id = :id"), {"uid": uid, "id": tenant_id}
        )
        for table in ("api_keys", "memberships"):
            conn.execute(
                sa.text(f"UPDATE {table} SET tenant_uid = :uid WHERE tenant_id = :id"),
                {"uid": uid, "id": tenant_id},
            )
    with op.batch_alter_table("tenants") as batch:
        batch.alter_column("uid", existing_type=sa.String(32), nullable=False)
        batch.create_unique_constraint("uq_tenants_uid", ["uid"])


def downgrade() -> None:
    for table in ("api_keys", "memberships"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant_uid")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_constraint("uq_tenants_uid", type_="unique")
        batch.drop_column("uid")
