"""The OpenAPI document: FastAPI's, completed with what it cannot see from the routes.

- ``Problem``, the schema of every error answer (the routes refer to it by name);
- for each workflow, the body of ``POST /v1/runs`` that starts it (``StartRun.<workflow>``,
  its input checked as the signature checks it) and its result (``Result.<workflow>``); the
  types they use are ``workflow.<Type>``. ``POST /v1/runs`` takes one of the bodies, told apart
  by their ``workflow`` const.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from fastapi import FastAPI

from tenantflow.api.problems import Problem
from tenantflow.api.schemas import JSON_VALUE, JsonSchema, describe, json_value
from tenantflow.sdk.app import App

COMPONENTS = "#/components/schemas/"
TYPE_PREFIX = "workflow."
JSON_VALUE_REF = COMPONENTS + JSON_VALUE


def install(api: FastAPI, workflows: App) -> None:
    """Serve the completed document at ``api.openapi_url``, built once."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = complete(generate(), workflows)
        return api.openapi_schema

    # FastAPI's documented way to extend the document it generates.
    api.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], workflows: App) -> dict[str, Any]:
    schemas: dict[str, JsonSchema] = document.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template=COMPONENTS + "{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas[Problem.__name__] = problem
    schemas[JSON_VALUE] = json_value(JSON_VALUE_REF)
    _add_workflows(document, schemas, workflows)
    return document


def _add_workflows(document: dict[str, Any], schemas: dict[str, JsonSchema], app: App) -> None:
    listed = sorted(app.workflows.values(), key=lambda w: w.name)
    if not listed:
        return
    described, defs = describe(
        listed, ref_template=f"{COMPONENTS}{TYPE_PREFIX}{{model}}", json_value_ref=JSON_VALUE_REF
    )
    schemas.update({TYPE_PREFIX + name: schema for name, schema in defs.items()})
    common = schemas["StartRun"]["properties"]
    refs = []
    for wf in listed:
        key = _component_name(wf.name, schemas)
        body = dict(described[wf.name].input)
        body["title"] = f"Start {wf.name}"
        if wf.__doc__:
            body["description"] = inspect.cleandoc(wf.__doc__)
        body["properties"] = {
            "workflow": {"type": "string", "const": wf.name},
            **body["properties"],
            "priority": common["priority"],
        }
        body["required"] = ["workflow", *body.get("required", [])]
        schemas[f"StartRun.{key}"] = body
        schemas[f"Result.{key}"] = {"title": f"Result of {wf.name}", **described[wf.name].output}
        refs.append(f"{COMPONENTS}StartRun.{key}")
    start = document["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
    # Told apart by their `workflow` const. (No OpenAPI `discriminator`: ReDoc then renders
    # the body as nothing at all.)
    start["schema"] = {"oneOf": [{"$ref": ref} for ref in refs]}


def _component_name(workflow: str, taken: dict[str, JsonSchema]) -> str:
    """A component name for ``workflow`` (its name, with what names may not hold replaced),
    distinct from those ``taken``."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", workflow)
    name, n = base, 1
    while f"StartRun.{name}" in taken:
        n += 1
        name = f"{base}-{n}"
    return name
