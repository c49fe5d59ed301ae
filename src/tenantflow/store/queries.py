"""The run store's named statements, read once from ``queries.sql`` (its header says how an
entry is written): ``Q["claim_queued"]`` is the text to run, and names its output columns."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from tenantflow.store.db import Tx
from tenantflow.store.records import TERMINAL, RunStatus, StepStatus

HEADER = re.compile(r"^-- (\w+) --$", re.MULTILINE)
INCLUDE = re.compile(r"\{(\w+(?:\.\w+)?)\}")
# Filled in later: row locks by the database layer, the filters of one call by the store.
LATER = frozenset({"for_update", "for_share", "filters"})
MANY = re.compile(r"\{many:([^{}]*)\}")
KEYWORD = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|FROM|RETURNING)\b|[()]")
NAMED = re.compile(r"(?:\bAS\s+|^(?:\w+\.)?)(\w+)$", re.IGNORECASE)


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _values() -> dict[str, str]:
    """The values a statement may name, as SQL literals; the sets in ``RunStatus`` order, so
    that a statement's text (and its prepared name) is the same in every process."""
    values = {f"RunStatus.{s.name}": _quoted([s.value]) for s in RunStatus}
    values.update({f"StepStatus.{s.name}": _quoted([s.value]) for s in StepStatus})
    values["TERMINAL"] = _quoted([s.value for s in RunStatus if s in TERMINAL])
    values["UNFINISHED"] = _quoted([s.value for s in RunStatus if s not in TERMINAL])
    return values


class Statement(str):
    """A statement's text (what the database layer takes), with its name and the names of
    the columns it returns, in their order."""

    name: str
    columns: tuple[str, ...]
    at: dict[str, int]  # each column's place in a row

    def __new__(cls, name: str, text: str) -> Statement:
        self = super().__new__(cls, text)
        self.name = name
        self.columns = output_columns(text)
        self.at = {column: i for i, column in enumerate(self.columns)}
        return self

    def named(self, row: Sequence[Any]) -> dict[str, Any]:
        """``row`` by column name. A dict a row costs a few microseconds: the hot path reads
        its rows through ``at`` instead."""
        return dict(zip(self.columns, row, strict=True))

    def many(self, count: int) -> str:
        """The text for a list of ``count`` items: each ``{many:...}`` repeated that often."""
        return _many(str(self), count)

    def fill(self, **parts: str) -> str:
        """The text with the parts of one call (``{filters}``) in their places."""
        text = str(self)
        for key, part in parts.items():
            text = text.replace(f"{{{key}}}", part)
        return text


@lru_cache(maxsize=256)
def _many(text: str, count: int) -> str:
    return MANY.sub(lambda m: ", ".join([m[1]] * count), text)


def _depth_zero(text: str) -> Iterator[re.Match[str]]:
    """The keywords of ``text`` outside any parentheses."""
    depth = 0
    for match in KEYWORD.finditer(text):
        token = match[0]
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0:
            yield match


def _split_top(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return items


def output_columns(text: str) -> tuple[str, ...]:
    """The names of the columns a statement returns: its RETURNING list, or the list of its
    outermost SELECT; each a column (``t.col`` gives ``col``) or named with ``AS``."""
    keywords = list(_depth_zero(text))
    returning = [m for m in keywords if m[1] == "RETURNING"]
    if returning:
        listed = text[returning[-1].end() :]
    else:
        verbs = [m for m in keywords if m[1] in ("SELECT", "INSERT", "UPDATE", "DELETE")]
        if not verbs or verbs[0][1] != "SELECT":
            return ()
        ends = [m.start() for m in keywords if m[1] == "FROM" and m.start() > verbs[0].end()]
        listed = text[verbs[0].end() : ends[0] if ends else len(text)]
    names = []
    for item in _split_top(listed):
        named = NAMED.search(item)
        if named is None:
            raise ValueError(f"an output column without a name (AS ...): {item!r}")
        names.append(named[1])
    return tuple(names)


def parse(source: str) -> dict[str, str]:
    """The entries of a statements file, name to text: comments dropped, white space folded,
    a trailing semicolon dropped."""
    parts = HEADER.split(source)
    entries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in entries:
            raise ValueError(f"statement {name!r} is named twice")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        entries[name] = " ".join(" ".join(lines).split()).removesuffix(";")
    return entries


def render(entries: Mapping[str, str]) -> dict[str, Statement]:
    """Every entry with its includes and values in place."""
    values = _values()
    done: dict[str, Statement] = {}

    def expand(name: str, seen: tuple[str, ...]) -> str:
        if name in done:
            return done[name]
        if name in seen:
            raise ValueError(f"statement {name!r} includes itself")

        def include(match: re.Match[str]) -> str:
            key = match[1]
            if key in LATER:
                return match[0]
            if key in values:
                return values[key]
            if key in entries:
                return expand(key, (*seen, name))
            raise ValueError(f"statement {name!r} names {key!r}, which is not defined")

        done[name] = Statement(name, INCLUDE.sub(include, entries[name]))
        return done[name]

    for name in entries:
        expand(name, ())
    return done


def load() -> dict[str, Statement]:
    source = resources.files("tenantflow.store").joinpath("queries.sql").read_text("utf-8")
    return render(parse(source))


Q: Mapping[str, Statement] = load()


async def fetch_one(
    tx: Tx, statement: Statement, params: Sequence[Any] = ()
) -> dict[str, Any] | None:
    """The first row of ``statement``, by column name."""
    row = await tx.one(statement, params)
    return None if row is None else statement.named(row)


async def fetch_all(
    tx: Tx, statement: Statement, params: Sequence[Any] = (), *, text: str | None = None
) -> list[dict[str, Any]]:
    """Every row of ``statement`` (run as ``text``: its ``many`` or ``fill``), by column name."""
    return [statement.named(row) for row in await tx.all(text or statement, params)]
