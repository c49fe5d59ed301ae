"""The ``tenantflow`` command. This module only puts the commands together, in the order
``--help`` shows them; each group lives in a module of its own."""

from tenantflow.cli import ops, platform, runs, serve
from tenantflow.cli._common import cli, load_app, main

for command in (serve.dev, serve.demo, serve.api, serve.worker, ops.status):
    cli.command()(command)
for group, name in (
    (runs.runs_cli, "runs"),
    (ops.dead_cli, "dead-letters"),
    (platform.tenants_cli, "tenants"),
    (platform.plans_cli, "plans"),
    (platform.admin_cli, "admin"),
    (platform.keys_cli, "keys"),
):
    cli.add_typer(group, name=name, no_args_is_help=True)

__all__ = ["cli", "load_app", "main"]
