"""The schema of the platform database (SQLAlchemy Core): what every tenant shares.

Tenants and the routing table (which database server holds each tenant), identity (users,
memberships, API keys), the signing keys of tokens and licenses, plans and licenses, and the
audit log. Migrations live beside it in ``migrations/``; ``PLATFORM_HEAD`` names the newest,
and a test keeps the two in step. Connection secrets (``database_servers.url``,
``tenants.database_url``) and private keys never leave this database through the API.
"""

from __future__ import annotations

import sqlalchemy as sa

PLATFORM_HEAD = "p0005"

metadata = sa.MetaData()

database_servers = sa.Table(
    "database_servers",
    metadata,
    sa.Column("id", sa.String(63), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),  # a secret: credentials included
    sa.Column("accepting", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("created_at", sa.Float, nullable=False),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(63), primary_key=True),
    # Its identity: new for every tenant, never reused, unlike the id (see p0004).
    sa.Column("uid", sa.String(32), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("plan_id", sa.String(63)),
    sa.Column("server_id", sa.String(63)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("database_url", sa.Text, nullable=False, unique=True),  # a secret
    sa.Column("revision", sa.String(32)),
    # Bumped by a suspension: tokens carry it, and one minted before is refused (see p0005).
    sa.Column("access_generation", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.UniqueConstraint("uid", name="uq_tenants_uid"),
)

# Tenants that may have unfinished runs or outbox records: the ones background sweeps visit.
# Marked before a run is created (again when the mark is getting old), removed by a sweep
# that finds the tenant with nothing unfinished and a mark old enough (see maintenance.py).
active_tenants = sa.Table(
    "active_tenants",
    metadata,
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("marked_at", sa.Float, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),  # stored lower case
    sa.Column("password_hash", sa.Text, nullable=False),  # argon2id
    sa.Column("is_platform_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    # Bumped by a new password and by disabling: a token minted before is refused.
    sa.Column("generation", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("disabled_at", sa.Float),  # None: may sign in
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("tenant_id", sa.String(63), primary_key=True),
    sa.Column("tenant_uid", sa.String(32)),  # the tenant's identity when it was made
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # This grant of access: a membership removed and made again is another (tokens name it).
    sa.Column("grant_id", sa.String(32), nullable=False),
    sa.Index("ix_memberships_tenant", "tenant_id"),
)

# A tenant's offer of a role to an existing user, who becomes a member on accepting it.
invitations = sa.Table(
    "invitations",
    metadata,
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

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # public part of the key
    sa.Column("tenant_id", sa.String(63), nullable=False),
    sa.Column("tenant_uid", sa.String(32)),  # the tenant's identity when it was made
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),  # SHA-256 of the secret part
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Index("ix_api_keys_tenant", "tenant_id"),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.String(32), primary_key=True),
    sa.Column("private_pem", sa.Text, nullable=False),  # a secret
    sa.Column("public_x", sa.String(64), nullable=False),  # Ed25519 public key, base64url
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retired_at", sa.Float),  # no longer signs
    sa.Column("verify_until", sa.Float),  # published until then (after retirement)
    # Its access tokens refused at once (a rotation after a leak), not when they expire.
    sa.Column("tokens_revoked", sa.Boolean, nullable=False, server_default=sa.false()),
)

plans = sa.Table(
    "plans",
    metadata,
    sa.Column("id", sa.String(63), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("entitlements", sa.JSON, nullable=False),  # workflow names / feature codes; "*"
    sa.Column("runs_per_month", sa.Integer),  # None: unlimited
    sa.Column("concurrent_runs", sa.Integer),
    sa.Column("seats", sa.Integer),
    sa.Column("requests_per_second", sa.Float),
    # Its tenants' share of the workers (weighted round robin); 1: as a tenant on no plan.
    sa.Column("dispatch_weight", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("created_at", sa.Float, nullable=False),
)

licenses = sa.Table(
    "licenses",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("tenant_id", sa.String(63), nullable=False),
    sa.Column("plan_id", sa.String(63), nullable=False),
    sa.Column("document", sa.Text, nullable=False),  # compact JWS (EdDSA)
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_licenses_tenant", "tenant_id", "issued_at"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant_id", sa.String(63)),  # None: a platform-wide action
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(255)),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_audit_tenant", "tenant_id", "id"),
)
