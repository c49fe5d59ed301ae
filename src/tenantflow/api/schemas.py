"""JSON Schemas of the workflows' inputs and outputs, derived from their signatures and type
hints, as ``POST /v1/runs`` checks them.

A run's input is ``{"args": [...], "kwargs": {...}}``, bound to the function's parameters
after its context as Python binds a call. The input schema says exactly that: one alternative
per number of positional arguments (``prefixItems``), the rest by name in ``kwargs``; so a
body the schema accepts is one the signature accepts, and the other way round.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from pydantic.errors import PydanticInvalidForJsonSchema
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from tenantflow.sdk.app import Workflow
from tenantflow.serde import INT_MAX, INT_MIN

JsonSchema = dict[str, Any]

_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
_RESULT = None  # the key of a workflow's return type among its parameters' names

_WIDE_INT = {"type": "integer", "not": {"minimum": INT_MIN, "maximum": INT_MAX}}
JSON_VALUE = "JsonValue"


def json_value(ref: str) -> JsonSchema:
    """Any JSON value tenantflow can store, defined at ``ref``: integers within 64 bits, at
    any depth (``items`` and ``additionalProperties`` apply to arrays and objects only)."""
    return {
        "title": "Any JSON value (integers within 64 bits)",
        "not": _WIDE_INT,
        "items": {"$ref": ref},
        "additionalProperties": {"$ref": ref},
    }


def _storable(json_value_ref: str) -> type[GenerateJsonSchema]:
    """Pydantic's JSON Schema, narrowed to what a run's input can hold: bounded integers
    wherever a number or any value goes, extra members of models included (they are stored
    as given, even where the model ignores them)."""
    anything = {"$ref": json_value_ref}

    class Storable(GenerateJsonSchema):
        def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
            out = super().int_schema(schema)
            if "minimum" not in out and "exclusiveMinimum" not in out:
                out["minimum"] = INT_MIN
            if "maximum" not in out and "exclusiveMaximum" not in out:
                out["maximum"] = INT_MAX
            return out

        def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
            return {**super().float_schema(schema), "not": _WIDE_INT}

        def any_schema(self, schema: core_schema.AnySchema) -> JsonSchemaValue:
            return dict(anything)

        def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
            return _extras(super().model_schema(schema), anything)

        def dataclass_schema(self, schema: core_schema.DataclassSchema) -> JsonSchemaValue:
            return _extras(super().dataclass_schema(schema), anything)

        def typed_dict_schema(self, schema: core_schema.TypedDictSchema) -> JsonSchemaValue:
            return _extras(super().typed_dict_schema(schema), anything)

    return Storable


def _extras(schema: JsonSchemaValue, anything: JsonSchema) -> JsonSchemaValue:
    if schema.get("additionalProperties", True) is True:
        schema["additionalProperties"] = dict(anything)
    return schema


@dataclass(frozen=True, kw_only=True)
class Described:
    input: JsonSchema  # of {"args": [...], "kwargs": {...}}
    output: JsonSchema  # of the run's result


def describe(
    workflows: Iterable[Workflow[Any, Any]], *, ref_template: str, json_value_ref: str
) -> tuple[dict[str, Described], dict[str, JsonSchema]]:
    """Each workflow's schemas, and the definitions of the types they refer to (by
    ``ref_template``), shared among them; "any value" refers to ``json_value_ref``, which the
    caller defines (``json_value``)."""
    workflows = list(workflows)
    keyed: list[tuple[tuple[str, str | None], Any, TypeAdapter[Any]]] = []
    for wf in workflows:
        for param, hint in wf.codec.checked_parameters():
            keyed.append(((wf.name, param.name), "validation", _adapter(hint)))
        keyed.append(((wf.name, _RESULT), "serialization", _adapter(wf.codec.return_hint)))
    found, top = TypeAdapter.json_schemas(
        keyed, ref_template=ref_template, schema_generator=_storable(json_value_ref)
    )
    schemas = {key: schema for (key, _mode), schema in found.items()}
    described = {}
    for wf in workflows:
        params = [
            (p, {"title": p.name, **schemas[(wf.name, p.name)]})
            for p, _ in wf.codec.checked_parameters()
        ]
        # With **kwargs, a name the context takes by keyword would bind twice.
        caller = {p.name for p, _ in params}
        taken = [
            p.name
            for p in wf.codec.signature.parameters.values()
            if p.name not in caller and p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)
        ]
        described[wf.name] = Described(
            input=_call_schema(params, taken), output=schemas[(wf.name, _RESULT)]
        )
    return described, dict(top.get("$defs", {}))


@functools.cache
def self_contained(workflow: Workflow[Any, Any]) -> Described:
    """The workflow's schemas, each carrying the definitions it refers to."""
    ref = f"#/$defs/{JSON_VALUE}"
    found, defs = describe([workflow], ref_template="#/$defs/{model}", json_value_ref=ref)
    defs[JSON_VALUE] = json_value(ref)
    described = found[workflow.name]
    return Described(
        input=_with_defs(described.input, defs), output=_with_defs(described.output, defs)
    )


