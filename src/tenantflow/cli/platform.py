"""The platform plane from the command line: tenants, plans, administrators and API keys, so
that a production installation can be set up from nothing, and scripted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
import typer

from tenantflow.api.models import ApiKeyOut, PlanIn, PlanOut, QuotasModel, TenantOut, UserOut
from tenantflow.cli._common import (
    JsonOpt,
    TenantOpt,
    console,
    print_json,
    print_result,
    print_table,
    settings,
    time_text,
)
from tenantflow.errors import ConfigError, InvalidInputError
from tenantflow.platform.identity import MIN_PASSWORD, Role
from tenantflow.runtime import Runtime

tenants_cli = typer.Typer(help="Create, list and migrate tenants.")
plans_cli = typer.Typer(help="Plans: entitlements, quotas and dispatch weight; create, list.")
admin_cli = typer.Typer(
    help="Platform administrators and users: create, reset a password, disable."
)
keys_cli = typer.Typer(help="API keys of a tenant: issue, list, revoke.")

ACTOR = "cli"  # the audit log's actor of what these commands do
PASSWORD_VARIABLE = "TENANTFLOW_ADMIN_PASSWORD"
EmailArg = Annotated[str, typer.Argument(help="The administrator's email address.")]
UserEmailArg = Annotated[str, typer.Argument(help="The user's email address.")]


@contextlib.contextmanager
def platform_runtime() -> Iterator[Runtime]:
    """A runtime for one platform command (these are synchronous, as the platform plane's
    service is), closed at the end of the block."""
    runtime = Runtime(settings())
    try:
        yield runtime
    finally:
        asyncio.run(runtime.close())


# -- tenants -----------------------------------------------------------------------------------


@tenants_cli.command("create")
def tenants_create(
    tenant_id: Annotated[
        str, typer.Argument(help="Lowercase letters, digits and '-', up to 63 characters.")
    ],
    name: Annotated[str | None, typer.Option(help="A display name (default: the id).")] = None,
    plan: Annotated[str | None, typer.Option(help="The plan to license the tenant on.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a tenant and its database (recorded in the audit log, actor "cli")."""
    with platform_runtime() as runtime:
        tenant = runtime.platform.create_tenant(ACTOR, tenant_id, name=name, plan_id=plan)
    print_result(TenantOut.of(tenant), as_json=as_json, line=f"created tenant {tenant.id}")


@tenants_cli.command("list")
def tenants_list(as_json: JsonOpt = False) -> None:
    """List tenants."""
    with platform_runtime() as runtime:
        tenants = runtime.registry.list()
    if as_json:
        print_json({"tenants": [TenantOut.of(t) for t in tenants]})
        return
    print_table(
        "tenants",
        ("id", "name", "status", "plan", "created"),
        (
            [t.id, t.name, t.status.value, t.plan_id or "-", time_text(t.created_at)]
            for t in tenants
        ),
    )


