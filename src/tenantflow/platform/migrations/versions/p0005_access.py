"""Access that can be taken back before a token expires: a user's generation (a new password,
a disabled account: every token minted before is refused), the grant a membership is (removed
and made again, it is another grant), a tenant's access generation (a suspension refuses every
token minted before it), a signing key's access tokens revoked with it, and invitations, which
a user accepts before they are a member.

Revision ID: p0005
Revises: p0004
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "p0005"
down_revision = "p0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "users", sa.Column("generation", sa.Integer, nullable=False, server_default=sa.text("0"))
    )
    op.add_column("users", sa.Column("disabled_at", sa.Float))
    op.add_column(
        "tenants",
        sa.Column("access_generation", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.add_column(
        "signing_keys",
        sa.Column("tokens_revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column("memberships", sa.Column("grant_id", sa.String(32)))
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT user_id, tenant_id FROM memberships")).all()
    for user_id, tenant_id in rows:
        conn.execute(
            sa.text("UPDATE memberships SET grant_id = :g WHERE user_id = :u AND tenant_id = :t"),
            {"g": uuid.uuid4().hex, "u": user_id, "t": tenant_id},
        )
    with op.batch_alter_table("memberships") as batch:
        batch.alter_column("grant_id", existing_type=sa.String(32), nullable=False)
    op.create_table(
        "invitations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("tenant_uid", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("invited_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.UniqueConstraint("tenant_id", "user_id", name="uq_invitations_tenant_user"),
        sa.Index("ix_invitations_user", "user_id"),
    )


def downgrade() -> None:
    op.drop_table("invitations")
    with op.batch_alter_table("memberships") as batch:
        batch.drop_column("grant_id")
    with op.batch_alter_table("signing_keys") as batch:
        batch.drop_column("tokens_revoked")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("access_generation")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled_at")
        batch.drop_column("generation")
