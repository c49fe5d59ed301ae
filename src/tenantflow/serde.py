"""JSON encoding of inputs, outputs and events.

Values are stored as JSON, never pickled. Pydantic models, dataclasses, datetimes, UUIDs and
enums encode natively; on the way back, the type hints of the workflow or step decide the type
(as Temporal's Python SDK does), so a Pydantic model or a dataclass round-trips.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, get_type_hints

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from tenantflow.errors import InvalidArgumentsError, Issue, SerializationError

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
# The integers orjson encodes: a wider one cannot be stored.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        raise TypeError("sets have no JSON form; pass a list")
    if isinstance(value, bytes):
        raise TypeError("bytes have no JSON form; encode them (base64) first")
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


NOT_A_NUMBER = "NaN and Infinity have no JSON form"
NOT_JSON_NUMBER = "NaN, Infinity and numbers beyond a double's range are not JSON"


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Encode ``value`` as JSON or raise :class:`SerializationError` naming ``what`` (a
    ``float('nan')`` or an infinity too: orjson would write ``null`` in their place)."""
    try:
        data = orjson.dumps(value, default=_default, option=_OPTIONS)
    except TypeError as exc:
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from None
    # NaN and Infinity come out as null: only a document with a null can hold one.
    if b"null" in data and _not_finite(value):
        raise SerializationError(f"{what} cannot be stored as JSON: {NOT_A_NUMBER}")
    return data


