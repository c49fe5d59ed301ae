"""The HTTP API documents itself truthfully: what the server answers is what its OpenAPI
document says (schemathesis, over both planes, on both backends, against a real server); the
docs pages load nothing from outside; the document carries the bearer scheme, the problem
schema and each workflow's input."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis import APIOperation, AuthContext, Case, GenerationMode
from schemathesis.core.jsonschema.types import JsonValue
from schemathesis.core.result import Ok

from tenantflow import Runtime, Settings
from tenantflow.api.app import create_api
from tenantflow.examples import orders
from tenantflow.platform.identity import Role
from tests.integration.test_api import PASSWORD, member

EXAMPLES = 4  # per operation, role and generation mode: the whole run stays within a minute
DEADLINE_MS = 15_000  # per example: catches a hang, not a slow CREATE DATABASE on a busy machine
SERVER_START_SECONDS = 20.0


@dataclass(frozen=True, kw_only=True)
class Served:
    url: str
    runtime: Runtime
    tokens: dict[str, str]  # by role: the roles of ROLES


@pytest.fixture
def served(settings: Settings) -> Iterator[Served]:
    """The example app on a uvicorn server at 127.0.0.1 (a free port), in a thread with its
    own event loop; the app opens and closes its own runtime."""
    api = create_api(orders.app, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(api, log_level="warning", access_log=False, lifespan="on", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        url = f"http://127.0.0.1:{port}"
        runtime: Runtime = api.state.runtime
        yield Served(url=url, runtime=runtime, tokens=_tokens(url, runtime))
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# Who calls each plane: every tenant role on the tenant plane; on the platform plane a tenant
# admin (their tenant's memberships and keys; the rest refused) and a platform admin.
ROLES = {
    "tenant": ("viewer", "operator", "tenant_admin"),
    "platform": ("tenant_admin", "platform_admin"),
}


def _tokens(url: str, runtime: Runtime) -> dict[str, str]:
    """A viewer, an operator and a tenant admin of acme, and a platform admin, with tokens
    minted by the token endpoint."""
    platform = runtime.platform
    runtime.registry.create("acme")
    for role in (Role.VIEWER, Role.OPERATOR, Role.TENANT_ADMIN):
        user = platform.create_user("system", f"{role.value}@acme.test", PASSWORD)
        platform.set_membership("system", user.id, "acme", role)
    platform.create_user("system", "root@example.com", PASSWORD, platform_admin=True)
    return _mint(url)


def _mint(url: str) -> dict[str, str]:
    """A token for each role, from the token endpoint."""
    grants: dict[str, dict[str, str]] = {
        r: {"email": f"{r}@acme.test", "tenant": "acme"} for r in ROLES["tenant"]
    }
    grants["platform_admin"] = {"email": "root@example.com"}
    tokens = {}
    for name, grant in grants.items():
        reply = requests.post(
            f"{url}/platform/v1/token",
            json={"grant_type": "password", "password": PASSWORD, **grant},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        tokens[name] = reply.json()["access_token"]
    return tokens


def _plane(operation: APIOperation[Any, Any, Any, Any]) -> str:
    return "tenant" if operation.path.startswith("/v1/") else "platform"


# A rotation that revokes tokens (generated input may ask for one) takes the roles' tokens
# with it: they are minted again after it.
REVOKES_TOKENS = {"POST /platform/v1/keys/rotate"}

# Generated input would register database servers at arbitrary URLs, and the next tenant
# created would be placed there: the server would connect to whatever host was generated. It
# is called once below, with a URL of this test's own.
NOT_GENERATED = {"POST /platform/v1/servers"}


def test_the_served_answers_match_the_document(served: Served, settings: Settings) -> None:
    """Every operation of both planes, called by each role of ``ROLES``, with generated valid
    and invalid input: each answer's status, content type, headers and body are the ones the
    document gives (a refusal for the role included), and none is a 5xx."""
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", timeout=10)
    calling: list[str] = ["platform_admin"]  # the role whose token the calls carry

    @schema.auth(refresh_interval=None)
    class Tokens:
        """The role's token; schemathesis leaves it out where it tests a missing one."""

        def get(self, case: Case[Any], ctx: AuthContext) -> str:
            return served.tokens[calling[0]]

        def set(self, case: Case[Any], data: str, ctx: AuthContext) -> None:
            case.headers["Authorization"] = f"Bearer {data}"

    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert {_plane(op) for op in operations} == {"tenant", "platform"}
    failures: list[str] = []
    for operation in operations:
        if operation.label in NOT_GENERATED:
            continue
        modes = [GenerationMode.POSITIVE]
        if _has_input(operation):
            modes.append(GenerationMode.NEGATIVE)
        for role in ROLES[_plane(operation)]:
            calling[0] = role
            for mode in modes:
                failure = _run(operation, mode)
                if failure is not None:
                    failures.append(f"as {role}: {failure}")
                if operation.label in REVOKES_TOKENS:
                    served.tokens.update(_mint(served.url))
    calling[0] = "platform_admin"
    servers = schema["/platform/v1/servers"]["POST"]
    body: dict[str, JsonValue] = {"id": "second", "url": _second_server_url(settings)}
    case = servers.Case(
        body=body, headers={"Authorization": f"Bearer {served.tokens['platform_admin']}"}
    )
    try:
        assert case.call_and_validate(timeout=10).status_code == 201
    except (Exception, BaseExceptionGroup) as exc:
        failures.append(f"{servers.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def _has_input(operation: APIOperation[Any, Any, Any, Any]) -> bool:
    """Whether the operation takes anything that can be made invalid (a token counts)."""
    definition = operation.definition.raw
    return bool(
        definition.get("parameters") or "requestBody" in definition or "security" in definition
    )


def _run(operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode) -> str | None:
    """Generated requests of ``mode`` to ``operation``, each answer checked against the
    document; what was found, if anything."""

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=DEADLINE_MS,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Case[Any]) -> None:
        case.call_and_validate(timeout=10)

    try:
        check()
    # A check's failures come as a group of AssertionErrors (a BaseExceptionGroup).
    except (Exception, BaseExceptionGroup) as exc:
        return f"{operation.label} ({mode.value}): {exc}"
    return None


