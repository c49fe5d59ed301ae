"""The platform plane: routing, identity, signing keys, plans and licenses, audit log.

Revision ID: p0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "p0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    _routing(bind, existing)
    _identity(existing)
    _keys_plans_audit(existing)


def _routing(bind: sa.Connection, existing: set[str]) -> None:
    if "tenants" in existing:
        # A platform database from before migrations (the tenant registry alone): keep its
        # tenants, add the new columns.
        columns = {c["name"] for c in sa.inspect(bind).get_columns("tenants")}
        with op.batch_alter_table("tenants") as batch:
            for name in ("plan_id", "server_id"):
                if name not in columns:
                    batch.add_column(sa.Column(name, sa.String(63)))
    if "database_servers" not in existing:
        op.create_table(
            "database_servers",
            sa.Column("id", sa.String(63), primary_key=True),
            sa.Column("url", sa.Text, nullable=False),  # a secret: credentials included
            sa.Column("accepting", sa.Boolean, nullable=False, server_default=sa.true()),
            sa.Column("created_at", sa.Float, nullable=False),
        )

    if "tenants" not in existing:
        op.create_table(
            "tenants",
            sa.Column("id", sa.String(63), primary_key=True),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("plan_id", sa.String(63)),
            sa.Column("server_id", sa.String(63)),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("database_url", sa.Text, nullable=False, unique=True),  # a secret
            sa.Column("revision", sa.String(32)),
        )


def _identity(existing: set[str]) -> None:
    if "users" not in existing:
        op.create_table(
            "users",
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("email", sa.String(320), nullable=False, unique=True),  # stored lower case
            sa.Column("password_hash", sa.Text, nullable=False),  # argon2id
            sa.Column("is_platform_admin", sa.Boolean, nullable=False, server_default=sa.false()),
            sa.Column("created_at", sa.Float, nullable=False),
        )

    if "memberships" not in existing:
        op.create_table(
            "memberships",
            sa.Column("user_id", sa.String(36), primary_key=True),
            sa.Column("tenant_id", sa.String(63), primary_key=True),
            sa.Column("role", sa.String(32), nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
        )
        op.create_index("ix_memberships_tenant", "memberships", ["tenant_id"])

    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("id", sa.String(32), primary_key=True),  # public part of the key
            sa.Column("tenant_id", sa.String(63), nullable=False),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("role", sa.String(32), nullable=False),
            sa.Column("secret_hash", sa.String(64), nullable=False),  # SHA-256 of the secret part
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("revoked_at", sa.Float),
        )
        op.create_index("ix_api_keys_tenant", "api_keys", ["tenant_id"])


def _keys_plans_audit(existing: set[str]) -> None:
    if "signing_keys" not in existing:
        op.create_table(
            "signing_keys",
            sa.Column("kid", sa.String(32), primary_key=True),
            sa.Column("private_pem", sa.Text, nullable=False),  # a secret
            sa.Column("public_x", sa.String(64), nullable=False),  # Ed25519 public key, base64url
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("retired_at", sa.Float),  # no longer signs
            sa.Column("verify_until", sa.Float),  # published until then (after retirement)
        )

    if "plans" not in existing:
        op.create_table(
            "plans",
            sa.Column("id", sa.String(63), primary_key=True),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column(
                "entitlements", sa.JSON, nullable=False
            ),  # workflow names / feature codes; "*"
            sa.Column("runs_per_month", sa.Integer),  # None: unlimited
            sa.Column("concurrent_runs", sa.Integer),
            sa.Column("seats", sa.Integer),
            sa.Column("requests_per_second", sa.Float),
            sa.Column("created_at", sa.Float, nullable=False),
        )

    if "licenses" not in existing:
        op.create_table(
            "licenses",
            sa.Column("id", sa.String(36), primary_key=True),
            sa.Column("tenant_id", sa.String(63), nullable=False),
            sa.Column("plan_id", sa.String(63), nullable=False),
            sa.Column("document", sa.Text, nullable=False),  # compact JWS (EdDSA)
            sa.Column("issued_at", sa.Float, nullable=False),
            sa.Column("expires_at", sa.Float, nullable=False),
        )
        op.create_index("ix_licenses_tenant", "licenses", ["tenant_id", "issued_at"])

    if "audit_log" not in existing:
        op.create_table(
            "audit_log",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("tenant_id", sa.String(63)),  # None: a platform-wide action
            sa.Column("actor", sa.String(255), nullable=False),
            sa.Column("action", sa.String(64), nullable=False),
            sa.Column("target", sa.String(255)),
            sa.Column("details", sa.JSON, nullable=False),
            sa.Column("at", sa.Float, nullable=False),
        )
        op.create_index("ix_audit_tenant", "audit_log", ["tenant_id", "id"])


def downgrade() -> None:
    for name in (
        "audit_log",
        "licenses",
        "plans",
        "signing_keys",
        "api_keys",
        "memberships",
        "users",
        "tenants",
        "database_servers",
    ):
        op.drop_table(name)
