"""Alembic environment of the platform database. The caller passes an open connection in
``config.attributes["connection"]``; tenantflow never reads an alembic.ini."""

from __future__ import annotations

from alembic import context

from tenantflow.platform.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