def _second_server_url(settings: Settings) -> str:
    url = settings.resolved_database_url()
    return f"sqlite:///{settings.home / 'second'}" if url.startswith("sqlite:///") else url


# -- the docs pages and the document ---------------------------------------------------------


@pytest.fixture
async def docs() -> AsyncIterator[httpx.AsyncClient]:
    """The example app without a runtime: its documentation needs none."""
    transport = httpx.ASGITransport(app=create_api(orders.app))
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantflow.test") as c:
        yield c


PLANES = ("/v1/", "/platform/v1/")
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_pages_load_only_local_assets(docs: httpx.AsyncClient, page: str) -> None:
    reply = await docs.get(page)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    html = reply.text
    urls = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    assert urls, html
    assert "://" not in html.replace("http://www.w3.org", ""), html  # nothing absolute at all
    seen = set()
    for url in urls:
        assert url.startswith("/"), url
        answer = await docs.get(url)
        assert answer.status_code == 200, url
        suffix = url[url.rfind(".") :]
        expected = ASSET_TYPES.get(suffix, "application/json")
        assert answer.headers["content-type"].startswith(expected), (url, answer.headers)
        seen.add(suffix)
    assert ".js" in seen


async def test_the_document_has_the_bearer_scheme_and_problem_answers(
    docs: httpx.AsyncClient,
) -> None:
    spec = (await docs.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token from `POST /platform/v1/token`.",
    }
    anonymous = {"/platform/v1/token", "/.well-known/jwks.json", "/healthz", "/readyz"}
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # the server sends problem documents
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status"}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            assert (path in anonymous) == ("security" not in op), where
            if "security" in op:
                assert op["security"] == [{"bearer": []}], where
                assert {"401", "403"} <= set(op["responses"]), where
            if path.startswith("/v1/"):
                assert "429" in op["responses"], where  # the rate limiter
            if method in ("post", "put", "patch"):
                assert "413" in op["responses"], where  # the body limit
            # Input, or (both planes) a query parameter the route does not take.
            if op.get("parameters") or "requestBody" in op or path.startswith(PLANES):
                assert "422" in op["responses"], where
            for status, response in op["responses"].items():
                if status.startswith("4"):
                    assert response["content"] == {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    }, (where, status)


async def test_the_document_publishes_each_workflows_input(docs: httpx.AsyncClient) -> None:
    spec = (await docs.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    start = spec["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
    ref = "#/components/schemas/StartRun.fulfil_order"
    assert start["schema"] == {"oneOf": [{"$ref": ref}]}
    body = schemas["StartRun.fulfil_order"]
    assert body["properties"]["workflow"] == {"type": "string", "const": "fulfil_order"}
    assert body["required"] == ["workflow"]
    order = {"title": "order", "$ref": "#/components/schemas/workflow.Order"}
    by_name, positional = body["anyOf"]
    assert by_name["properties"]["kwargs"]["properties"] == {"order": order}
    assert by_name["properties"]["kwargs"]["required"] == ["order"]
    assert positional["properties"]["args"]["prefixItems"] == [order]
    assert schemas["workflow.Order"]["required"] == ["order_id", "sku", "quantity", "amount_cents"]
    assert schemas["Result.fulfil_order"]["$ref"] == "#/components/schemas/workflow.Receipt"


async def test_workflows_list_their_input_schema(runtime: Runtime) -> None:
    api: FastAPI = create_api(orders.app, runtime=runtime)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://tenantflow.test") as http:
        alice = await member(runtime, http, "alice@acme.test", "acme", Role.VIEWER)
        (listed,) = (await http.get("/v1/workflows", headers=alice)).json()
    assert listed["name"] == "fulfil_order" and listed["parameters"] == ["order"]
    schema: dict[str, Any] = listed["input_schema"]
    assert set(schema["$defs"]) == {"Order", "JsonValue"}  # all it uses (no Receipt)
    assert schema["anyOf"][1]["properties"]["args"]["prefixItems"] == [
        {"title": "order", "$ref": "#/$defs/Order"}
    ]
    assert listed["output_schema"]["$ref"] == "#/$defs/Receipt"
