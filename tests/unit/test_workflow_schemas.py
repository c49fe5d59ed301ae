"""A workflow's published input schema admits exactly the input ``POST /v1/runs`` accepts: what
its signature binds, of the types its hints name, that can be stored; and the API's bodies take
numbers and flags as strictly as the document types them."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tenantflow import App, WorkflowContext
from tenantflow.api.models import StartRun, UserIn
from tenantflow.api.schemas import self_contained
from tenantflow.errors import InvalidInputError, SerializationError
from tenantflow.serde import dumps

app = App("schemas")


class Item(BaseModel):
    sku: str
    quantity: int


@app.workflow
async def mixed(
    ctx: WorkflowContext, a: int, /, b: str = "", *rest: float, c: bool, **extra: int
) -> None:
    """Every kind of parameter."""


@app.workflow
async def ordered(ctx: WorkflowContext, item: Item, note: str | None = None) -> Item:
    return item


@app.workflow
async def loose(ctx: WorkflowContext, anything: Any, *, tags: tuple[str, ...] = ()) -> Any:
    return anything


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**66), max_value=2**66)
    # Within 64 bits: JSON Schema cannot tell 1e20 from the integer 10**20 (see docs).
    | st.floats(min_value=-1e18, max_value=1e18)
    | st.text(max_size=2)
)
KEYS = st.sampled_from(["sku", "quantity", "x"])
ITEMS = st.fixed_dictionaries({"sku": st.text(max_size=2), "quantity": st.integers(-3, 3)})
VALUES = st.recursive(
    SCALARS | ITEMS,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)
SMALL = st.integers(-3, 3) | st.floats(-10, 10) | st.text(max_size=2) | st.booleans()


def near(typed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``typed``, now and then anything."""
    return st.one_of(typed, typed, typed, SMALL | VALUES)


def prefix(*slots: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """The first few of ``slots``, as a list of positional arguments."""
    return st.tuples(st.integers(0, len(slots)), *slots).map(lambda t: list(t[1:])[: t[0]])


def optional(**slots: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=slots)


TEXT, INT, FLOAT = st.text(max_size=2), st.integers(-3, 3), st.floats(-10, 10)
# Per workflow, calls near its signature (random values alone would almost never bind).
CALLS = {
    "mixed": st.tuples(
        prefix(near(INT), near(TEXT), near(FLOAT), near(FLOAT)),
        st.fixed_dictionaries(
            {"c": near(st.booleans())}, optional={"b": near(TEXT), "a": near(INT), "ctx": INT}
        )
        | optional(c=SMALL, b=TEXT, more=near(INT)),
    ),
    "ordered": st.tuples(
        prefix(near(ITEMS), near(TEXT | st.none()), VALUES),
        optional(item=near(ITEMS), note=near(TEXT), other=SMALL),
    ),
    "loose": st.tuples(
        prefix(VALUES, VALUES),
        optional(anything=VALUES, tags=near(st.lists(TEXT, max_size=2)), other=SMALL),
    ),
}


@pytest.mark.parametrize("name", sorted(app.workflows))
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_input_schema_admits_what_the_server_accepts(name: str, data: st.DataObject) -> None:
    workflow = app.workflows[name]
    args, kwargs = data.draw(CALLS[name])
    schema = jsonschema_rs.Draft202012Validator(self_contained(workflow).input)
    try:
        workflow.codec.check_input(args, kwargs)
        dumps([args, kwargs])  # the run's input is stored as JSON
    except (InvalidInputError, SerializationError):
        accepted = False
    else:
        accepted = True
    assert schema.is_valid({"args": args, "kwargs": kwargs}) == accepted


@pytest.mark.parametrize("value", [True, "3", 3.5, 1001])
def test_a_body_takes_numbers_strictly(value: Any) -> None:
    assert StartRun(workflow="w", priority=3.0).priority == 3  # a JSON integer, as written
    with pytest.raises(ValidationError):
        StartRun(workflow="w", priority=value)


def test_a_body_takes_flags_strictly() -> None:
    with pytest.raises(ValidationError):
        UserIn(email="a@b.example", password="long enough", platform_admin="yes")  # type: ignore[arg-type]
