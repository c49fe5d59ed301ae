"""JSON encoding of inputs, outputs and events.

Values are stored as JSON, never pickled. Pydantic models, dataclasses, datetimes, UUIDs and
enums encode natively; on the way back, the type hints of the workflow or step decide the type
(as Temporal's Python SDK does), so a Pydantic model or a dataclass round-trips.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any, get_type_hints

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from tenantflow.errors import SerializationError

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


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Encode ``value`` as JSON or raise :class:`SerializationError` naming ``what``."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except TypeError as exc:
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from None


def loads(data: bytes | str | None) -> Any:
    return None if data is None else orjson.loads(data)


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
        outside, before it is accepted; raises ``SerializationError`` saying what is wrong."""
        try:
            bound = self.signature.bind(*([None] if self._skip_first else []), *args, **kwargs)
        except TypeError as exc:
            raise SerializationError(f"the arguments do not fit: {exc}") from None
        for name, value in bound.arguments.items():
            hint = self._hints.get(name)
            if hint is None or hint in _PASSTHROUGH:
                continue
            values = value if self._kinds[name] is inspect.Parameter.VAR_POSITIONAL else [value]
            if self._kinds[name] is inspect.Parameter.VAR_KEYWORD:
                values = list(value.values())
            adapter = _adapter_cached(hint)
            assert adapter is not None
            for item in values:
                try:
                    # Strictly, as JSON: what the published JSON Schema says ("7" is no int,
                    # true no number); lax mode would pass both on, unconverted, to the run.
                    encoded = dumps(whole(item), what=f"argument {name!r}")
                    adapter.validate_json(encoded, strict=True)
                except ValidationError as exc:
                    issues = "; ".join(str(e["msg"]) for e in exc.errors())
                    raise SerializationError(f"argument {name!r}: {issues}") from None

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


@lru_cache(maxsize=1024)
def _adapter_cached(hint: Any) -> TypeAdapter[Any] | None:
    return TypeAdapter(hint)


def _adapter(hint: Any) -> TypeAdapter[Any] | None:
    if hint in _PASSTHROUGH or hint in (int, str, float, bool, dict, list):
        # JSON already gives these; skipping validation keeps the hot path lean.
        return None
    try:
        return _adapter_cached(hint)
    except TypeError:  # an unhashable hint cannot be cached
        return TypeAdapter(hint)