def _with_defs(schema: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """``schema`` with the definitions it refers to (directly or through others)."""
    needed: dict[str, JsonSchema] = {}
    pending: list[Any] = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name not in needed:
                    needed[name] = defs[name]
                    pending.append(defs[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return {**schema, "$defs": dict(sorted(needed.items()))} if needed else schema


def _adapter(hint: Any) -> TypeAdapter[Any]:
    """An adapter for ``hint``; for a type JSON Schema cannot express, one that admits
    anything (the server still checks the value)."""
    adapter: TypeAdapter[Any] = TypeAdapter(hint)
    try:
        adapter.json_schema()
    except PydanticInvalidForJsonSchema:
        return TypeAdapter(Any)
    return adapter


def _call_schema(
    params: list[tuple[inspect.Parameter, JsonSchema]], taken: list[str]
) -> JsonSchema:
    positional = [(p, s) for p, s in params if p.kind in _POSITIONAL]
    keyword_only = [(p, s) for p, s in params if p.kind is _P.KEYWORD_ONLY]
    var_args = next((s for p, s in params if p.kind is _P.VAR_POSITIONAL), None)
    var_kwargs = next((s for p, s in params if p.kind is _P.VAR_KEYWORD), None)
    branches = []
    for k in range(len(positional) + 1):
        rest = positional[k:]
        if any(p.kind is _P.POSITIONAL_ONLY and p.default is _P.empty for p, _ in rest):
            continue  # a positional-only parameter without a default must come in args
        args: JsonSchema = {"type": "array"}
        if k:
            args.update(prefixItems=[s for _, s in positional[:k]], minItems=k)
        if k == len(positional) and var_args is not None:
            args["items"] = var_args
        else:
            args["maxItems"] = k
        by_name = [(p, s) for p, s in rest if p.kind is _P.POSITIONAL_OR_KEYWORD] + keyword_only
        kwargs: JsonSchema = {"type": "object", "properties": {p.name: s for p, s in by_name}}
        required = [p.name for p, _ in by_name if p.default is _P.empty]
        if required:
            kwargs["required"] = required
        if var_kwargs is None:
            kwargs["additionalProperties"] = False
        else:
            kwargs["additionalProperties"] = var_kwargs
            given = [p.name for p, _ in positional[:k] if p.kind is _P.POSITIONAL_OR_KEYWORD]
            kwargs["properties"].update(dict.fromkeys([*taken, *given], False))
        title = f"{k} by position, the rest by name" if k else "all by name"
        branch: JsonSchema = {"title": title, "properties": {"args": args, "kwargs": kwargs}}
        needed = (["args"] if k else []) + (["kwargs"] if required else [])
        if needed:
            branch["required"] = needed
        branches.append(branch)
    schema: JsonSchema = {"type": "object", "additionalProperties": False}
    if len(branches) == 1:
        return {**schema, **branches[0]}
    generic = {"args": {"type": "array"}, "kwargs": {"type": "object"}}
    return {**schema, "properties": generic, "anyOf": branches}