@tenants_cli.command("migrate")
def tenants_migrate(
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Databases at a time.")] = 8,
    as_json: JsonOpt = False,
) -> None:
    """Bring every tenant database to the newest schema, in parallel batches."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with platform_runtime() as runtime:
        total = len(runtime.registry.list())
        with Progress(
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=as_json,
        ) as progress:
            bar = progress.add_task("migrate", total=total)
            report = runtime.registry.migrate_all(
                parallel=parallel, progress=lambda _: progress.advance(bar)
            )
    if as_json:
        print_json(
            {
                "migrated": sorted(report.migrated),
                "at_head": sorted(report.at_head),
                "failed": dict(sorted(report.failed.items())),
            }
        )
    else:
        console.print(
            f"{len(report.migrated)} migrated, {len(report.at_head)} already at head, "
            f"{len(report.failed)} failed"
        )
        for tenant_id, error in sorted(report.failed.items()):
            console.print(f"[red]failed[/red] {tenant_id}: {error}")
    if report.failed:
        raise typer.Exit(1)


# -- plans -------------------------------------------------------------------------------------

# The arguments of `plans create` by the field of PlanIn they give (the quotas: --the-field).
PLAN_OPTIONS = {"id": "PLAN_ID", "name": "--name", "entitlements": "--entitlement"}


@plans_cli.command("create")
def plans_create(
    plan_id: Annotated[
        str, typer.Argument(help="Lowercase letters, digits and '-', up to 63 characters.")
    ],
    name: Annotated[str | None, typer.Option(help="A display name (default: the id).")] = None,
    entitlement: Annotated[
        list[str] | None,
        typer.Option(
            help="A workflow name or feature code it entitles to (repeatable; default *)."
        ),
    ] = None,
    runs_per_month: Annotated[
        int | None, typer.Option(help="Runs a tenant may start per month (default: unlimited).")
    ] = None,
    concurrent_runs: Annotated[
        int | None, typer.Option(help="Runs of a tenant executing at once (default: unlimited).")
    ] = None,
    seats: Annotated[
        int | None, typer.Option(help="Members a tenant may have (default: unlimited).")
    ] = None,
    requests_per_second: Annotated[
        float | None, typer.Option(help="A tenant's API requests per second (default: unlimited).")
    ] = None,
    dispatch_weight: Annotated[
        int,
        typer.Option(
            help="The tenants' share of the workers when other tenants have work waiting too: "
            "3 takes three runs to a weight-1 tenant's one."
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Create a plan, checked as POST /platform/v1/plans checks it (recorded in the audit log,
    actor "cli"). Put tenants on it with `tenants create --plan`."""
    body = _plan_in(
        plan_id,
        name,
        entitlement,
        runs_per_month=runs_per_month,
        concurrent_runs=concurrent_runs,
        seats=seats,
        requests_per_second=requests_per_second,
        dispatch_weight=dispatch_weight,
    )
    with platform_runtime() as runtime:
        plan = runtime.platform.create_plan(
            ACTOR,
            body.id,
            name=body.name,
            entitlements=body.entitlements,
            quotas=body.quotas.quotas(),
        )
    print_result(
        PlanOut.of(plan),
        as_json=as_json,
        line=f"created plan {plan.id} (dispatch weight {plan.quotas.dispatch_weight})",
    )


def _plan_in(
    plan_id: str, name: str | None, entitlement: list[str] | None, **quotas: Any
) -> PlanIn:
    """The plan as POST /platform/v1/plans checks it; a refusal names the option."""
    try:
        return PlanIn(
            id=plan_id,
            name=name or plan_id,
            entitlements=entitlement or ["*"],
            quotas=QuotasModel(**quotas),
        )
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]  # of PlanIn or QuotasModel: loc starts with a field of either
        field = str(error["loc"][0])
        option = PLAN_OPTIONS.get(field, "--" + field.replace("_", "-"))
        raise InvalidInputError(f"{option}: {error['msg']}") from None