def _not_finite(value: Any) -> bool:
    """Whether ``value`` holds a float that is NaN or infinite, at any depth."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_not_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_not_finite(v) for v in value)
    if isinstance(value, BaseModel):
        return _not_finite(value.model_dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_not_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _not_finite(value.tolist())  # an array or a scalar, as Python values
    return False


def loads(data: bytes | str | None) -> Any:
    return None if data is None else orjson.loads(data)


class _NotJsonNumber(ValueError):
    """A number JSON has not (its text is not kept: it is the caller's input)."""


def _refuse(token: str) -> Any:
    raise _NotJsonNumber()


def _finite(token: str) -> float:
    number = float(token)
    if not math.isfinite(number):  # 1e400: a double cannot hold it
        raise _NotJsonNumber()
    return number


def parse_json(data: bytes | str) -> Any:
    """JSON from outside (a request body, a command-line value), as RFC 8259 has it:
    ``NaN``, ``Infinity`` and numbers beyond a double's range are a ``JSONDecodeError``
    (Python's ``json`` takes them, and nothing could store them). Integers stay exact, so
    that one wider than 64 bits is refused where it is stored rather than rounded here."""
    try:
        return json.loads(data, parse_constant=_refuse, parse_float=_finite)
    except _NotJsonNumber:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        try:  # orjson refuses the same numbers, and says where
            orjson.loads(data)
            position = 0
        except orjson.JSONDecodeError as located:
            position = located.pos
            if text[position - 1 : position] == "-":  # the number's start, not its digits'
                position -= 1
        raise json.JSONDecodeError(NOT_JSON_NUMBER, text, position) from None


def whole(value: Any) -> Any:
    """``value`` with each JSON number that has no fraction (``900.0``) as an int: JSON
    Schema counts it an integer, Pydantic's strict mode would not."""
    if isinstance(value, float) and value.is_integer() and INT_MIN <= value <= INT_MAX:
        return int(value)
    if isinstance(value, list):
        return [whole(v) for v in value]
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    return value


_PASSTHROUGH = {Any, inspect.Parameter.empty, None, type(None), object}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class TypedCodec:
    """Decodes the JSON of a callable's arguments and return value into their annotated types."""

    def __init__(self, fn: Callable[..., Any], *, skip_first: bool = False) -> None:
        try:
            hints = get_type_hints(fn)
        except Exception:  # unresolvable forward references: fall back to plain JSON values
            hints = {}
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1 if skip_first else 0 :]
        self.signature = sig
        self.param_names = [p.name for p in params]
        self._params: dict[str, TypeAdapter[Any] | None] = {
            p.name: _adapter(hints.get(p.name, Any)) for p in params
        }
        self._kinds = {p.name: p.kind for p in params}
        self._hints = {p.name: hints.get(p.name, Any) for p in params}
        self._skip_first = skip_first
        self.returns: TypeAdapter[Any] | None = _adapter(hints.get("return", Any))
        self.return_hint: Any = hints.get("return", Any)

    def check_input(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Check JSON arguments against the signature and every parameter's type (strictly:
        unlike ``decode_args``, plain ``int``/``str``/... are checked too). For input from
        outside, before it is accepted; raises ``InvalidArgumentsError`` whose issues locate
        each problem by parameter (``order.quantity``), or by position or keyword where no
        parameter takes the value (``args.2``, ``kwargs.colour``)."""
        try:
            bound = self.signature.bind(*([None] if self._skip_first else []), *args, **kwargs)
        except TypeError:
            raise InvalidArgumentsError(issues=self._binding_issues(args, kwargs)) from None
        issues: list[Issue] = []
        for name, value in bound.arguments.items():
            hint = self._hints.get(name)
            if hint is None or hint in _PASSTHROUGH:
                continue
            kind = self._kinds[name]
            if kind is inspect.Parameter.VAR_POSITIONAL:
                items = [(f"{name}.{i}", v) for i, v in enumerate(value)]
            elif kind is inspect.Parameter.VAR_KEYWORD:
                items = [(str(k), v) for k, v in value.items()]
            else:
                items = [(name, value)]
            adapter = adapter_for(hint)
            for loc, item in items:
                try:
                    # Strictly, as JSON: what the published JSON Schema says ("7" is no int,
                    # true no number); lax mode would pass both on, unconverted, to the run.
                    encoded = dumps(whole(item), what=f"argument {name!r}")
                    adapter.validate_json(encoded, strict=True)
                except ValidationError as exc:
                    issues.extend(issues_of(exc.errors(include_url=False), loc))
        if issues:
            raise InvalidArgumentsError(issues=issues)

    def _binding_issues(self, args: list[Any], kwargs: dict[str, Any]) -> list[Issue]:
        """What makes these arguments fail to bind, in words for the caller (Python's own
        ``TypeError`` speaks of a function the caller never sees)."""
        kinds = self._kinds
        positional = [n for n in self.param_names if kinds[n] in _POSITIONAL]
        by_keyword = {n for n in self.param_names if kinds[n] in _BY_KEYWORD}
        issues: list[Issue] = []
        if inspect.Parameter.VAR_POSITIONAL not in kinds.values():
            issues += [
                Issue(
                    f"args.{i}",
                    f"the workflow takes {_count(len(positional), 'positional argument')}",
                )
                for i in range(len(positional), len(args))
            ]
        given = set(positional[: len(args)])
        for key in kwargs:
            if key in given and key in by_keyword:
                issues.append(Issue(f"kwargs.{key}", "given by position too"))
            elif key not in by_keyword and inspect.Parameter.VAR_KEYWORD not in kinds.values():
                issues.append(Issue(f"kwargs.{key}", "the workflow has no such parameter"))
        for name in self.param_names:
            required = self.signature.parameters[name].default is inspect.Parameter.empty
            if required and kinds[name] not in _VARIADIC and name not in given | kwargs.keys():
                issues.append(Issue(name, "required"))
        return issues or [Issue("", "the arguments do not fit the workflow's parameters")]

    def checked_parameters(self) -> list[tuple[inspect.Parameter, Any]]:
        """The caller's parameters in order, each with the type ``check_input`` holds its
        values to (``Any`` where it checks nothing)."""
        return [
            (p, Any if self._hints[p.name] in _PASSTHROUGH else self._hints[p.name])
            for p in self.signature.parameters.values()
            if p.name in self._kinds
        ]

    def decode_return(self, value: Any) -> Any:
        return _validate(self.returns, value)

    def decode_args(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        out_args: list[Any] = []
        names = self.param_names
        for i, value in enumerate(args):
            name = names[i] if i < len(names) else None
            if name is not None and self._kinds[name] is inspect.Parameter.VAR_POSITIONAL:
                out_args.extend(_validate(self._params[name], v) for v in args[i:])
                break
            out_args.append(_validate(self._params.get(name) if name else None, value))
        out_kwargs = {k: _validate(self._params.get(k), v) for k, v in kwargs.items()}
        return out_args, out_kwargs


def _validate(adapter: TypeAdapter[Any] | None, value: Any) -> Any:
    if adapter is None:
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise SerializationError(f"stored value does not match its type: {exc}") from None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def issues_of(errors: Iterable[Mapping[str, Any]], prefix: str = "") -> list[Issue]:
    """Pydantic's errors (``ValidationError.errors()``) as issues located under ``prefix``.
    Its messages name what was expected, never the input itself, so they may be shown to the
    caller."""
    return [
        Issue(".".join([*([prefix] if prefix else []), *(str(p) for p in e["loc"])]), e["msg"])
        for e in errors
    ]


@lru_cache(maxsize=1024)
def _adapter_cached(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def adapter_for(hint: Any) -> TypeAdapter[Any]:
    """A (cached) validator of ``hint``."""
    try:
        return _adapter_cached(hint)
    except TypeError:  # an unhashable hint cannot be cached
        return TypeAdapter(hint)


def _adapter(hint: Any) -> TypeAdapter[Any] | None:
    if hint in _PASSTHROUGH or hint in (int, str, float, bool, dict, list):
        # JSON already gives these; skipping validation keeps the hot path lean.
        return None
    return adapter_for(hint)