@plans_cli.command("list")
def plans_list(as_json: JsonOpt = False) -> None:
    """List plans with their quotas and dispatch weight."""
    with platform_runtime() as runtime:
        plans = runtime.platform.licensing.list_plans()
    if as_json:
        print_json({"plans": [PlanOut.of(p) for p in plans]})
        return

    def limit(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    print_table(
        "plans",
        ("id", "name", "entitlements", "runs/month", "concurrent", "seats", "req/s", "weight"),
        (
            [
                p.id,
                p.name,
                ", ".join(p.entitlements),
                limit(p.quotas.runs_per_month),
                limit(p.quotas.concurrent_runs),
                limit(p.quotas.seats),
                limit(p.quotas.requests_per_second),
                str(p.quotas.dispatch_weight),
            ]
            for p in plans
        ),
    )


# -- administrators ----------------------------------------------------------------------------


def read_password() -> str:
    """The new password: from ``TENANTFLOW_ADMIN_PASSWORD``, else asked for twice at a
    terminal (not echoed), else the first line of standard input (for scripts)."""
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        if sys.stdin.isatty():
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(
            f"the password needs at least {MIN_PASSWORD} characters "
            f"(give it in {PASSWORD_VARIABLE}, at the prompt, or on standard input)"
        )
    return password


@admin_cli.command("create")
def admin_create(
    email: EmailArg,
    tenant: Annotated[
        list[str] | None,
        typer.Option(help="Also make them tenant admin of this tenant (repeatable)."),
    ] = None,
) -> None:
    """Create a platform administrator. The password comes from TENANTFLOW_ADMIN_PASSWORD,
    a prompt, or standard input; it is never echoed or stored (only its hash)."""
    password = read_password()
    with platform_runtime() as runtime:
        platform = runtime.platform
        user = platform.create_user(ACTOR, email, password, platform_admin=True)
        for tenant_id in tenant or []:
            platform.set_membership(ACTOR, user.id, tenant_id, Role.TENANT_ADMIN)
    console.print(
        f"created platform administrator {user.email} ({user.id})", markup=False, soft_wrap=True
    )


@admin_cli.command("reset-password")
def admin_reset_password(email: EmailArg) -> None:
    """Set a new password for a user who lost theirs (recorded in the audit log). The
    password comes as for `admin create`."""
    password = read_password()
    with platform_runtime() as runtime:
        user = runtime.platform.reset_password(ACTOR, email, password)
    print_result(None, as_json=False, line=f"password of {user.email} reset")


@admin_cli.command("disable")
def admin_disable(email: UserEmailArg) -> None:
    """Disable a user: they can no longer sign in, and every token of theirs is refused at
    once, in every API process (recorded in the audit log)."""
    with platform_runtime() as runtime:
        user = runtime.platform.identity.user_by_email(email)
        runtime.platform.set_user_disabled(ACTOR, user.id, True)
    print_result(None, as_json=False, line=f"{user.email} disabled")


@admin_cli.command("enable")
def admin_enable(email: UserEmailArg) -> None:
    """Let a disabled user sign in again (their tokens from before stay refused)."""
    with platform_runtime() as runtime:
        user = runtime.platform.identity.user_by_email(email)
        runtime.platform.set_user_disabled(ACTOR, user.id, False)
    print_result(None, as_json=False, line=f"{user.email} enabled")


@admin_cli.command("list")
def admin_list(as_json: JsonOpt = False) -> None:
    """List the platform administrators."""
    with platform_runtime() as runtime:
        admins = [u for u in runtime.platform.identity.list_users() if u.is_platform_admin]
    if as_json:
        print_json({"admins": [UserOut.of(u) for u in admins]})
        return
    print_table(
        "platform administrators",
        ("email", "id", "created"),
        ([u.email, u.id, time_text(u.created_at)] for u in admins),
    )


# -- API keys ----------------------------------------------------------------------------------


@keys_cli.command("create")
def keys_create(
    tenant: TenantOpt,
    name: Annotated[str, typer.Option(help="What the key is for, e.g. 'billing-service'.")],
    role: Annotated[Role, typer.Option(help="What the key may do in the tenant.")] = Role.OPERATOR,
    as_json: JsonOpt = False,
) -> None:
    """Issue an API key for a tenant. Its secret is printed once; only its hash is kept."""
    with platform_runtime() as runtime:
        key, secret = runtime.platform.create_api_key(ACTOR, tenant, name, role)
    print_result(
        ApiKeyOut.of(key, secret),
        as_json=as_json,
        line=f"API key {key.id} of {tenant} ({role.value}), shown once:\n{secret}",
    )


@keys_cli.command("list")
def keys_list(tenant: TenantOpt, as_json: JsonOpt = False) -> None:
    """List a tenant's API keys (never their secrets)."""
    with platform_runtime() as runtime:
        runtime.registry.get(tenant)
        keys = runtime.platform.api_keys.of_tenant(tenant)
    if as_json:
        print_json({"keys": [ApiKeyOut.of(k) for k in keys]})
        return
    print_table(
        f"API keys of {tenant}",
        ("id", "name", "role", "created", "revoked"),
        (
            [k.id, k.name, k.role.value, time_text(k.created_at), time_text(k.revoked_at)]
            for k in keys
        ),
    )


@keys_cli.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `keys list`).")],
    tenant: TenantOpt,
) -> None:
    """Revoke an API key: it can no longer be exchanged for a token, and the tokens it was
    exchanged for are refused at once, in every API process."""
    with platform_runtime() as runtime:
        key = runtime.platform.revoke_api_key(ACTOR, tenant, key_id)
    print_result(None, as_json=False, line=f"revoked API key {key.id} of {tenant}")
